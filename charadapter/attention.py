"""The region IP term and the text attention maps, computed from the host's own q and k.

Glossary for shapes: B batch rows, N = h*w positions, T tokens, H heads, D head dim,
R regions, C channels (C_inner = H*D, the width of to_q/to_k/to_v outputs).

Both go through torch's fused attention (F.scaled_dot_product_attention: one kernel on a GPU,
flash or memory-efficient, and one operator on a CPU), so what a layer launches does not grow
with the number of regions or tokens:
- the region term copies q R times along the head axis, (B, N, R*H, D), so one attention call
  gives every region its own softmax over its own tokens; the fused kernels store the result as
  (B, N, R, C), which the masks weigh and add to the host's attention output in one batched
  product (baddbmm, in place): 3 operators per layer for any R, 2 for one region;
- the text maps attend the text keys with values that are the averaging matrix (a column per
  region, 1/(H*|tokens|) on its tokens), so the attention output itself holds the maps, summed
  over heads in one reduction. Extra key rows (more tokens, e.g. a phrase's own embedding) are
  just more rows of k and of the values: nothing else changes.

float16 scores past 65504 are inf, and a softmax row holding inf is NaN. Where torch's attention
keeps the scores in float32 (CUDA's flash and memory-efficient kernels, the CPU) float16 inputs are
safe; its unfused "math" attention stores them in the input dtype (MPS, ROCm builds without fused
kernels). So the text maps always attend float16 q and k in float32 (`map_dtype`: a few small
grids per step, and the map queue's one copy does the cast), and the region term does where the
device may take the unfused path (`attention_dtype`).
"""

from typing import NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from .errors import CharacterAdapterError, GeometryError

TokenIndex = Union[torch.Tensor, Sequence[int]]


CAST_ROWS = 128  # weight rows cast at a time when the adapter's dtype is not the tokens'


def ip_keys_values(
    tokens: torch.Tensor, to_k_ip: torch.Tensor, to_v_ip: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Image tokens (..., T, C_ctx) -> IP keys and values (..., T, C_inner) of one layer, in the
    tokens' dtype whatever the weights' (an fp16 adapter beside an fp32 UNet)."""
    return _linear(tokens, to_k_ip), _linear(tokens, to_v_ip)


def _linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear with `weight` cast to x's dtype and device CAST_ROWS output rows at a time: a whole
    cast copy per layer (SDXL: 140 of 5-10 MB) left ~0.8 GB of freed but unreturned heap in the
    WebUI's process on the CPU; 1 MB pieces are reused."""
    if weight.dtype == x.dtype and weight.device == x.device:
        return F.linear(x, weight)
    parts = [F.linear(x, weight[i:i + CAST_ROWS].to(device=x.device, dtype=x.dtype))
             for i in range(0, weight.shape[0], CAST_ROWS)]  # each (..., T, rows)
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)  # (..., T, C_inner)


def map_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype text maps attend in: float32 for float16 (scores past 65504), else `dtype`."""
    return torch.float32 if dtype == torch.float16 else dtype


def attention_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype the region term attends in on `device` for a UNet in `dtype`: float32 for float16
    where attention may store float16 scores (every device but CUDA and the CPU, and ROCm), else
    `dtype`. The WebUI runs the CPU in float32; torch 2.1 has no float16 attention there."""
    if dtype != torch.float16 or device.type == "cpu" or (device.type == "cuda" and torch.version.hip is None):
        return dtype
    return torch.float32


def _as_regions(t: torch.Tensor, what: str) -> torch.Tensor:
    """Accept (R, B, T, C) or one region's (B, T, C); return (R, B, T, C)."""
    if t.ndim == 3:
        return t.unsqueeze(0)  # (1, B, T, C)
    if t.ndim != 4:
        raise GeometryError(f"{what}: expected (R, B, T, C) or (B, T, C), got {tuple(t.shape)}")
    return t


def _check_weights(weights: Optional[torch.Tensor], batch: int, regions: int) -> Optional[torch.Tensor]:
    """Weights as (B|1, R) float32 on their own device, or None."""
    if weights is None:
        return None
    w = torch.as_tensor(weights, dtype=torch.float32)
    if w.shape not in ((regions,), (batch, regions), (1, regions)):
        raise GeometryError(f"weights: expected ({regions},) or ({batch}, {regions}), got {tuple(w.shape)}")
    return w.reshape(-1, regions)  # (B or 1, R)


