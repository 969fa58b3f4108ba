"""Random-valued IP-Adapter and CLIP image-encoder files with the real key names and shapes.

    python make_adapter_files.py <webui>/models            # SD1.5 set
    python make_adapter_files.py <webui>/models --sdxl     # SDXL set (both sets: run both)

SD1.5 set: ipadapter/ip-adapter_sd15.safetensors, ipadapter/ip-adapter-plus_sd15.safetensors
(tests/fake_weights.py layouts) and clip_vision/image_encoder/{config.json,model.safetensors}
(h94's models/image_encoder layout: a transformers CLIPVisionModelWithProjection ViT-H/14,
random init, fp16, ~1.2 GB).

SDXL set: ipadapter/ip-adapter_sdxl_vit-h.safetensors (uses the ViT-H encoder above),
ipadapter/ip-adapter_sdxl.safetensors (~0.7 GB each) and, for the latter, the ViT-bigG/14 encoder
as h94's sdxl_models/image_encoder folder: clip_vision/sdxl_models/image_encoder (1.8 G
parameters, fp16, 3.4 GiB; streamed by random_weights.py, ~1 GB peak; listed by the extension as
"sdxl_models - image_encoder"). Existing files are kept.
"""
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [HERE, os.path.join(REPO, "tests")]

import fake_weights  # noqa: E402
from random_weights import normal_, write_random  # noqa: E402

SD15 = ("sd15", "sd15_plus")
SDXL = ("sdxl_vith", "sdxl")
ENCODERS = {  # folder under models/clip_vision -> shipped config
    "sd15": ("image_encoder", "clip_vision_vit_h_14.json"),
    "sdxl": (os.path.join("sdxl_models", "image_encoder"), "clip_vision_vit_bigg_14.json"),
}


def encoder_config(name):
    """The extension's shipped encoder config, as a Hugging Face folder's config.json."""
    with open(os.path.join(REPO, "charadapter", "configs", name)) as f:
        config = json.load(f)
    return dict(config, architectures=["CLIPVisionModelWithProjection"])


def write_encoder(folder, config_name):
    """config.json + model.safetensors: CLIPVisionModelWithProjection, transformers' init, fp16."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    os.makedirs(folder, exist_ok=True)
    weights = os.path.join(folder, "model.safetensors")
    if os.path.exists(weights):
        return weights
    config = encoder_config(config_name)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    with torch.device("meta"):
        model = CLIPVisionModelWithProjection(
            CLIPVisionConfig(**{k: v for k, v in config.items() if k not in ("architectures", "model_type")}))
    hidden = model.config.hidden_size

    def init(name, m):
        model._init_weights(m)  # transformers' CLIP init, module by module
        if name == "visual_projection":  # its rule sits on the root, which is never whole
            normal_(m.weight, hidden ** -0.5)
        if name.endswith("embeddings"):
            m.position_ids.copy_(torch.arange(m.position_ids.shape[-1]).expand_as(m.position_ids))  # (1, 257)

    torch.manual_seed(0)
    write_random(model, weights, init)
    return weights


def main(models_dir, *flags):
    sdxl = "--sdxl" in flags
    adapters = os.path.join(models_dir, "ipadapter")
    os.makedirs(adapters, exist_ok=True)
    for name in SDXL if sdxl else SD15:
        path = os.path.join(adapters, fake_weights.VARIANTS[name].file_name)
        if not os.path.exists(path):
            fake_weights.write_safetensors(fake_weights.variant_state(name, seed=1), path)
        print(path)
    folder, config_name = ENCODERS["sdxl" if sdxl else "sd15"]
    print(write_encoder(os.path.join(models_dir, "clip_vision", folder), config_name))


if __name__ == "__main__":
    main(*sys.argv[1:])
