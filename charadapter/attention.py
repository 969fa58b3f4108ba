"""The region IP term and the text attention maps, computed from the host's own q and k.

Glossary for shapes: B batch rows, N = h*w positions, T tokens, H heads, D head dim,
R regions, C channels (C_inner = H*D, the width of to_q/to_k/to_v outputs).
"""

import math
from typing import Optional, Sequence, Tuple, Union

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


def _coefficients(
    masks: Optional[torch.Tensor], weights: Optional[torch.Tensor], batch: int, regions: int, positions: int,
    device: torch.device,
) -> torch.Tensor:
    """w_r * M_r as (B, N, R) float32; masks None means 1, weights None means 1."""
    if weights is None:
        w = torch.ones(1, 1, regions, device=device)
    else:
        w = torch.as_tensor(weights, dtype=torch.float32, device=device)
        if w.shape not in ((regions,), (batch, regions), (1, regions)):
            raise GeometryError(f"weights: expected ({regions},) or ({batch}, {regions}), got {tuple(w.shape)}")
        w = w.reshape(-1, 1, regions)  # (B or 1, 1, R)
    if masks is None:
        return w
    if masks.ndim != 3 or masks.shape[1] != regions or masks.shape[2] != positions or masks.shape[0] not in (1, batch):
        raise GeometryError(
            f"masks: expected (B={batch}, R={regions}, N={positions}), got {tuple(masks.shape)}"
        )
    return masks.to(device=device, dtype=torch.float32).transpose(1, 2) * w  # (B, N, R)