def mask_coefficients(masks: torch.Tensor, batch: int, regions: int, positions: int, dtype: torch.dtype,
                      device: torch.device) -> torch.Tensor:
    """Region masks (B|1, R, N) as the region term's coefficients (B, N, R), contiguous, in `dtype`
    (the region weights are folded into the values by `region_kv`)."""
    if masks.ndim != 3 or masks.shape[1] != regions or masks.shape[2] != positions or masks.shape[0] not in (1, batch):
        raise GeometryError(
            f"masks: expected (B={batch}, R={regions}, N={positions}), got {tuple(masks.shape)}"
        )
    coef = masks.to(device=device, dtype=dtype).transpose(1, 2)  # (B|1, N, R)
    return coef.expand(batch, positions, regions).contiguous()


def _check_kv(q_shape: Tuple[int, ...], keys: torch.Tensor, values: torch.Tensor, heads: int):
    """Keys and values as (R, B|1, T, C) after checking them against q (B, N, C) and heads."""
    keys, values = _as_regions(keys, "keys"), _as_regions(values, "values")
    batch, _, width = q_shape
    if values.shape != keys.shape:
        raise GeometryError(f"keys {tuple(keys.shape)} and values {tuple(values.shape)} differ")
    _, kb, _, kw = keys.shape
    if kw != width or kb not in (1, batch) or width % heads:
        raise GeometryError(
            f"q {tuple(q_shape)} with heads={heads} does not fit keys {tuple(keys.shape)} "
            f"(expected (R, {batch} or 1, T, {width}) and C divisible by heads)"
        )
    return keys, values


class RegionKV(NamedTuple):
    """IP keys and values of R regions for B rows, in the attention layout of `add_region_term`.

    Head axis r*H + h holds region r's head h; the region weights are folded into the values
    (the term is linear in them), so a step multiplies by nothing but the masks.
    """

    keys: torch.Tensor    # (B, R*H, T, D)
    values: torch.Tensor  # (B, R*H, T, D): w_r * V_r
    heads: int
    regions: int


def region_kv(keys: torch.Tensor, values: torch.Tensor, heads: int, batch: Optional[int] = None,
              weights: Optional[torch.Tensor] = None) -> RegionKV:
    """Keys and values (R, B|1, T, C) [and weights (R,) or (B, R)] -> RegionKV for `batch` rows.

    Built once per layer, row layout and token set (per generation), never per call.
    """
    keys, values = _as_regions(keys, "keys"), _as_regions(values, "values")
    regions, rows, tokens, width = keys.shape
    if values.shape != keys.shape or width % heads:
        raise GeometryError(f"keys {tuple(keys.shape)} / values {tuple(values.shape)} do not split into {heads} heads")
    batch = rows if batch is None else batch
    dim = width // heads
    w = _check_weights(weights, batch, regions)
    if w is not None:
        values = values * w.to(device=values.device, dtype=values.dtype).t().reshape(regions, -1, 1, 1)  # (R, B|1, 1, 1)
    keys = keys.expand(regions, batch, tokens, width).reshape(regions, batch, tokens, heads, dim)
    values = values.expand(regions, batch, tokens, width).reshape(regions, batch, tokens, heads, dim)
    kh = keys.permute(1, 0, 3, 2, 4).reshape(batch, regions * heads, tokens, dim)  # (B, R*H, T, D)
    vh = values.permute(1, 0, 3, 2, 4).reshape(batch, regions * heads, tokens, dim)  # (B, R*H, T, D)
    return RegionKV(kh.contiguous(), vh.contiguous(), heads, regions)


def _in_place_ok(out: torch.Tensor) -> bool:
    """The host's attention output can take the term in place: contiguous, no autograd on it."""
    return out.is_contiguous() and not (out.requires_grad and torch.is_grad_enabled())


