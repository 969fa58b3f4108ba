"""IP-Adapter image projections: CLIP image features -> image tokens in the UNet's context space.

Three layouts exist in the published files, told apart by their keys and sized from their
shapes (never from file names):

- "linear"    (base models): image_embeds (B, E) -> Linear -> (B, T, C) -> LayerNorm.
- "resampler" (Plus / Plus-Face): a perceiver that lets T learned queries attend to the
  encoder's penultimate hidden states (B, S, W), S = encoder positions, W = encoder width.
- "mlp"       (Full-Face): every hidden state (B, S, W) -> MLP -> (B, S, C), T = S.

Parameter names equal the file keys after the "image_proj." prefix, so that
`load_state_dict(strict=True)` loads a file as it is.
"""

import math
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Protocol, Tuple

import torch
import torch.nn as nn

from .errors import CharacterAdapterError, CheckpointError

# Heads are not recoverable from shapes (only heads * dim_head is). Every published Plus model
# (SD1.5: 12 x 64, SDXL vit-h: 20 x 64), ComfyUI_IPAdapter_plus and diffusers' converter use 64.
RESAMPLER_DIM_HEAD = 64
# Full-Face projects every hidden state of ViT-H/14 at 224 px: 16 * 16 patches + CLS.
FULL_FACE_TOKENS = 257

Shape = Tuple[int, ...]


class ProjectionWeights(Protocol):
    """What building a projection reads of a checkpoint (checkpoint.IPAdapterWeights has it)."""

    image_proj: Mapping[str, torch.Tensor]  # file keys without the "image_proj." prefix
    source: str  # the file, for messages


@dataclass(frozen=True)
class ProjectionConfig:
    kind: str  # "linear" | "resampler" | "mlp"
    in_dim: int  # width of the CLIP features fed in (E or W)
    out_dim: int  # context width C of the UNet
    num_tokens: int  # image tokens T per image
    hidden_dim: int = 0  # resampler width (latents, attention) or mlp hidden width
    depth: int = 0  # resampler blocks
    heads: int = 0  # resampler attention heads H
    dim_head: int = 0  # resampler head width D
    ff_dim: int = 0  # resampler feed-forward inner width


# ---------------------------------------------------------------- shape inference


def _shape(state: Mapping[str, torch.Tensor], key: str) -> Shape:
    """Shape of state[key] as a tuple of ints."""
    return tuple(int(s) for s in state[key].shape)


def _fmt(shape: Shape) -> str:
    """A shape written as [a, b]."""
    return "[" + ", ".join(str(s) for s in shape) + "]"


def _where(source: str) -> str:
    """Message prefix naming the file, or nothing."""
    return f"{source}: " if source else ""


def _require(state: Mapping[str, torch.Tensor], keys: List[str], layout: str, source: str) -> None:
    """Raise unless every key is present."""
    missing = [k for k in keys if k not in state]
    if missing:
        raise CheckpointError(
            f"{_where(source)}image_proj looks like the {layout} projection but lacks "
            f"{['image_proj.' + k for k in missing]}"
        )


def projection_kind(state: Mapping[str, torch.Tensor]) -> str:
    """'linear', 'resampler' or 'mlp' from the key names alone; '' when none matches."""
    if "latents" in state:
        return "resampler"
    if "proj.3.weight" in state:
        return "mlp"
    if "proj.weight" in state:
        return "linear"
    return ""