def _region_inputs(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, heads: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Check shapes; keys/values as (R, B, T, C) in q's dtype and q split into heads (B, H, N, D)."""
    keys, values = _as_regions(keys, "keys"), _as_regions(values, "values")
    batch, positions, width = q.shape
    regions, kb, tokens, kw = keys.shape
    if values.shape != keys.shape:
        raise GeometryError(f"keys {tuple(keys.shape)} and values {tuple(values.shape)} differ")
    if kw != width or kb not in (1, batch) or width % heads:
        raise GeometryError(
            f"q {tuple(q.shape)} with heads={heads} does not fit keys {tuple(keys.shape)} "
            f"(expected (R, {batch} or 1, T, {width}) and C divisible by heads)"
        )
    keys = keys.to(q.dtype).expand(regions, batch, tokens, width)
    values = values.to(q.dtype).expand(regions, batch, tokens, width)
    qh = q.view(batch, positions, heads, width // heads).transpose(1, 2)  # (B, H, N, D)
    return keys, values, qh


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
    keys, values, qh = _region_inputs(q, keys, values, heads)
    batch, positions, width = q.shape
    regions, _, tokens, _ = keys.shape
    dim = width // heads
    coef = _coefficients(masks, weights, batch, regions, positions, q.device)  # (B|1, N|1, R)

    if regions == 1 and masks is None:
        # plain IP-Adapter: one fused SDPA call
        kh = keys[0].reshape(batch, tokens, heads, dim).transpose(1, 2)  # (B, H, T, D)
        vh = values[0].reshape(batch, tokens, heads, dim).transpose(1, 2)  # (B, H, T, D)
        out = F.scaled_dot_product_attention(qh, kh, vh)  # (B, H, N, D)
        out = out.transpose(1, 2).reshape(batch, positions, width)  # (B, N, C)
        return out * coef.to(out.dtype)  # coef (B|1, 1, 1)

    # Regions share q: one score matmul against all R*T keys, a softmax per region's T columns,
    # the masks and weights folded into the probabilities, one matmul against all R*T values.
    # q is read once, so R regions cost about one (T is small next to D and N).
    kh = keys.reshape(regions, batch, tokens, heads, dim).permute(1, 3, 0, 2, 4)  # (B, H, R, T, D)
    kh = kh.reshape(batch, heads, regions * tokens, dim)  # (B, H, R*T, D)
    vh = values.reshape(regions, batch, tokens, heads, dim).permute(1, 3, 0, 2, 4)  # (B, H, R, T, D)
    vh = vh.reshape(batch, heads, regions * tokens, dim)  # (B, H, R*T, D)
    kh = kh * (1.0 / math.sqrt(dim))  # scale the small keys, not q
    scores = torch.matmul(qh, kh.transpose(-1, -2))  # (B, H, N, R*T)
    probs = scores.view(batch, heads, positions, regions, tokens).softmax(dim=-1, dtype=torch.float32)
    probs = probs.mul_(coef.unsqueeze(1).unsqueeze(-1))  # (B, H, N, R, T) * (B|1, 1, N|1, R, 1)
    probs = probs.to(q.dtype).view(batch, heads, positions, regions * tokens)  # (B, H, N, R*T)
    out = torch.matmul(probs, vh)  # (B, H, N, D)
    return out.transpose(1, 2).reshape(batch, positions, width)  # (B, N, C)


def region_ip_delta_sdpa(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    heads: int,
    masks: Optional[torch.Tensor] = None,
    weights: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Same as `region_ip_delta`, with the R regions batched into one SDPA call (q repeated R times).

    Kept as a second implementation for tests and benchmarks.
    """
    keys, values, qh = _region_inputs(q, keys, values, heads)
    batch, positions, width = q.shape
    regions, _, tokens, _ = keys.shape
    dim = width // heads
    qr = qh.unsqueeze(0).expand(regions, batch, heads, positions, dim)  # (R, B, H, N, D)
    qr = qr.reshape(regions * batch, heads, positions, dim)  # (R*B, H, N, D)
    kr = keys.reshape(regions * batch, tokens, heads, dim).transpose(1, 2)  # (R*B, H, T, D)
    vr = values.reshape(regions * batch, tokens, heads, dim).transpose(1, 2)  # (R*B, H, T, D)
    out = F.scaled_dot_product_attention(qr, kr, vr)  # (R*B, H, N, D)
    out = out.view(regions, batch, heads, positions, dim).permute(1, 3, 0, 2, 4)  # (B, N, R, H, D)
    out = out.reshape(batch, positions, regions, width)  # (B, N, R, C)
    coef = _coefficients(masks, weights, batch, regions, positions, q.device)  # (B|1, N|1, R)
    return (out * coef.unsqueeze(-1).to(out.dtype)).sum(dim=2)  # (B, N, C)


def _token_tensor(token_index: TokenIndex, tokens: int, device: torch.device) -> torch.Tensor:
    """Token columns as a long tensor, checked against the key length T."""
    idx = torch.as_tensor(token_index, dtype=torch.long, device=device).reshape(-1)
    if idx.numel() == 0:
        raise CharacterAdapterError("token_index is empty: no text token to make a map from")
    if int(idx.min()) < 0 or int(idx.max()) >= tokens:
        raise CharacterAdapterError(
            f"token_index spans {int(idx.min())}..{int(idx.max())}, but the text keys have T={tokens} tokens"
        )
    return idx


def text_attention_probs(q: torch.Tensor, k: torch.Tensor, heads: int, token_index: TokenIndex) -> torch.Tensor:
    """Text cross-attention probabilities softmax(q k^T / sqrt(D)), mean over heads, of the
    given token columns -> (B, J, N) with J = len(token_index). Computed in float32."""
    batch, positions, width = q.shape
    if k.ndim != 3 or k.shape[2] != width or k.shape[0] != batch or width % heads:
        raise GeometryError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} with heads={heads}: expected k (B={batch}, T, C={width})"
        )
    tokens = k.shape[1]
    dim = width // heads
    idx = _token_tensor(token_index, tokens, q.device)
    qh = q.float().view(batch, positions, heads, dim).transpose(1, 2)  # (B, H, N, D)
    kh = k.float().view(batch, tokens, heads, dim).transpose(1, 2)  # (B, H, T, D)
    probs = (torch.matmul(qh, kh.transpose(-1, -2)) * (1.0 / math.sqrt(dim))).softmax(dim=-1)  # (B, H, N, T)
    probs = probs.mean(dim=1).index_select(-1, idx)  # (B, N, J)
    return probs.transpose(1, 2)  # (B, J, N)


def phrase_maps(probs: torch.Tensor, groups: Sequence[Sequence[int]]) -> torch.Tensor:
    """Average token maps (B, J, N) within each group of column positions -> (B, R, N)."""
    if not groups or any(len(g) == 0 for g in groups):
        raise CharacterAdapterError(f"every region needs at least one token column, got groups {list(groups)}")
    return torch.stack([probs[:, list(g)].mean(dim=1) for g in groups], dim=1)  # (B, R, N)


def text_region_maps(
    q: torch.Tensor, k: torch.Tensor, heads: int, token_groups: Sequence[Sequence[int]],
) -> torch.Tensor:
    """Region maps (B, R, N): mean text attention over each region phrase's tokens and heads."""
    flat = [t for g in token_groups for t in g]
    probs = text_attention_probs(q, k, heads, flat)  # (B, J, N)
    groups, start = [], 0
    for g in token_groups:
        groups.append(range(start, start + len(g)))
        start += len(g)
    return phrase_maps(probs, groups)
