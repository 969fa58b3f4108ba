"""Random-valued IP-Adapter and CLIP ViT-H/14 image-encoder files with the real key names and shapes.

    python make_adapter_files.py <webui>/models

writes ipadapter/ip-adapter_sd15.safetensors, ipadapter/ip-adapter-plus_sd15.safetensors
(tests/fake_weights.py layouts) and clip_vision/image_encoder/{config.json,model.safetensors}
(h94's models/image_encoder layout: a transformers CLIPVisionModelWithProjection, random init,
fp16, ~1.2 GB).
"""
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(REPO, "tests"))

import fake_weights  # noqa: E402


def main(models_dir):
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    adapters = os.path.join(models_dir, "ipadapter")
    os.makedirs(adapters, exist_ok=True)
    for name in ("sd15", "sd15_plus"):
        path = os.path.join(adapters, fake_weights.VARIANTS[name].file_name)
        if not os.path.exists(path):
            fake_weights.write_safetensors(fake_weights.variant_state(name, seed=1), path)
        print(path)
    encoder = os.path.join(models_dir, "clip_vision", "image_encoder")
    os.makedirs(encoder, exist_ok=True)
    weights = os.path.join(encoder, "model.safetensors")
    if not os.path.exists(weights):
        with open(os.path.join(REPO, "charadapter", "configs", "clip_vision_vit_h_14.json")) as f:
            config = json.load(f)
        config = dict(config, architectures=["CLIPVisionModelWithProjection"])
        with open(os.path.join(encoder, "config.json"), "w") as f:
            json.dump(config, f, indent=1)
        torch.manual_seed(0)
        model = CLIPVisionModelWithProjection(CLIPVisionConfig(**{k: v for k, v in config.items()
                                                                 if k not in ("architectures", "model_type")}))
        sd = {k: v.to(torch.float16).contiguous() if v.is_floating_point() else v.contiguous()
              for k, v in model.state_dict().items()}
        del model
        save_file(sd, weights)
    print(weights)


if __name__ == "__main__":
    main(sys.argv[1])