def _linear_config(state: Mapping[str, torch.Tensor], source: str, context: Optional[int]) -> ProjectionConfig:
    """Config of the base projection: tokens = proj rows / context width (else norm width)."""
    _require(state, ["proj.weight", "norm.weight"], "base (Linear + LayerNorm)", source)
    rows, in_dim = _shape(state, "proj.weight")
    origin = "the attention layers' context width"
    if context is None:
        context, origin = _shape(state, "norm.weight")[0], "the width of image_proj.norm.weight"
    if context <= 0 or rows % context:
        raise CheckpointError(
            f"{_where(source)}image_proj.proj.weight has {rows} rows, not a whole number of "
            f"tokens of width {context} ({origin})"
        )
    return ProjectionConfig("linear", in_dim, context, rows // context)


def _layer_indices(state: Mapping[str, torch.Tensor], source: str) -> int:
    """Resampler depth: layers.0 .. layers.{n-1}, with no gaps."""
    found = sorted({int(k.split(".")[1]) for k in state if k.startswith("layers.") and k.split(".")[1].isdigit()})
    if found != list(range(len(found))) or not found:
        raise CheckpointError(
            f"{_where(source)}image_proj resampler blocks should be numbered 0..n-1, found {found}"
        )
    return len(found)


def _resampler_config(state: Mapping[str, torch.Tensor], source: str) -> ProjectionConfig:
    """Config of the Plus resampler, every size read from a shape."""
    _require(
        state,
        ["latents", "proj_in.weight", "proj_out.weight", "norm_out.weight", "layers.0.0.to_q.weight",
         "layers.0.1.1.weight"],
        "Plus (Resampler)",
        source,
    )
    latents = _shape(state, "latents")
    if len(latents) != 3 or latents[0] != 1:
        raise CheckpointError(f"{_where(source)}image_proj.latents should be [1, T, C], found {_fmt(latents)}")
    _, queries, dim = latents
    inner = _shape(state, "layers.0.0.to_q.weight")[0]
    if inner % RESAMPLER_DIM_HEAD:
        raise CheckpointError(
            f"{_where(source)}image_proj.layers.0.0.to_q.weight has {inner} rows, not a multiple of the "
            f"head width {RESAMPLER_DIM_HEAD} that all published Plus models use"
        )
    return ProjectionConfig(
        kind="resampler",
        in_dim=_shape(state, "proj_in.weight")[1],
        out_dim=_shape(state, "proj_out.weight")[0],
        num_tokens=queries,
        hidden_dim=dim,
        depth=_layer_indices(state, source),
        heads=inner // RESAMPLER_DIM_HEAD,
        dim_head=RESAMPLER_DIM_HEAD,
        ff_dim=_shape(state, "layers.0.1.1.weight")[0],
    )


def _mlp_config(state: Mapping[str, torch.Tensor], source: str) -> ProjectionConfig:
    """Config of the Full-Face MLP (proj.0 Linear, proj.2 Linear, proj.3 LayerNorm)."""
    _require(state, ["proj.0.weight", "proj.2.weight", "proj.3.weight"], "Full-Face (MLP)", source)
    hidden, in_dim = _shape(state, "proj.0.weight")
    return ProjectionConfig("mlp", in_dim, _shape(state, "proj.2.weight")[0], FULL_FACE_TOKENS, hidden_dim=hidden)


def expected_shapes(cfg: ProjectionConfig) -> Dict[str, Shape]:
    """Every key (without "image_proj.") and shape that a projection with this config has."""
    c = cfg.out_dim
    if cfg.kind == "linear":
        rows = cfg.num_tokens * c
        return {"proj.weight": (rows, cfg.in_dim), "proj.bias": (rows,), "norm.weight": (c,), "norm.bias": (c,)}
    if cfg.kind == "mlp":
        h = cfg.hidden_dim
        return {
            "proj.0.weight": (h, cfg.in_dim), "proj.0.bias": (h,),
            "proj.2.weight": (c, h), "proj.2.bias": (c,),
            "proj.3.weight": (c,), "proj.3.bias": (c,),
        }
    d, inner, ff = cfg.hidden_dim, cfg.heads * cfg.dim_head, cfg.ff_dim
    shapes = {
        "latents": (1, cfg.num_tokens, d),
        "proj_in.weight": (d, cfg.in_dim), "proj_in.bias": (d,),
        "proj_out.weight": (c, d), "proj_out.bias": (c,),
        "norm_out.weight": (c,), "norm_out.bias": (c,),
    }
    for i in range(cfg.depth):
        p = f"layers.{i}."
        shapes.update({
            p + "0.norm1.weight": (d,), p + "0.norm1.bias": (d,),
            p + "0.norm2.weight": (d,), p + "0.norm2.bias": (d,),
            p + "0.to_q.weight": (inner, d),
            p + "0.to_kv.weight": (2 * inner, d),
            p + "0.to_out.weight": (d, inner),
            p + "1.0.weight": (d,), p + "1.0.bias": (d,),
            p + "1.1.weight": (ff, d),
            p + "1.3.weight": (d, ff),
        })
    return shapes


def check_shapes(state: Mapping[str, torch.Tensor], cfg: ProjectionConfig, source: str = "") -> None:
    """Raise CheckpointError listing missing, unexpected and wrongly sized image_proj tensors."""
    want = expected_shapes(cfg)
    missing = ["image_proj." + k for k in want if k not in state]
    unexpected = ["image_proj." + k for k in state if k not in want]
    wrong = [f"image_proj.{k} {_fmt(_shape(state, k))} (expected {_fmt(want[k])})"
             for k in want if k in state and _shape(state, k) != want[k]]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            parts.append("wrong shapes: " + "; ".join(wrong[:8]))
        if missing:
            parts.append(f"missing: {missing[:8]}")
        if unexpected:
            parts.append(f"unexpected: {unexpected[:8]}")
        raise CheckpointError(
            f"{_where(source)}image_proj is not a consistent {cfg.kind} projection "
            f"(in {cfg.in_dim}, out {cfg.out_dim}, {cfg.num_tokens} tokens): " + "; ".join(parts)
        )


def infer_projection_config(state: Mapping[str, torch.Tensor], source: str = "",
                            context: Optional[int] = None) -> ProjectionConfig:
    """Read every hyper-parameter of the projection from the shapes of its state dict;
    `context` (known from the attention layers) sizes the base projection's tokens."""
    kind = projection_kind(state)
    if kind == "linear":
        cfg = _linear_config(state, source, context)
    elif kind == "resampler":
        cfg = _resampler_config(state, source)
    elif kind == "mlp":
        cfg = _mlp_config(state, source)
    else:
        raise CheckpointError(
            f"{_where(source)}image_proj matches no known projection (expected proj.weight, latents "
            f"or proj.3.weight), found keys {sorted(state)[:10]}"
        )
    check_shapes(state, cfg, source)
    return cfg


# ---------------------------------------------------------------- modules


def _check_width(x: torch.Tensor, ndim: int, width: int, what: str) -> None:
    """Raise when the features have the wrong rank or width for this projection."""
    if x.ndim != ndim or x.shape[-1] != width:
        want = "(B, E)" if ndim == 2 else "(B, S, W)"
        raise CharacterAdapterError(
            f"the IP-Adapter projection expects {what} {want} with width {width}, got shape "
            f"{list(x.shape)}: is the CLIP vision encoder the one this adapter was trained with?"
        )


class ImageProjection(nn.Module):
    """Base IP-Adapter projection: one CLIP image embedding -> T context tokens."""

    def __init__(self, in_dim: int, context_dim: int, num_tokens: int):
        super().__init__()
        self.num_tokens = num_tokens
        self.context_dim = context_dim
        self.proj = nn.Linear(in_dim, num_tokens * context_dim)
        self.norm = nn.LayerNorm(context_dim)

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        _check_width(image_embeds, 2, self.proj.in_features, "image_embeds")
        x = self.proj(image_embeds.to(self.proj.weight.dtype))  # (B, T*C)
        x = x.reshape(x.shape[0], self.num_tokens, self.context_dim)  # (B, T, C)
        return self.norm(x)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, T, H*D) -> (B, H, T, D)."""
    b, t, _ = x.shape
    return x.reshape(b, t, heads, -1).transpose(1, 2)  # (B, H, T, D)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, T, D) -> (B, T, H*D)."""
    b, h, t, d = x.shape
    return x.transpose(1, 2).reshape(b, t, h * d)  # (B, T, H*D)


