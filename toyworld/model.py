"""The toy world's models in the WebUI's formats, and their files.

- A text-to-image `ldm` LatentDiffusion: SD1.5's UNet structure (16 attn2 layers, context 768)
  at tiny widths, in pixel space (ldm's IdentityFirstStage, 32x32x3), the toy text encoder as
  its cond stage. Saved as a flat safetensors state dict with SD1 key names
  ("model.diffusion_model.*", "cond_stage_model.*", schedule buffers) plus the OmegaConf config.
- A tiny `transformers` CLIPVisionModelWithProjection (projection_dim 1024, ViT-H's width, so
  the adapter loader maps it to a base SD1.5 adapter), saved with save_pretrained.
- An IP-Adapter file with the real flat key layout: image_proj.{proj,norm}.*,
  ip_adapter.{2n+1}.to_k_ip/to_v_ip.weight.
"""

import os
import sys
import warnings
from typing import Dict, Optional

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WEIGHTS = os.path.join(ROOT, "toyworld", "weights")
SD_FILE = "toy_sd.safetensors"
SD_CONFIG = "toy_sd.yaml"
CLIP_DIR = "clip_vision"
ADAPTER_FILE = "ip_adapter_toy.safetensors"

IMAGE_TOKENS = 2  # image tokens per reference (SD1.5 base: 4); 768 x 1024 x 2 weights each
CLIP_PROJECTION = 1024  # ViT-H/14's image_embeds width: what base SD1.5 adapters take
LINEAR_START, LINEAR_END, TIMESTEPS = 1e-4, 2e-2, 1000


def _ldm():
    """The WebUI's ldm modules, imported the way tests/tiny_sd.py does (placeholders for
    torchvision/open_clip while ldm imports)."""
    tests = os.path.join(ROOT, "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    import tiny_sd  # noqa: E402

    return tiny_sd.LDM


CHANNEL_MULT = (1, 1, 1, 1)  # of model_channels 32 per level; (1, 2, 1, 1) learned its maps slower per second (README)
TEXT_WINDOW = None  # global text encoder; see ToyTextEncoder


def sd_config():
    """OmegaConf `model` section, shaped like SD1's v1-inference.yaml."""
    from omegaconf import OmegaConf

    # SD1.5's attn2 count (16 = attention on 3 levels x 2 down + mid + 3 x 3 up), so the adapter
    # file has SD1.5's 16 layers; every width 32 (GroupNorm32's minimum) keeps the files small,
    # one res block on the 32x32 level keeps training fast. Maps: 16x16 and 8x8 (levels 1, 2).
    unet = dict(
        image_size=32, in_channels=3, out_channels=3, model_channels=32,
        attention_resolutions=[2, 4, 8], num_res_blocks=[1, 2, 2, 2], channel_mult=list(CHANNEL_MULT),
        num_head_channels=16, use_spatial_transformer=True, transformer_depth=1, context_dim=768,
        use_checkpoint=False, legacy=False, use_linear_in_transformer=False,
    )
    model = dict(
        target="ldm.models.diffusion.ddpm.LatentDiffusion",
        params=dict(
            linear_start=LINEAR_START, linear_end=LINEAR_END, num_timesteps_cond=1, log_every_t=200,
            timesteps=TIMESTEPS, first_stage_key="jpg", cond_stage_key="txt", image_size=32, channels=3,
            cond_stage_trainable=True, conditioning_key="crossattn", monitor="val/loss_simple_ema",
            scale_factor=1.0, use_ema=False,
            unet_config=dict(target="ldm.modules.diffusionmodules.openaimodel.UNetModel", params=unet),
            first_stage_config=dict(target="ldm.models.autoencoder.IdentityFirstStage", params={}),
            cond_stage_config=dict(target="toyworld.text.ToyTextEncoder", params=dict(window=TEXT_WINDOW)),
        ),
    )
    return OmegaConf.create(model)


def build_sd(seed: int = 0):
    """An untrained toy LatentDiffusion (fp32, CPU), weights a function of `seed`."""
    ldm = _ldm()
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore")
            model = ldm.util.instantiate_from_config(sd_config())
    return model


def save_sd(model, directory: str = WEIGHTS, dtype: torch.dtype = torch.float16) -> str:
    """The state dict (SD1 key names) as safetensors plus the yaml config next to it."""
    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    # Weights in `dtype`; the noise-schedule buffers stay fp32: fp16 rounds alphas_cumprod near 1
    # (1 - 1e-4 becomes 1.0), which breaks x0 = (x - sqrt(1 - a) eps) / sqrt(a) at small t.
    state = {k: (v.to(dtype) if v.is_floating_point() and k.startswith(("model.", "cond_stage_model.")) else v)
             .detach().cpu().contiguous()
             for k, v in model.state_dict().items() if not k.startswith("first_stage_model.")}
    path = os.path.join(directory, SD_FILE)
    save_file(state, path, metadata={"format": "pt"})
    OmegaConf.save(OmegaConf.create({"model": sd_config()}), os.path.join(directory, SD_CONFIG))
    return path


def load_sd(directory: str = WEIGHTS):
    """Build from the saved config and load the saved state dict strictly (fp32, eval)."""
    from omegaconf import OmegaConf
    from safetensors.torch import load_file

    _ldm()
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    config = OmegaConf.load(os.path.join(directory, SD_CONFIG)).model
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore")
        model = _ldm().util.instantiate_from_config(config)
    state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(os.path.join(directory, SD_FILE)).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("first_stage_model.")]
    if missing or unexpected:
        raise ValueError(f"{directory}: checkpoint does not fit the toy model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    return model.eval().requires_grad_(False)


# --------------------------------------------------------------------------- image side


def clip_config():
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            image_size=224, patch_size=28, projection_dim=CLIP_PROJECTION)


