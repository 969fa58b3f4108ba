"""The region IP term and the text attention maps, computed from the host's own q and k.

Glossary for shapes: B batch rows, N = h*w positions, T tokens, H heads, D head dim,
R regions, C channels (C_inner = H*D, the width of to_q/to_k/to_v outputs).

Both run on q exactly as the host's to_q returned it, (B, N, C), without splitting heads: keys
are laid out block-diagonally (head h's keys fill only rows h*D..(h+1)*D), so one matmul gives
the scores of every head, region and token, and one more gives the values already in to_out's
input layout. That costs H times the (tiny: T is 4-16 per region) score flops but saves the
copies that a head split of q and a merge of the output need, and keeps the kernel count per
layer at 3-4, which is what an attention hook costs on a GPU.
"""

import math
from typing import NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from .errors import CharacterAdapterError, GeometryError

TokenIndex = Union[torch.Tensor, Sequence[int]]


def ip_keys_values(
    tokens: torch.Tensor, to_k_ip: torch.Tensor, to_v_ip: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Image tokens (..., T, C_ctx) -> IP keys and values (..., T, C_inner) of one layer."""
    return F.linear(tokens, to_k_ip), F.linear(tokens, to_v_ip)


def _as_regions(t: torch.Tensor, what: str) -> torch.Tensor:
    """Accept (R, B, T, C) or one region's (B, T, C); return (R, B, T, C)."""
    if t.ndim == 3:
        return t.unsqueeze(0)  # (1, B, T, C)
    if t.ndim != 4:
        raise GeometryError(f"{what}: expected (R, B, T, C) or (B, T, C), got {tuple(t.shape)}")
    return t


def region_coefficients(
    masks: Optional[torch.Tensor], weights: Optional[torch.Tensor], batch: int, regions: int, positions: int,
    device: torch.device,
) -> torch.Tensor:
    """w_r * M_r as (B|1, N|1, R) float32; masks None means 1, weights None means 1."""
    w = None
    if weights is not None:
        w = torch.as_tensor(weights, dtype=torch.float32, device=device)
        if w.shape not in ((regions,), (batch, regions), (1, regions)):
            raise GeometryError(f"weights: expected ({regions},) or ({batch}, {regions}), got {tuple(w.shape)}")
        w = w.reshape(-1, 1, regions)  # (B or 1, 1, R)
    if masks is None:
        return w if w is not None else torch.ones(1, 1, regions, device=device)
    if masks.ndim != 3 or masks.shape[1] != regions or masks.shape[2] != positions or masks.shape[0] not in (1, batch):
        raise GeometryError(
            f"masks: expected (B={batch}, R={regions}, N={positions}), got {tuple(masks.shape)}"
        )
    masks = masks.to(device=device, dtype=torch.float32).transpose(1, 2)  # (B, N, R)
    return masks if w is None else masks * w


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


class IPHeads(NamedTuple):
    """IP keys and values of R regions, block-diagonal over heads (see the module docstring).

    Columns of `keys` (rows of `values`) run over (T, H, R), token-major: the softmax over a
    region's T tokens then runs over a middle axis with H*R contiguous lanes, which vectorises
    (a softmax over a last axis of 4 does not: ~15x slower on a CPU).
    """

    keys: torch.Tensor    # (B, C, T*H*R): head h's channels of column (t, h, r) hold K_r[t, h] / sqrt(D)
    values: torch.Tensor  # (B, T*H*R, C): head h's channels of row (t, h, r) hold V_r[t, h]
    heads: int
    regions: int
    tokens: int


def ip_heads(keys: torch.Tensor, values: torch.Tensor, heads: int, batch: Optional[int] = None) -> IPHeads:
    """Keys and values (R, B|1, T, C) -> IPHeads for `batch` rows (default: the keys' B).

    Built once per layer and token set; zeros everywhere off the head diagonal.
    """
    keys, values = _as_regions(keys, "keys"), _as_regions(values, "values")
    regions, rows, tokens, width = keys.shape
    if values.shape != keys.shape or width % heads:
        raise GeometryError(f"keys {tuple(keys.shape)} / values {tuple(values.shape)} do not split into {heads} heads")
    batch = rows if batch is None else batch
    dim = width // heads
    keys = keys.expand(regions, batch, tokens, width).reshape(regions, batch, tokens, heads, dim)
    values = values.expand(regions, batch, tokens, width).reshape(regions, batch, tokens, heads, dim)
    kb = keys.new_zeros(batch, heads, dim, tokens, heads, regions)  # (B, H, D, T, H', R): H == H' only
    kb.diagonal(dim1=1, dim2=4).copy_(keys.permute(1, 4, 2, 0, 3) * (1.0 / math.sqrt(dim)))  # (B, D, T, R, H)
    vb = values.new_zeros(batch, tokens, heads, regions, heads, dim)  # (B, T, H, R, H', D): H == H' only
    vb.diagonal(dim1=2, dim2=4).copy_(values.permute(1, 2, 0, 4, 3))  # diagonal view: (B, T, R, D, H)
    columns = tokens * heads * regions
    return IPHeads(kb.view(batch, width, columns), vb.view(batch, columns, width), heads, regions, tokens)


def add_region_ip(
    q: torch.Tensor,
    ip: IPHeads,
    coef: Optional[torch.Tensor] = None,
    base: Optional[torch.Tensor] = None,
    alpha: float = 1.0,
) -> torch.Tensor:
    """base + alpha * Sum_r coef_r * softmax(q K_r^T / sqrt(D)) V_r, per head -> (B, N, C).

    q (B, N, C) in ip's dtype; coef (B|1, N|1, R) in q's dtype or None (= 1); base (B, N, C) or
    None (= 0). With base given, the value matmul and the addition are one kernel.
    """
    batch, positions, _ = q.shape
    scores = torch.bmm(q, ip.keys)  # (B, N, T*H*R)
    probs = scores.view(batch, positions, ip.tokens, ip.heads * ip.regions).softmax(dim=2)  # over each T
    if coef is not None:
        shaped = probs.view(batch, positions, ip.tokens, ip.heads, ip.regions)
        shaped.mul_(coef.view(coef.shape[0], coef.shape[1], 1, 1, ip.regions))  # (B|1, N|1, 1, 1, R)
    probs = probs.view(batch, positions, -1)  # (B, N, T*H*R)
    if base is None:
        out = torch.bmm(probs, ip.values)  # (B, N, C)
        return out if alpha == 1.0 else out.mul_(alpha)
    return torch.baddbmm(base, probs, ip.values, alpha=alpha)  # (B, N, C)


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
    ip = ip_heads(keys.to(q.dtype), values.to(q.dtype), heads, batch)
    coef = region_coefficients(masks, weights, batch, keys.shape[0], positions, q.device)  # (B|1, N|1, R)
    return add_region_ip(q, ip, coef.to(q.dtype))


def region_ip_delta_sdpa(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    heads: int,
    masks: Optional[torch.Tensor] = None,
    weights: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Same as `region_ip_delta`, with the R regions batched into one SDPA call (q repeated R times).

    A second, independent implementation for tests and benchmarks.
    """
    keys, values = _check_kv(tuple(q.shape), keys, values, heads)
    batch, positions, width = q.shape
    regions, _, tokens, _ = keys.shape
    dim = width // heads
    keys = keys.to(q.dtype).expand(regions, batch, tokens, width)
    values = values.to(q.dtype).expand(regions, batch, tokens, width)
    qh = q.view(batch, positions, heads, dim).transpose(1, 2)  # (B, H, N, D)
    qr = qh.unsqueeze(0).expand(regions, batch, heads, positions, dim)  # (R, B, H, N, D)
    qr = qr.reshape(regions * batch, heads, positions, dim)  # (R*B, H, N, D)
    kr = keys.reshape(regions * batch, tokens, heads, dim).transpose(1, 2)  # (R*B, H, T, D)
    vr = values.reshape(regions * batch, tokens, heads, dim).transpose(1, 2)  # (R*B, H, T, D)
    out = F.scaled_dot_product_attention(qr, kr, vr)  # (R*B, H, N, D)
    out = out.view(regions, batch, heads, positions, dim).permute(1, 3, 0, 2, 4)  # (B, N, R, H, D)
    out = out.reshape(batch, positions, regions, width)  # (B, N, R, C)
    coef = region_coefficients(masks, weights, batch, regions, positions, q.device)  # (B|1, N|1, R)
    return (out * coef.unsqueeze(-1).to(out.dtype)).sum(dim=2)  # (B, N, C)


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


def text_attention_probs(q: torch.Tensor, k: torch.Tensor, heads: int, token_index: TokenIndex) -> torch.Tensor:
    """Text cross-attention probabilities softmax(q k^T / sqrt(D)), mean over heads, of the
    given token columns -> (B, J, N) with J = len(token_index). Computed in float32."""
    _check_text(q, k, heads)
    idx = _token_list(token_index, k.shape[1])
    columns = text_map_matrix([[i] for i in idx], k.shape[1], heads, q.device)  # (H*T, J)
    return text_maps(q, k, heads, columns)


def phrase_maps(probs: torch.Tensor, groups: Sequence[Sequence[int]]) -> torch.Tensor:
    """Average token maps (B, J, N) within each group of column positions -> (B, R, N)."""
    if not groups or any(len(g) == 0 for g in groups):
        raise CharacterAdapterError(f"every region needs at least one token column, got groups {list(groups)}")
    return torch.stack([probs[:, list(g)].mean(dim=1) for g in groups], dim=1)  # (B, R, N)


def text_map_matrix(
    token_groups: Sequence[Sequence[int]], tokens: int, heads: int, device: Optional[torch.device] = None,
    allow_empty: bool = False,
) -> torch.Tensor:
    """(H*T, R) float32 averaging matrix: the mean over heads and over each group's token columns.

    An empty group (allowed only with `allow_empty`) gives a column of zeros: no evidence.
    """
    if not token_groups or (not allow_empty and any(len(g) == 0 for g in token_groups)):
        raise CharacterAdapterError(
            f"every region needs at least one token column, got groups {[list(g) for g in token_groups]}")
    matrix = torch.zeros(heads, tokens, len(token_groups))  # (H, T, R)
    for r, group in enumerate(token_groups):
        if len(group) == 0:
            continue
        for t in _token_list(group, tokens):
            matrix[:, t, r] += 1.0 / (heads * len(group))
    return matrix.view(heads * tokens, len(token_groups)).to(device)  # (H*T, R)


def map_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the text-map scores: the host's, except bfloat16 (too coarse for 77-way softmax logits)."""
    return torch.float32 if dtype == torch.bfloat16 else dtype


def head_mask(width: int, heads: int, device: Optional[torch.device] = None,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(C, H, 1): 1/sqrt(D) where channel c belongs to head h, else 0."""
    dim = width // heads
    mask = torch.zeros(heads, dim, heads)  # (H, D, H')
    mask.diagonal(dim1=0, dim2=2).fill_(1.0 / math.sqrt(dim))
    return mask.view(width, heads, 1).to(device=device, dtype=dtype)


def text_maps(q: torch.Tensor, k: torch.Tensor, heads: int, matrix: torch.Tensor,
              mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Text attention softmax(q k^T / sqrt(D)) per head, averaged by `matrix` (H*T, R), or per row
    (B, H*T, R) -> (B, R, N).

    q (B, N, C), k (B, T, C); `mask` = head_mask(C, H) in map_dtype(q.dtype) (built when None).
    The scores are computed in map_dtype(q.dtype), the softmax and the averages in float32.
    """
    batch, positions, width = q.shape
    tokens = k.shape[1]
    dtype = map_dtype(q.dtype)
    if mask is None:
        mask = head_mask(width, heads, q.device, dtype)
    kb = k.transpose(1, 2).unsqueeze(2) * mask  # (B, C, 1, T) * (C, H, 1) -> (B, C, H, T), block-diagonal
    scores = torch.bmm(q.to(dtype), kb.view(batch, width, heads * tokens))  # (B, N, H*T)
    probs = scores.view(batch, positions, heads, tokens).softmax(dim=-1, dtype=torch.float32)
    return torch.matmul(probs.view(batch, positions, -1), matrix).transpose(1, 2)  # (B, R, N)


def text_region_maps(
    q: torch.Tensor, k: torch.Tensor, heads: int, token_groups: Sequence[Sequence[int]],
) -> torch.Tensor:
    """Region maps (B, R, N): mean text attention over each region phrase's tokens and heads."""
    _check_text(q, k, heads)
    return text_maps(q, k, heads, text_map_matrix(token_groups, k.shape[1], heads, q.device))