class LatentAttention(nn.Module):
    """Perceiver attention: queries from the latents, keys/values from [features; latents]."""

    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        self.heads = heads
        self.scale = dim_head ** -0.5
        inner = heads * dim_head
        self.norm1 = nn.LayerNorm(dim)  # for the image features
        self.norm2 = nn.LayerNorm(dim)  # for the latents
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x)  # (B, S, C)
        latents = self.norm2(latents)  # (B, T, C)
        q = split_heads(self.to_q(latents), self.heads)  # (B, H, T, D)
        kv_in = torch.cat([x, latents], dim=1)  # (B, S+T, C)
        k, v = self.to_kv(kv_in).chunk(2, dim=-1)  # each (B, S+T, H*D)
        k, v = split_heads(k, self.heads), split_heads(v, self.heads)  # (B, H, S+T, D)
        # logits and softmax in fp32: fp16 logits overflow for long sequences
        logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * self.scale  # (B, H, T, S+T)
        out = torch.matmul(logits.softmax(dim=-1).to(v.dtype), v)  # (B, H, T, D)
        return self.to_out(merge_heads(out))  # (B, T, C)


def feed_forward(dim: int, inner: int) -> nn.Sequential:
    """Pre-norm MLP of a resampler block; indices 0..3 match the file keys."""
    return nn.Sequential(
        nn.LayerNorm(dim), nn.Linear(dim, inner, bias=False), nn.GELU(),
        nn.Linear(inner, dim, bias=False),
    )


