"""A random-weight SD1.5 checkpoint in the real layout, for running the WebUI without real weights.

Builds ldm's LatentDiffusion from the WebUI's configs/v1-inference.yaml (text encoder from the
config only: the HF cache that make_hf_cache.py writes), re-initialises the layers ldm creates
zeroed (UNet output conv, ResBlock out convs, transformer proj_out) so that every part of the UNet
- the cross-attention the extension adds to included - actually changes the output, gives the text
encoder's final LayerNorm a trained-looking affine part, and saves the state dict as fp16
.safetensors (~2 GB).

    cd <webui> && HF_HOME=... HF_HUB_OFFLINE=1 python make_checkpoint.py models/Stable-diffusion/random-sd15.safetensors
"""
import os
import sys

import torch

from random_weights import tame_layer_norm  # this folder: the script's own directory is on sys.path


def build(webui_dir):
    sys.path.insert(0, os.path.join(webui_dir, "repositories", "stable-diffusion-stability-ai"))
    import transformers
    from omegaconf import OmegaConf
    from ldm.util import instantiate_from_config

    def from_config_only(name, *args, **kwargs):  # no weights in the cache: config only
        return transformers.CLIPTextModel(transformers.CLIPTextConfig.from_pretrained(name))

    transformers.CLIPTextModel.from_pretrained = from_config_only
    config = OmegaConf.load(os.path.join(webui_dir, "configs", "v1-inference.yaml"))
    model = instantiate_from_config(config.model)
    torch.manual_seed(0)
    revived = 0
    for module in model.model.diffusion_model.modules():
        params = list(module.parameters(recurse=False))
        if params and hasattr(module, "reset_parameters") and all(float(p.abs().max()) == 0 for p in params):
            module.reset_parameters()  # ldm's zero_module(): give it torch's default init back
            revived += 1
    print(f"re-initialised {revived} zeroed UNet layers", file=sys.stderr)
    # a fresh final norm makes z.mean() rounding noise, which the Original emphasis divides by
    tame_layer_norm(model.cond_stage_model.transformer.text_model.final_layer_norm, seed=0)
    return model


def main(out_path, webui_dir="."):
    from safetensors.torch import save_file

    with torch.no_grad():
        model = build(webui_dir)
        # network weights in fp16 (as pruned fp16 checkpoints); schedule buffers stay fp32
        sd = {k: v.detach().to(torch.float16 if "." in k and v.is_floating_point() else v.dtype).contiguous()
              for k, v in model.state_dict().items()}
    del model
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    save_file(sd, out_path)
    print(out_path, len(sd), "tensors")


if __name__ == "__main__":
    main(*sys.argv[1:])
