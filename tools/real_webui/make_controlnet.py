"""A random-weight SD1.5 ControlNet in the published layout (control_model.* keys, fp16 .safetensors).

Built with sd-webui-controlnet's own cldm.ControlNet and its default SD1.5 config; the zero convs
get torch's default init back so the unit actually changes the UNet's residuals.

    cd <webui> && python make_controlnet.py models/ControlNet/control_v11p_sd15_canny.safetensors
"""
import os
import sys

import torch


def main(out_path, webui_dir="."):
    webui_dir = os.path.abspath(webui_dir)
    ext = os.path.join(webui_dir, "extensions", "sd-webui-controlnet")
    sys.path[:0] = [ext, webui_dir, os.path.join(webui_dir, "repositories", "stable-diffusion-stability-ai")]
    sys.argv = sys.argv[:1]  # modules.shared parses the command line
    from safetensors.torch import save_file
    from scripts.cldm import ControlNet
    from scripts.controlnet_model_guess import controlnet_default_config

    config = dict(controlnet_default_config, hint_channels=3)
    torch.manual_seed(0)
    net = ControlNet(**config)
    for module in net.modules():
        params = list(module.parameters(recurse=False))
        if params and hasattr(module, "reset_parameters") and all(float(p.abs().max()) == 0 for p in params):
            module.reset_parameters()
    sd = {"control_model." + k: v.detach().to(torch.float16).contiguous() for k, v in net.state_dict().items()
          if v.is_floating_point()}
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    save_file(sd, out_path)
    print(out_path, len(sd), "tensors")


if __name__ == "__main__":
    main(*sys.argv[1:])