class Resampler(nn.Module):
    """IP-Adapter Plus projection: T learned queries read the encoder's hidden states."""

    def __init__(self, in_dim: int, dim: int, out_dim: int, num_tokens: int, depth: int, heads: int,
                 dim_head: int, ff_dim: int):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(1, num_tokens, dim) / math.sqrt(dim))
        self.proj_in = nn.Linear(in_dim, dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([LatentAttention(dim, heads, dim_head), feed_forward(dim, ff_dim)])
            for _ in range(depth)
        )
        self.proj_out = nn.Linear(dim, out_dim)
        self.norm_out = nn.LayerNorm(out_dim)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        _check_width(hidden_states, 3, self.proj_in.in_features, "penultimate hidden states")
        x = self.proj_in(hidden_states.to(self.proj_in.weight.dtype))  # (B, S, C)
        latents = self.latents.expand(x.shape[0], -1, -1)  # (B, T, C)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))  # (B, T, C_out)


class MLPProjection(nn.Module):
    """IP-Adapter Full-Face projection: each hidden state -> one context token."""

    def __init__(self, in_dim: int, hidden_dim: int, context_dim: int):
        super().__init__()
        self.proj = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, context_dim),
            nn.LayerNorm(context_dim),
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        _check_width(hidden_states, 3, self.proj[0].in_features, "penultimate hidden states")
        return self.proj(hidden_states.to(self.proj[0].weight.dtype))  # (B, S, C)


def projection_from_config(cfg: ProjectionConfig) -> nn.Module:
    """An untrained projection module of the given layout and sizes."""
    if cfg.kind == "linear":
        return ImageProjection(cfg.in_dim, cfg.out_dim, cfg.num_tokens)
    if cfg.kind == "mlp":
        return MLPProjection(cfg.in_dim, cfg.hidden_dim, cfg.out_dim)
    if cfg.kind == "resampler":
        return Resampler(cfg.in_dim, cfg.hidden_dim, cfg.out_dim, cfg.num_tokens, cfg.depth, cfg.heads,
                         cfg.dim_head, cfg.ff_dim)
    raise CheckpointError(f"unknown projection kind {cfg.kind!r}")


def build_image_projection(weights: ProjectionWeights, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The checkpoint's image projection, weights loaded strictly, in eval mode, in `dtype`."""
    cfg = infer_projection_config(weights.image_proj, weights.source)
    module = projection_from_config(cfg)
    try:
        module.load_state_dict(dict(weights.image_proj), strict=True)
    except RuntimeError as e:  # check_shapes makes this unreachable unless the two drift apart
        raise CheckpointError(f"{weights.source}: image_proj does not load into {type(module).__name__}: {e}") from e
    return module.to(dtype=dtype).eval().requires_grad_(False)
