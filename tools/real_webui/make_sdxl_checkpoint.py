"""A random-weight SDXL base checkpoint in the real layout, for running the WebUI without real weights.

Builds sgm's DiffusionEngine from repositories/generative-models/configs/inference/sd_xl_base.yaml
(the config the WebUI picks for a file with `conditioner.embedders.1.model.ln_final.weight`) on
the meta device, and streams random weights into fp16 .safetensors (~6.9 GB) one block at a time
(random_weights.py: 1.2 GB peak instead of 14 GB; ~1 min). Keys: model.diffusion_model.*,
conditioner.embedders.0.transformer.* (CLIP ViT-L text, transformers), conditioner.embedders.1.model.*
(OpenCLIP ViT-bigG text, no visual tower), first_stage_model.*, denoiser.sigmas (fp32, real values).

Inits: torch's defaults everywhere, so the layers sgm creates zeroed (zero_module: UNet output
conv, ResBlock out convs, transformer proj_out) are live and the cross-attention the extension
adds to changes the output; transformers' CLIP init for the CLIP-L text model; OpenCLIP's
init_parameters formulas for the bigG text model; both text encoders' final LayerNorm
trained-looking (random_weights.tame_layer_norm).

    cd <webui> && HF_HOME=... HF_HUB_OFFLINE=1 python make_sdxl_checkpoint.py models/Stable-diffusion/random-sdxl.safetensors [.]
"""
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from random_weights import normal_, tame_layer_norm, write_random  # noqa: E402

CLIP_L = "conditioner.embedders.0.transformer"
BIGG = "conditioner.embedders.1.model"


def build_on_meta(webui_dir):
    """(DiffusionEngine on the meta device, the real denoiser sigmas, the CLIP-L text model)."""
    sys.path.insert(0, os.path.join(webui_dir, "repositories", "generative-models"))
    import open_clip
    import transformers
    from omegaconf import OmegaConf
    from sgm.util import instantiate_from_config

    def from_config_only(name, *args, **kwargs):  # no weights in the HF cache: config only
        return transformers.CLIPTextModel(transformers.CLIPTextConfig.from_pretrained(name))

    create = open_clip.create_model_and_transforms

    def without_pretrained(*args, **kwargs):  # as the WebUI's sd_disable_initialization does
        kwargs.update(pretrained=None, device=torch.device("meta"))
        return create(*args, **kwargs)

    transformers.CLIPTextModel.from_pretrained = from_config_only
    open_clip.create_model_and_transforms = without_pretrained
    config = OmegaConf.load(os.path.join(webui_dir, "repositories", "generative-models", "configs", "inference",
                                         "sd_xl_base.yaml"))
    from sgm.modules.diffusionmodules.denoiser import DiscreteDenoiser

    sigmas = instantiate_from_config(config.model.params.denoiser_config).sigmas.float().clone()  # small: CPU
    denoiser_init = DiscreteDenoiser.__init__

    def denoiser_on_cpu(self, *args, **kwargs):  # its schedule goes through numpy: not on meta
        with torch.device("cpu"):
            denoiser_init(self, *args, **kwargs)

    DiscreteDenoiser.__init__ = denoiser_on_cpu
    with torch.device("meta"):
        model = instantiate_from_config(config.model)
    DiscreteDenoiser.__init__ = denoiser_init
    clip_l = model.get_submodule(CLIP_L)
    return model, sigmas, clip_l


def make_init(sigmas, clip_l, bigg):
    """The per-module init on top of torch's defaults (see the module docstring)."""
    width = bigg.transformer.width
    proj_std = width ** -0.5 * (2 * bigg.transformer.layers) ** -0.5

    def init(name, m):
        if name == "denoiser":
            m.sigmas.copy_(sigmas)
        elif name.startswith(CLIP_L + "."):
            clip_l._init_weights(m)  # transformers' CLIP init, module by module
            if name.endswith("embeddings"):
                m.position_ids.copy_(torch.arange(m.position_ids.shape[-1]).expand_as(m.position_ids))  # (1, 77)
            if name.endswith("final_layer_norm"):
                tame_layer_norm(m, seed=0)
        elif name == BIGG:  # OpenCLIP CLIP.init_parameters' formulas, on the parts the root owns
            normal_(m.positional_embedding, 0.01)
            normal_(m.text_projection, width ** -0.5)
            m.logit_scale.fill_(math.log(1 / 0.07))
        elif name == BIGG + ".token_embedding":
            normal_(m.weight, 0.02)
        elif name == BIGG + ".ln_final":
            tame_layer_norm(m, seed=1)
        elif name.rpartition(".")[0] == BIGG + ".transformer.resblocks":  # one ResidualAttentionBlock
            normal_(m.attn.in_proj_weight, width ** -0.5)
            normal_(m.attn.out_proj.weight, proj_std)
            normal_(m.mlp.c_fc.weight, (2 * width) ** -0.5)
            normal_(m.mlp.c_proj.weight, proj_std)
    return init


def weights_dtype(key, tensor):
    """fp16 network weights; the noise schedule (denoiser.sigmas) stays fp32, integers stay."""
    if not tensor.is_floating_point():
        return tensor.dtype
    return torch.float32 if key == "denoiser.sigmas" else torch.float16


def main(out_path, webui_dir="."):
    t0 = time.time()
    torch.manual_seed(0)
    model, sigmas, clip_l = build_on_meta(webui_dir)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    n = write_random(model, out_path, make_init(sigmas, clip_l, model.get_submodule(BIGG)), weights_dtype)
    print(f"{out_path}: {n} tensors, {os.path.getsize(out_path) / 2**30:.2f} GiB, {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main(*sys.argv[1:])
