"""Random-valued IP-Adapter files with the real key names and shapes, and broken files.

Layouts follow the published h94/IP-Adapter files (read in tencent-ailab/IP-Adapter
ip_adapter/ip_adapter.py, resampler.py; diffusers loaders/unet.py
_convert_ip_adapter_image_proj_to_diffusers / _convert_ip_adapter_attn_to_diffusers):

- base:  image_proj.proj.{weight,bias} [T*C, E], image_proj.norm.{weight,bias} [C]
- Plus:  image_proj.latents [1, T, D], proj_in [D, W], layers.{i}.0.{norm1,norm2,to_q,to_kv,to_out},
         layers.{i}.1.{0,1,3} (LayerNorm, Linear, -, Linear; no biases on the Linears),
         proj_out [C, D], norm_out [C]
- Full-Face: image_proj.proj.{0,2,3} (Linear W->W, Linear W->C, LayerNorm C)
- every variant: ip_adapter.{2i+1}.to_k_ip.weight / to_v_ip.weight [width_i, C]

Layer i's width follows diffusers' `unet.attn_processors` order (down_blocks, up_blocks,
mid_block: the order UNet2DConditionModel.__init__ registers them), pinned against a tiny
diffusers UNet in test_checkpoint.py.
"""

import functools
import os
import shlex
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Sequence, Tuple

import torch

# SD1.5 attn2 widths: down 320,320,640,640,1280,1280; up 1280x3, 640x3, 320x3; mid 1280.
SD15_WIDTHS: Tuple[int, ...] = (320, 320, 640, 640, 1280, 1280) + (1280,) * 3 + (640,) * 3 + (320,) * 3 + (1280,)
# SDXL: transformer depth 1/2/10 per level, no attention at 320. down 640: 2 blocks x 2, 1280:
# 2 x 10; up 1280: 3 x 10, 640: 3 x 2; mid 1280: 1 x 10.
SDXL_WIDTHS: Tuple[int, ...] = (640,) * 4 + (1280,) * 20 + (1280,) * 30 + (640,) * 6 + (1280,) * 10
WIDTHS = {"sd15": SD15_WIDTHS, "sdxl": SDXL_WIDTHS}
CONTEXT = {"sd15": 768, "sdxl": 2048}


@dataclass(frozen=True)
class FakeVariant:
    """A published IP-Adapter file and the spec the loader must report for it."""

    file_name: str  # the real file name on h94/IP-Adapter
    expected: str  # spec.variant the loader must detect
    arch: str
    projection: str  # "linear" | "resampler" | "mlp"
    clip_dim: int  # width of the features the projection takes
    encoder: str
    num_tokens: int
    resampler_dim: int = 0
    resampler_heads: int = 0


VARIANTS: Dict[str, FakeVariant] = {
    "sd15": FakeVariant("ip-adapter_sd15.safetensors", "sd15", "sd15", "linear", 1024, "ViT-H-14", 4),
    "sd15_light": FakeVariant("ip-adapter_sd15_light.safetensors", "sd15", "sd15", "linear", 1024, "ViT-H-14", 4),
    "sd15_vitg": FakeVariant("ip-adapter_sd15_vit-G.safetensors", "sd15_vitg", "sd15", "linear", 1280, "ViT-bigG-14",
                             4),
    "sd15_plus": FakeVariant("ip-adapter-plus_sd15.safetensors", "sd15_plus", "sd15", "resampler", 1280, "ViT-H-14",
                             16, 768, 12),
    "sd15_plus_face": FakeVariant("ip-adapter-plus-face_sd15.safetensors", "sd15_plus", "sd15", "resampler", 1280,
                                  "ViT-H-14", 16, 768, 12),
    "sd15_full_face": FakeVariant("ip-adapter-full-face_sd15.safetensors", "sd15_full_face", "sd15", "mlp", 1280,
                                  "ViT-H-14", 257),
    "sdxl": FakeVariant("ip-adapter_sdxl.safetensors", "sdxl", "sdxl", "linear", 1280, "ViT-bigG-14", 4),
    "sdxl_vith": FakeVariant("ip-adapter_sdxl_vit-h.safetensors", "sdxl_vith", "sdxl", "linear", 1024, "ViT-H-14", 4),
    "sdxl_vith_plus": FakeVariant("ip-adapter-plus_sdxl_vit-h.safetensors", "sdxl_vith_plus", "sdxl", "resampler",
                                  1280, "ViT-H-14", 16, 1280, 20),
    "sdxl_vith_plus_face": FakeVariant("ip-adapter-plus-face_sdxl_vit-h.safetensors", "sdxl_vith_plus", "sdxl",
                                       "resampler", 1280, "ViT-H-14", 16, 1280, 20),
}