def add_region_term(out: torch.Tensor, q: torch.Tensor, kv: RegionKV,
                    coef: Optional[torch.Tensor] = None) -> torch.Tensor:
    """out + Sum_r coef_r * softmax(q K_r^T / sqrt(D)) (w_r V_r), per head -> (B, N, C).

    out and q (B, N, C) in kv's dtype; coef (B, N, R) (any layout that views as (B*N, 1, R)) or
    None (= 1). `out` is updated in place when it can be (the host's attention output, about to
    go through to_out[0]) and returned. Operators: R == 1: attention + add; R > 1: the q copy,
    attention, baddbmm. With float32 kv for a float16 q (`attention_dtype`): one more (the cast
    of q, or a bmm and an add for the baddbmm).
    """
    batch, positions, width = q.shape
    heads, regions = kv.heads, kv.regions
    dim = width // heads
    dtype = kv.keys.dtype  # float32 for a float16 q where `attention_dtype` says so
    if regions == 1:
        qh = q.view(batch, positions, heads, dim).transpose(1, 2).to(dtype)  # (B, H, N, D)
    else:
        qr = torch.empty(batch, positions, regions, width, dtype=dtype, device=q.device)  # (B, N, R, C)
        qr.copy_(q.view(batch, positions, 1, width).expand(batch, positions, regions, width))  # the copy casts
        qh = qr.view(batch, positions, regions * heads, dim).transpose(1, 2)  # (B, R*H, N, D)
    o = F.scaled_dot_product_attention(qh, kv.keys, kv.values)  # (B, R*H, N, D), stored as (B, N, R*H, D)
    o = o.transpose(1, 2).reshape(batch * positions, regions, width)  # (B*N, R, C): a view after fused kernels
    if not _in_place_ok(out):
        out = out.clone(memory_format=torch.contiguous_format)
    if regions == 1:
        o = o.view(batch, positions, width)  # (B, N, C)
        if coef is None:
            return out.add_(o)  # casts in place when o is float32 and out float16
        return out.addcmul_(o, coef.reshape(batch, positions, 1))  # (B, N, 1) broadcast over C
    if coef is None:
        coef = torch.ones(1, 1, 1, dtype=o.dtype, device=o.device).expand(batch * positions, 1, regions)
    coef = coef.reshape(batch * positions, 1, regions)  # (B*N, 1, R)
    base = out.view(batch * positions, 1, width)  # (B*N, 1, C)
    if base.dtype == o.dtype and coef.dtype == o.dtype:
        base.baddbmm_(coef, o)  # (B*N, 1, R) @ (B*N, R, C)
    else:  # attended in float32 for a float16 out: one operator more
        base.add_(torch.bmm(coef.to(o.dtype), o))
    return out