def build_clip(seed: int = 0):
    from transformers import CLIPVisionModelWithProjection

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CLIPVisionModelWithProjection(clip_config())


class ToyAdapter(torch.nn.Module):
    """The trainable IP-Adapter parts: image projection and to_k_ip/to_v_ip per attn2 layer."""

    def __init__(self, layer_widths, context_dim: int = 768, tokens: int = IMAGE_TOKENS, seed: int = 0,
                 text_kv=None):
        """`text_kv`: per layer the text attention's (to_k, to_v) weights to start from, as
        IP-Adapter's training does (image tokens are read like text tokens); None: random keys and
        zero values (the term starts as a no-op)."""
        super().__init__()
        from charadapter.projection import ImageProjection

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.image_proj = ImageProjection(CLIP_PROJECTION, context_dim, tokens)
            if text_kv is not None:
                self.to_k_ip = torch.nn.ParameterList(torch.nn.Parameter(k.detach().clone().float()) for k, _ in text_kv)
                self.to_v_ip = torch.nn.ParameterList(torch.nn.Parameter(v.detach().clone().float()) for _, v in text_kv)
                return
            self.to_k_ip = torch.nn.ParameterList(
                torch.nn.Parameter(torch.randn(w, context_dim) * context_dim ** -0.5) for w in layer_widths)
            self.to_v_ip = torch.nn.ParameterList(
                torch.nn.Parameter(torch.zeros(w, context_dim)) for w in layer_widths)  # starts as a no-op

    def state_dict_flat(self, dtype: torch.dtype = torch.float16) -> Dict[str, torch.Tensor]:
        """The .safetensors layout of h94/IP-Adapter."""
        sd = {"image_proj." + k: v for k, v in self.image_proj.state_dict().items()}
        for i, (k, v) in enumerate(zip(self.to_k_ip, self.to_v_ip)):
            sd[f"ip_adapter.{2 * i + 1}.to_k_ip.weight"] = k
            sd[f"ip_adapter.{2 * i + 1}.to_v_ip.weight"] = v
        return {k: v.detach().to(dtype).contiguous() for k, v in sd.items()}

    def load_flat(self, sd: Dict[str, torch.Tensor]) -> "ToyAdapter":
        """Start from a saved adapter file's tensors (state_dict_flat's layout), in float32."""
        proj = {k[len("image_proj."):]: v.float() for k, v in sd.items() if k.startswith("image_proj.")}
        self.image_proj.load_state_dict(proj)
        with torch.no_grad():
            for i, (k, v) in enumerate(zip(self.to_k_ip, self.to_v_ip)):
                k.copy_(sd[f"ip_adapter.{2 * i + 1}.to_k_ip.weight"].float())
                v.copy_(sd[f"ip_adapter.{2 * i + 1}.to_v_ip.weight"].float())
        return self


def save_image_side(clip, adapter: ToyAdapter, directory: str = WEIGHTS) -> None:
    """CLIP vision in HF folder format (fp16) and the adapter file."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    clip.to(torch.float16).save_pretrained(os.path.join(directory, CLIP_DIR), safe_serialization=True)
    clip.float()
    save_file(adapter.state_dict_flat(), os.path.join(directory, ADAPTER_FILE))


def load_image_side(directory: str = WEIGHTS):
    """(IPAdapterWeights, CLIP vision model) through the extension's own loaders, unchanged."""
    from charadapter.checkpoint import load_ip_adapter
    from charadapter.clip_vision import load_clip_vision

    return load_ip_adapter(os.path.join(directory, ADAPTER_FILE)), load_clip_vision(os.path.join(directory, CLIP_DIR))


def weights_present(directory: Optional[str] = None) -> bool:
    directory = directory or WEIGHTS
    return all(os.path.exists(os.path.join(directory, f)) for f in (SD_FILE, SD_CONFIG, CLIP_DIR, ADAPTER_FILE))