_SMALL = 1 << 16  # tensors up to this size are drawn; larger ones are cut from a drawn pool
_POOL = 1 << 22  # so that 70 SDXL layers and a 1280-wide Resampler stay cheap to make


class Filler:
    """Cheap seeded random tensors: small ones drawn, big ones cut (or tiled) from a pool;
    zeros=True gives all-zero tensors (for tests that only need shapes)."""

    def __init__(self, seed: int = 0, dtype: torch.dtype = torch.float32, zeros: bool = False):
        self.gen = torch.Generator().manual_seed(seed)
        self.dtype = dtype
        self.zeros = zeros
        self._pool: Optional[torch.Tensor] = None

    def normal(self, shape: Sequence[int], std: float = 0.02, mean: float = 0.0) -> torch.Tensor:
        """A tensor of the given shape, roughly N(mean, std^2)."""
        shape = tuple(int(s) for s in shape)
        if self.zeros:
            return torch.zeros(shape, dtype=self.dtype)
        n = 1
        for s in shape:
            n *= s
        if n <= _SMALL:
            x = torch.randn(n, generator=self.gen)
        else:
            if self._pool is None:
                self._pool = torch.randn(2 * _POOL, generator=self.gen)
            if n <= _POOL:  # a window at a random offset, so that no two tensors are equal
                start = int(torch.randint(0, _POOL, (1,), generator=self.gen))
                x = self._pool[start:start + n]
            else:
                x = self._pool[:_POOL].repeat(n // _POOL + 1)[:n]
        x = (x * std).to(self.dtype)
        if mean:
            x += mean
        return x.reshape(shape)


def _linear(f: Filler, prefix: str, out_dim: int, in_dim: int, bias: bool = True) -> Dict[str, torch.Tensor]:
    """Weights of an nn.Linear under `prefix`."""
    sd = {prefix + "weight": f.normal((out_dim, in_dim), std=in_dim ** -0.5)}
    if bias:
        sd[prefix + "bias"] = f.normal((out_dim,), std=0.02)
    return sd


def _norm(f: Filler, prefix: str, dim: int) -> Dict[str, torch.Tensor]:
    """Weights of an nn.LayerNorm under `prefix`, near identity."""
    return {prefix + "weight": f.normal((dim,), std=0.1, mean=1.0), prefix + "bias": f.normal((dim,), std=0.1)}


def linear_state(in_dim: int, num_tokens: int, context: int, f: Optional[Filler] = None) -> Dict[str, torch.Tensor]:
    """Base projection (ImageProjModel): keys as in the file, without "image_proj."."""
    f = f or Filler()
    return {**_linear(f, "proj.", num_tokens * context, in_dim), **_norm(f, "norm.", context)}


def mlp_state(in_dim: int, context: int, f: Optional[Filler] = None) -> Dict[str, torch.Tensor]:
    """Full-Face projection (MLPProjModel): proj.0 Linear, proj.2 Linear, proj.3 LayerNorm."""
    f = f or Filler()
    return {**_linear(f, "proj.0.", in_dim, in_dim), **_linear(f, "proj.2.", context, in_dim),
            **_norm(f, "proj.3.", context)}


def resampler_state(in_dim: int, dim: int, out_dim: int, num_queries: int, depth: int = 4, heads: int = 12,
                    dim_head: int = 64, ff_mult: int = 4, f: Optional[Filler] = None) -> Dict[str, torch.Tensor]:
    """Plus projection (Resampler), keys as in the file, without "image_proj."."""
    f = f or Filler()
    inner, ff = heads * dim_head, dim * ff_mult
    sd = {"latents": f.normal((1, num_queries, dim), std=dim ** -0.5)}
    sd.update(_linear(f, "proj_in.", dim, in_dim))
    for i in range(depth):
        p = f"layers.{i}."
        sd.update(_norm(f, p + "0.norm1.", dim))
        sd.update(_norm(f, p + "0.norm2.", dim))
        sd.update(_linear(f, p + "0.to_q.", inner, dim, bias=False))
        sd.update(_linear(f, p + "0.to_kv.", 2 * inner, dim, bias=False))
        sd.update(_linear(f, p + "0.to_out.", dim, inner, bias=False))
        sd.update(_norm(f, p + "1.0.", dim))
        sd.update(_linear(f, p + "1.1.", ff, dim, bias=False))
        sd.update(_linear(f, p + "1.3.", dim, ff, bias=False))
    sd.update(_linear(f, "proj_out.", out_dim, dim))
    sd.update(_norm(f, "norm_out.", out_dim))
    return sd


def ip_layers_state(widths: Sequence[int], context: int, f: Optional[Filler] = None,
                    width_div: int = 1) -> Dict[str, torch.Tensor]:
    """to_k_ip / to_v_ip of every attn2 layer, keys "{2i+1}.to_k_ip.weight" (no "ip_adapter.")."""
    f = f or Filler()
    sd = {}
    for i, w in enumerate(widths):
        for name in ("to_k_ip", "to_v_ip"):
            sd[f"{2 * i + 1}.{name}.weight"] = f.normal((w // width_div, context), std=context ** -0.5)
    return sd


def image_proj_state(v: FakeVariant, f: Filler) -> Dict[str, torch.Tensor]:
    """The projection of a published variant at its real shapes."""
    context = CONTEXT[v.arch]
    if v.projection == "linear":
        return linear_state(v.clip_dim, v.num_tokens, context, f)
    if v.projection == "mlp":
        return mlp_state(v.clip_dim, context, f)
    return resampler_state(v.clip_dim, v.resampler_dim, context, v.num_tokens, depth=4, heads=v.resampler_heads, f=f)


def flat(image_proj: Mapping[str, torch.Tensor], ip_adapter: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The .safetensors layout: one flat dict with section prefixes."""
    sd = {"image_proj." + k: v for k, v in image_proj.items()}
    sd.update({"ip_adapter." + k: v for k, v in ip_adapter.items()})
    return sd


def nested(sd: Mapping[str, torch.Tensor]) -> Dict[str, Dict[str, torch.Tensor]]:
    """The .bin layout: {"image_proj": {...}, "ip_adapter": {"1.to_k_ip.weight": ...}}."""
    out: Dict[str, Dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
    for key, value in sd.items():
        section, _, inner = key.partition(".")
        out[section][inner] = value
    return out


def variant_state(name: str, dtype: torch.dtype = torch.float16, width_div: int = 1, seed: int = 0,
                  zeros: bool = False) -> Dict[str, torch.Tensor]:
    """Flat state dict of a published variant (a fresh dict; tensors are shared, don't modify
    them in place). width_div > 1 narrows only the layers' output widths, to save memory:
    context widths and the projection keep their real shapes."""
    v = VARIANTS[name]
    layout = (v.arch, v.projection, v.clip_dim, v.num_tokens, v.resampler_dim, v.resampler_heads)
    return dict(_layout_state(layout, dtype, width_div, seed, zeros))


@functools.lru_cache(maxsize=2)
def _layout_state(layout: tuple, dtype: torch.dtype, width_div: int, seed: int, zeros: bool) -> Dict[str, torch.Tensor]:
    """Cached builder: Plus and Plus-Face share a layout, and bad-file tests reuse sd15."""
    arch, projection, clip_dim, num_tokens, resampler_dim, heads = layout
    v = FakeVariant("", "", arch, projection, clip_dim, "", num_tokens, resampler_dim, heads)
    f = Filler(seed, dtype, zeros)
    return flat(image_proj_state(v, f), ip_layers_state(WIDTHS[arch], CONTEXT[arch], f, width_div))


# ---------------------------------------------------------------- writers


def write_safetensors(sd: Mapping[str, torch.Tensor], path: str) -> str:
    """Write the flat layout as .safetensors."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, path)
    return path


def write_bin(sd: Mapping[str, torch.Tensor], path: str) -> str:
    """Write the nested layout with torch.save, as the IP-Adapter convert script does."""
    torch.save(nested(sd), path)
    return path


def write(sd: Mapping[str, torch.Tensor], path: str, fmt: str) -> str:
    """Write in format "safetensors" or "bin", whatever the path's name says."""
    return write_safetensors(sd, path) if fmt == "safetensors" else write_bin(sd, path)


# ---------------------------------------------------------------- files that must be refused


def _lora(f: Filler, prefix: str, in_dim: int, out_dim: int, rank: int) -> Dict[str, torch.Tensor]:
    """A diffusers LoRALinearLayer: down [rank, in], up [out, rank]."""
    return {prefix + "down.weight": f.normal((rank, in_dim)), prefix + "up.weight": f.normal((out_dim, rank))}


def faceid_state(rank: int = 128, dtype: torch.dtype = torch.float16) -> Dict[str, torch.Tensor]:
    """ip-adapter-faceid_sd15: MLP projection of a 512-d InsightFace embedding, LoRA in every
    attention (even keys = attn1, odd = attn2 with to_k_ip/to_v_ip)."""
    f = Filler(1, dtype)
    proj = {**_linear(f, "proj.0.", 1024, 512), **_linear(f, "proj.2.", 4 * 768, 1024), **_norm(f, "norm.", 768)}
    ip: Dict[str, torch.Tensor] = {}
    for i, w in enumerate(SD15_WIDTHS):
        for j, kv_in in ((2 * i, w), (2 * i + 1, 768)):
            ip.update(_lora(f, f"{j}.to_q_lora.", w, w, rank))
            ip.update(_lora(f, f"{j}.to_k_lora.", kv_in, w, rank))
            ip.update(_lora(f, f"{j}.to_v_lora.", kv_in, w, rank))
            ip.update(_lora(f, f"{j}.to_out_lora.", w, w, rank))
        ip[f"{2 * i + 1}.to_k_ip.weight"] = f.normal((w, 768))
        ip[f"{2 * i + 1}.to_v_ip.weight"] = f.normal((w, 768))
    return flat(proj, ip)


def faceid_portrait_state(dtype: torch.dtype = torch.float16) -> Dict[str, torch.Tensor]:
    """ip-adapter-faceid-portrait_sd15: FaceID projection (16 tokens) without LoRA keys."""
    f = Filler(2, dtype)
    proj = {**_linear(f, "proj.0.", 1024, 512), **_linear(f, "proj.2.", 16 * 768, 1024), **_norm(f, "norm.", 768)}
    return flat(proj, ip_layers_state(SD15_WIDTHS, 768, f))


def instantid_state(width_div: int = 16, dtype: torch.dtype = torch.float16) -> Dict[str, torch.Tensor]:
    """InstantID ip-adapter.bin: an SDXL Resampler fed 512-d InsightFace embeddings (zeros)."""
    f = Filler(3, dtype, zeros=True)
    return flat(resampler_state(512, 1280, 2048, 16, heads=20, f=f), ip_layers_state(SDXL_WIDTHS, 2048, f, width_div))


def controlnet_ldm_state() -> Dict[str, torch.Tensor]:
    """A few real keys of an ldm-layout ControlNet (control_v11p_sd15_openpose.pth)."""
    f = Filler(4)
    return {
        "control_model.input_blocks.0.0.weight": f.normal((320, 4, 3, 3)),
        "control_model.input_blocks.0.0.bias": f.normal((320,)),
        "control_model.input_hint_block.0.weight": f.normal((16, 3, 3, 3)),
        "control_model.zero_convs.0.0.weight": f.normal((320, 320, 1, 1)),
        "control_model.zero_convs.0.0.bias": f.normal((320,)),
        "control_model.middle_block_out.0.weight": f.normal((1280, 1280, 1, 1)),
    }


def controlnet_diffusers_state() -> Dict[str, torch.Tensor]:
    """A few real keys of a diffusers-layout ControlNet (diffusion_pytorch_model.safetensors)."""
    f = Filler(5)
    return {
        "conv_in.weight": f.normal((320, 4, 3, 3)),
        "controlnet_cond_embedding.conv_in.weight": f.normal((16, 3, 3, 3)),
        "controlnet_down_blocks.0.weight": f.normal((320, 320, 1, 1)),
        "controlnet_mid_block.weight": f.normal((1280, 1280, 1, 1)),
    }


def clip_vision_state() -> Dict[str, torch.Tensor]:
    """A few real keys of a transformers CLIPVisionModelWithProjection (ViT-H/14)."""
    f = Filler(6)
    return {
        "vision_model.embeddings.class_embedding": f.normal((1280,)),
        "vision_model.post_layernorm.weight": f.normal((1280,)),
        "visual_projection.weight": f.normal((1024, 1280)),
    }


def with_shape(sd: Mapping[str, torch.Tensor], key: str, shape: Sequence[int]) -> Dict[str, torch.Tensor]:
    """A copy of `sd` whose tensor `key` is replaced by a random one of another shape."""
    out = dict(sd)
    out[key] = Filler(7, sd[key].dtype).normal(shape)
    return out


def without(sd: Mapping[str, torch.Tensor], *prefixes: str) -> Dict[str, torch.Tensor]:
    """A copy of `sd` without the keys that start with any prefix."""
    return {k: v for k, v in sd.items() if not k.startswith(prefixes)}


def write_truncated(sd: Mapping[str, torch.Tensor], path: str, fmt: str, keep: float = 0.5) -> str:
    """Write a valid file, then cut it to `keep` of its size (an interrupted download)."""
    write(sd, path, fmt)
    size = os.path.getsize(path)
    with open(path, "r+b") as fh:
        fh.truncate(int(size * keep))
    return path


class RunsCode:
    """Pickles as a call to os.system: a weights-only unpickler must refuse it."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(self.marker)}",))


def write_malicious_bin(sd: Mapping[str, torch.Tensor], path: str, marker: str) -> str:
    """A .bin in the real nested layout with one object whose unpickling runs a command."""
    data = nested(sd)
    data["image_proj"]["norm.bias"] = RunsCode(marker)  # type: ignore[assignment]
    torch.save(data, path)
    return path