def region_ip_delta(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    heads: int,
    masks: Optional[torch.Tensor] = None,
    weights: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Sum over regions of w_r * M_r * softmax(q K_r^T / sqrt(D)) V_r, per head -> (B, N, C_inner).

    q (B, N, C); keys/values (R, B, T, C) or (B, T, C) for one region (B may be 1: shared by all
    rows); masks (B, R, N) or None (= 1); weights (R,) or (B, R) or None (= 1). The result is in
    to_out's input space: the caller adds ``delta @ to_out[0].weight.T``.
    """
    keys, values = _check_kv(tuple(q.shape), keys, values, heads)
    batch, positions, _ = q.shape
    regions = keys.shape[0]
    dtype = attention_dtype(q.dtype, q.device)
    kv = region_kv(keys.to(dtype), values.to(dtype), heads, batch, weights)  # checks the weights
    coef = None if masks is None else mask_coefficients(masks, batch, regions, positions, dtype, q.device)
    return add_region_term(torch.zeros_like(q), q, kv, coef)


# ---- text attention maps ---------------------------------------------------------------------


def _token_list(token_index: TokenIndex, tokens: int) -> list:
    """Token columns as ints, checked against the key length T (on the host: no device sync)."""
    if isinstance(token_index, torch.Tensor):
        token_index = token_index.reshape(-1).tolist()
    idx = [int(i) for i in token_index]
    if not idx:
        raise CharacterAdapterError("token_index is empty: no text token to make a map from")
    if min(idx) < 0 or max(idx) >= tokens:
        raise CharacterAdapterError(
            f"token_index spans {min(idx)}..{max(idx)}, but the text keys have T={tokens} tokens"
        )
    return idx


def _check_text(q: torch.Tensor, k: torch.Tensor, heads: int) -> None:
    batch, _, width = q.shape
    if k.ndim != 3 or k.shape[2] != width or k.shape[0] != batch or width % heads:
        raise GeometryError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} with heads={heads}: expected k (B={batch}, T, C={width})"
        )


def map_value_width(regions: int, head_dim: int) -> int:
    """Ev, the width of the map values: D when the background and R region columns fit (the fused
    kernels want values as wide as the keys), else R+1 (torch's unfused attention)."""
    return head_dim if regions + 1 <= head_dim else regions + 1


def text_map_values(
    token_groups: Sequence[Sequence[int]], tokens: int, heads: int, head_dim: int,
    device: Optional[torch.device] = None, dtype: torch.dtype = torch.float32, allow_empty: bool = False,
) -> torch.Tensor:
    """(H, T, Ev) values that turn text attention into maps: column 0 is the background (zeros),
    column 1+r averages region r's tokens (1/(H*|tokens|): summed over heads it is the mean).

    An empty group (allowed only with `allow_empty`) gives a column of zeros: no evidence.
    """
    if not token_groups or (not allow_empty and any(len(g) == 0 for g in token_groups)):
        raise CharacterAdapterError(
            f"every region needs at least one token column, got groups {[list(g) for g in token_groups]}")
    width = map_value_width(len(token_groups), head_dim)
    values = torch.zeros(tokens, width)  # (T, Ev)
    for r, group in enumerate(token_groups):
        if len(group) == 0:
            continue
        for t in _token_list(group, tokens):
            values[t, r + 1] += 1.0 / (heads * len(group))
    return values.expand(heads, tokens, width).to(device=device, dtype=dtype).contiguous()  # (H, T, Ev)


def text_attention_raw(q: torch.Tensor, k: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Text attention of q (B, N, C) over k (B, T, C) applied to `values` (B|1, H, T, Ev)
    -> (B, N, H, Ev): per head, sum_t softmax(q k^T / sqrt(D))_t values[t]. One fused operator,
    in `map_dtype` (inputs already in it cost no cast)."""
    dtype = map_dtype(q.dtype)
    q, k, values = q.to(dtype), k.to(dtype), values.to(dtype)
    batch, positions, width = q.shape
    heads, tokens, ev = values.shape[-3:]
    dim = width // heads
    qh = q.view(batch, positions, heads, dim).transpose(1, 2)  # (B, H, N, D)
    kh = k.view(batch, tokens, heads, dim).transpose(1, 2)  # (B, H, T, D)
    if values.ndim == 3 or values.shape[0] != batch:
        values = values.expand(batch, heads, tokens, ev)  # (B, H, T, Ev)
    return F.scaled_dot_product_attention(qh, kh, values).transpose(1, 2)  # (B, N, H, Ev); scale 1/sqrt(D)


def text_maps(q: torch.Tensor, k: torch.Tensor, values: torch.Tensor, regions: int) -> torch.Tensor:
    """Region maps (B, R, N) float32 from `text_map_values` (H, T, Ev): mean text attention over
    heads and each region's tokens. q (B, N, C), k (B, T, C)."""
    raw = text_attention_raw(q, k, values)  # (B, N, H, Ev)
    return raw[..., 1:regions + 1].sum(dim=2, dtype=torch.float32).transpose(1, 2)  # (B, R, N)


def text_region_maps(
    q: torch.Tensor, k: torch.Tensor, heads: int, token_groups: Sequence[Sequence[int]], allow_empty: bool = False,
) -> torch.Tensor:
    """Region maps (B, R, N): mean text attention over each region phrase's tokens and heads."""
    _check_text(q, k, heads)
    values = text_map_values(token_groups, k.shape[1], heads, q.shape[2] // heads, q.device, map_dtype(q.dtype),
                             allow_empty)
    return text_maps(q, k, values, len(token_groups))


def text_attention_probs(q: torch.Tensor, k: torch.Tensor, heads: int, token_index: TokenIndex) -> torch.Tensor:
    """Text cross-attention probabilities softmax(q k^T / sqrt(D)), mean over heads, of the
    given token columns -> (B, J, N) with J = len(token_index). Computed in float32."""
    _check_text(q, k, heads)
    idx = _token_list(token_index, k.shape[1])
    return text_region_maps(q, k, heads, [[i] for i in idx])


def phrase_maps(probs: torch.Tensor, groups: Sequence[Sequence[int]]) -> torch.Tensor:
    """Average token maps (B, J, N) within each group of column positions -> (B, R, N)."""
    if not groups or any(len(g) == 0 for g in groups):
        raise CharacterAdapterError(f"every region needs at least one token column, got groups {list(groups)}")
    return torch.stack([probs[:, list(g)].mean(dim=1) for g in groups], dim=1)  # (B, R, N)
