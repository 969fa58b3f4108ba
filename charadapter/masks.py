"""Region masks from attention maps: normalise, soft (softmax) or hard (argmax), resize per layer.

Maps and masks are flattened over space: (B, R, N) with N = h*w in row-major order.
Mask tensors from `soft_masks` / `hard_masks` carry R+1 channels: the background channel is
index 0 (``BACKGROUND``) and region r is channel r+1, so ``masks[:, 1:]`` are the region masks in
region order. Over the channel axis they sum to 1 at every position.

The functions below define the masks; the sampling loop (charadapter.fusion) computes the same
numbers channels-last, (B, N, R+1), in a handful of operators per step (`fused_logits`,
`one_hot_last`, `pyramid_channels_last`), and tests hold the two equal.

Several characters (`character_layout`): K characters with R_k regions each give P = sum_k
max(R_k, 1) (character, region) pairs, character by character; their masks (B, P+1, N) keep the
same convention (background first, then the pairs in order, summing to 1). Channels-last, the
sampling loop turns fused_logits' columns into the pairs' logits with `character_logits`.
"""

from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .errors import GeometryError
from .geometry import Size, downsampled_hw, resize_maps

BACKGROUND = 0


def _check_maps(maps: torch.Tensor) -> None:
    """Raise unless maps are (B, R, N) with R >= 1."""
    if maps.ndim != 3 or maps.shape[1] < 1:
        raise GeometryError(f"expected maps of shape (B, R, N) with R >= 1, got {tuple(maps.shape)}")


def normalize_maps(maps: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Min-max normalise each map over its positions to [0, 1]; a constant map becomes all 0."""
    maps = maps.float()
    low = maps.amin(dim=-1, keepdim=True)
    span = maps.amax(dim=-1, keepdim=True) - low
    # constant map: no evidence of where the region is, so no vote above background
    return torch.where(span > eps, (maps - low) / span.clamp_min(eps), torch.zeros_like(maps))


def mask_logits(maps: torch.Tensor, background_logit: float) -> torch.Tensor:
    """Logits (B, R+1, N): a constant background channel first, then the normalised maps."""
    _check_maps(maps)
    norm = normalize_maps(maps)
    background = torch.full_like(norm[:, :1], float(background_logit))  # (B, 1, N)
    return torch.cat([background, norm], dim=1)  # (B, R+1, N)


def soft_masks(maps: torch.Tensor, temperature: float, background_logit: float) -> torch.Tensor:
    """Soft masks (B, R+1, N): softmax over [background, regions] of normalised maps / temperature."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return torch.softmax(mask_logits(maps, background_logit) / temperature, dim=1)


def hard_masks(maps: torch.Tensor, background_logit: float) -> torch.Tensor:
    """One-hot masks (B, R+1, N) of the argmax of the same logits; ties go to the lower channel."""
    logits = mask_logits(maps, background_logit)
    winner = logits.argmax(dim=1, keepdim=True)  # (B, 1, N)
    return torch.zeros_like(logits).scatter_(1, winner, 1.0)


def uniform_masks(batch: int, regions: int, positions: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """Even-split prior (B, R+1, N): every region 1/R everywhere, background 0."""
    masks = torch.full((batch, regions + 1, positions), 1.0 / regions, device=device)
    masks[:, BACKGROUND] = 0.0
    return masks


def pair_count(regions: Sequence[int]) -> int:
    """(character, region) pairs of characters with R_k regions each; R_k = 0 is one whole-figure pair."""
    return sum(max(int(r), 1) for r in regions)


def figure_shares(subject_maps: torch.Tensor, mode: str, temperature: float) -> torch.Tensor:
    """Each character's share of every position (B, K, N) from its subject phrase's map (B, K, N):
    softmax over the characters of the normalised maps / temperature (soft), or one-hot argmax (hard).
    A character without a map (all zeros) only wins where no other character's map rises above 0."""
    _check_maps(subject_maps)
    logits = normalize_maps(subject_maps)  # (B, K, N) in [0, 1]
    if mode == "hard":
        winner = logits.argmax(dim=1, keepdim=True)  # (B, 1, N); ties go to the lower character
        return torch.zeros_like(logits).scatter_(1, winner, 1.0)
    return torch.softmax(logits / temperature, dim=1)


def region_layout(maps: torch.Tensor, mode: str, temperature: float, background_logit: float) -> torch.Tensor:
    """One character's layout (B, R+1, N) of its region maps (B, R, N): `soft_masks` or `hard_masks`."""
    if mode == "hard":
        return hard_masks(maps, background_logit)
    return soft_masks(maps, temperature, background_logit)


def character_layout(
    subject_maps: Optional[torch.Tensor], region_maps: Optional[torch.Tensor], regions: Sequence[int],
    mode: str, temperature: float, background_logit: float,
) -> torch.Tensor:
    """Masks (B, P+1, N) of every (character, region) pair: M_kj = A_k * L_k[j], background sum_k A_k * L_k[0].

    `regions` (K,): R_k region maps of character k, consecutive in `region_maps` (B, sum R_k, N);
    R_k = 0 is one pair over the character's whole figure (L_k = [0, 1]). L_k is the
    single-character layout of character k's own maps (`region_layout`); A_k (B, K, N) are the
    figure shares of `subject_maps` (`figure_shares`), or an even split when None. With one
    character A = 1 and the result is L_1 itself, bit for bit.
    """
    if mode not in ("soft", "hard"):
        raise ValueError(f"mode must be 'soft' or 'hard', got {mode!r}")
    if mode == "soft" and not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    counts = [int(r) for r in regions]
    if not counts or min(counts) < 0:
        raise GeometryError(f"expected region counts >= 0 for at least one character, got {counts}")
    maps_needed = sum(counts)
    if maps_needed and (region_maps is None or region_maps.ndim != 3 or region_maps.shape[1] != maps_needed):
        raise GeometryError(f"region maps: expected (B, {maps_needed}, N) for region counts {counts}, got "
                            f"{None if region_maps is None else tuple(region_maps.shape)}")
    if len(counts) == 1 and counts[0]:
        return region_layout(region_maps, mode, temperature, background_logit)  # A_1 = 1: the single layout
    reference = region_maps if maps_needed else subject_maps
    if reference is None:
        raise GeometryError("a layout of whole-figure characters needs their subject maps")
    batch, positions = reference.shape[0], reference.shape[2]
    shares = None
    if len(counts) > 1:
        if subject_maps is not None:
            if tuple(subject_maps.shape) != (batch, len(counts), positions):
                raise GeometryError(f"subject maps: expected ({batch}, {len(counts)}, {positions}), "
                                    f"got {tuple(subject_maps.shape)}")
            shares = figure_shares(subject_maps, mode, temperature)  # (B, K, N)
        else:
            shares = torch.full((batch, len(counts), positions), 1.0 / len(counts), device=reference.device)
    background = None
    pairs: List[torch.Tensor] = []
    start = 0
    for k, count in enumerate(counts):
        if count:
            layout = region_layout(region_maps[:, start:start + count], mode, temperature, background_logit)
            start += count
        else:  # the whole figure: no background inside it
            layout = torch.cat([torch.zeros(batch, 1, positions, device=reference.device),
                                torch.ones(batch, 1, positions, device=reference.device)], dim=1)  # (B, 2, N)
        if shares is not None:
            layout = layout * shares[:, k:k + 1]  # (B, R_k+1, N) * (B, 1, N)
        background = layout[:, :1] if background is None else background + layout[:, :1]
        pairs.append(layout[:, 1:])
    return torch.cat([background] + pairs, dim=1)  # (B, P+1, N)


def character_prior(regions: Sequence[int], batch: int, positions: int,
                    device: Optional[torch.device] = None) -> torch.Tensor:
    """Even split before any map (B, P+1, N): each character 1/K, shared evenly among its pairs;
    background 0. One character: the same as `uniform_masks`."""
    prior = torch.tensor(_prior_values(regions), dtype=torch.float32, device=device)  # (P+1,)
    return prior.view(1, -1, 1).expand(batch, -1, positions).contiguous()  # (B, P+1, N)


def layout_labels(layout: torch.Tensor, hw: Size) -> torch.Tensor:
    """Winning region per cell (B, h, w) of masks (B, R+1, N); -1 where the background wins."""
    grid = layout.reshape(layout.shape[0], -1, hw[0], hw[1])  # (B, R+1, N) -> (B, R+1, h, w)
    return grid.argmax(dim=1) - (BACKGROUND + 1)  # channel r+1 -> region r, background -> -1


def resize_masks(masks: torch.Tensor, src_hw: Size, dst_hw: Size, eps: float = 1e-6) -> torch.Tensor:
    """Resize (B, R+1, N_src) masks to dst grid and renormalise so channels still sum to 1."""
    if masks.ndim != 3:
        raise GeometryError(f"expected masks of shape (B, R+1, N), got {tuple(masks.shape)}")
    out = resize_maps(masks.float(), src_hw, dst_hw).clamp(0.0, 1.0)  # (B, R+1, N_dst)
    return out / out.sum(dim=1, keepdim=True).clamp_min(eps)


def area_pyramid(maps: torch.Tensor, latent_hw: Size, levels: Iterable[int]) -> Dict[Size, torch.Tensor]:
    """Maps (B, R, N_latent) area-averaged to every level's grid -> {(h, w): (B, R, N_level)}.

    Levels only shrink the latent grid; an area average of masks that sum to 1 over the channels
    still sums to 1 and stays in [0, 1], and it is linear (weights can be applied before or after).
    """
    maps = maps.float()
    return {hw: resize_maps(maps, latent_hw, hw)  # shrinking: an area average; (B, R, N_level)
            for hw in (downsampled_hw(latent_hw, level) for level in sorted(set(levels)))}


def mask_pyramid(
    masks: torch.Tensor, latent_hw: Size, levels: Iterable[int],
) -> Dict[Tuple[int, int], torch.Tensor]:
    """Region masks (B, R, N_level) for every level's grid, keyed by (h, w); background dropped."""
    return area_pyramid(masks[:, BACKGROUND + 1:], latent_hw, levels)


def merge_maps(maps: Iterable[Tuple[Size, torch.Tensor]], dst_hw: Size) -> torch.Tensor:
    """Mean of maps (B, R, N_i) on grids hw_i after resizing each to dst_hw -> (B, R, N_dst)."""
    resized = [resize_maps(m.float(), hw, dst_hw) for hw, m in maps]
    if not resized:
        raise GeometryError(f"no maps to merge onto grid {dst_hw[0]}x{dst_hw[1]}")
    shapes = {tuple(r.shape) for r in resized}
    if len(shapes) != 1:
        raise GeometryError(f"maps to merge disagree in shape after resizing: {sorted(shapes)}")
    return torch.stack(resized).mean(dim=0)  # (B, R, N_dst)


# ---- channels-last, for the sampling loop ---------------------------------------------------------

MAP_FLOOR = 1e-3  # added (exactly) to every map `fused_logits` gets: a flat map stays flat, never 0/0
SPAN_DELTA = 1e-6  # span = max - (1 - delta) * min: > 0 for maps >= MAP_FLOOR, ~ max - min otherwise


def fused_logits(maps: torch.Tensor, bias: torch.Tensor, temperature: float, copies: int = 1) -> torch.Tensor:
    """Mask logits (copies, I, N, R+1) of maps (I, N, R+1) >= MAP_FLOOR, whose column 0 is constant
    (the background), in 4 operators: (maps - min) / span / temperature + bias, per column.

    bias (R+1,) = [background / temperature, 0, ...]. This is mask_logits(...) / temperature
    channels-last, up to the span's relative SPAN_DELTA * min / span, with one difference: a map
    flatter than 1e-6 is normalised rather than zeroed (exactly flat maps still give 0).
    """
    lo, hi = torch.aminmax(maps, dim=1, keepdim=True)  # (I, 1, R+1)
    span = torch.sub(hi, lo, alpha=1.0 - SPAN_DELTA)  # (I, 1, R+1)
    d = torch.sub(maps.expand(copies, *maps.shape), lo)  # (copies, I, N, R+1): a row per copy
    return torch.addcdiv(bias, d, span, value=1.0 / temperature)


def one_hot_last(logits: torch.Tensor, dtype: torch.dtype, channels: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One-hot (..., R+1) in `dtype` of the argmax over the last axis (ties: the lower channel);
    `channels` = arange(R+1) on the logits' device (made when None)."""
    winner = logits.argmax(dim=-1, keepdim=True)  # (..., 1)
    if channels is None:
        channels = torch.arange(logits.shape[-1], device=logits.device)
    return torch.eq(winner, channels, out=torch.empty(logits.shape, dtype=dtype, device=logits.device))


def character_logits(logits: torch.Tensor, counts: Sequence[int], subject_columns: Sequence[Optional[int]],
                     mode: str, temperature: float) -> torch.Tensor:
    """Pair logits (..., N, P+1) from fused_logits' columns (..., N, 1+M) = [background, every
    character's region maps, the subject maps] / temperature, whose softmax (soft) is
    character_layout's masks and whose argmax (hard) its one-hot choice: M_kj = A_k L_k[j]."""
    background = logits[..., :1]  # (..., N, 1): beta / tau
    subjects = [None if c is None else logits[..., c:c + 1] for c in subject_columns]  # each (..., N, 1)
    if mode == "hard":  # the winning character's channels lifted above every other's
        lift = 2.0 / temperature + 1.0
        zero = torch.zeros_like(background) if None in subjects else None
        winner = torch.cat([zero if s is None else s for s in subjects], dim=-1).argmax(dim=-1, keepdim=True)
    pairs, shifts = [], []  # shifts (soft): d_k = s_k - log(e^bg + sum_j e^r_kj), each (..., N, 1)
    start = 1
    for k, count in enumerate(counts):
        if mode == "hard":
            share = (winner == k) * lift  # (..., N, 1)
        if count:
            regions = logits[..., start:start + count]  # (..., N, R_k)
            start += count
            if mode == "hard":
                pairs.append(regions + share)
            else:
                norm = torch.logsumexp(torch.cat([background, regions], dim=-1), dim=-1, keepdim=True)
                shift = torch.neg(norm) if subjects[k] is None else subjects[k] - norm
                shifts.append(shift)
                pairs.append(regions + shift)
        elif mode == "hard":  # the whole figure: L_k = [0, 1]
            pairs.append(2.0 * share)
        else:
            pairs.append(torch.zeros_like(background) if subjects[k] is None else subjects[k])
    with_regions = any(counts)
    if mode == "hard":  # the winner's background: every position has one winner
        back = background + lift if with_regions else background - 3.0 * lift
    elif with_regions:  # log sum_k e^(s_k + bg - norm_k)
        back = background + torch.logsumexp(torch.cat(shifts, dim=-1), dim=-1, keepdim=True)
    else:
        back = torch.full_like(background, float("-inf"))
    return torch.cat([back] + pairs, dim=-1)  # (..., N, P+1)


def character_prior_last(regions: Sequence[int], shape: Tuple[int, ...], device: Optional[torch.device] = None,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`character_prior` channels-last: (B, N, P+1) for shape (B, N, P+1)."""
    return torch.tensor(_prior_values(regions), dtype=dtype, device=device).expand(shape).contiguous()  # (B, N, P+1)


def _prior_values(regions: Sequence[int]) -> List[float]:
    """The even split per channel: background 0, then each character's pairs 1/(K * its count)."""
    counts = [max(int(r), 1) for r in regions]
    return [0.0] + [1.0 / (len(counts) * c) for c in counts for _ in range(c)]


def pyramid_channels_last(masks: torch.Tensor, latent_hw: Size, levels: Iterable[int]) -> Dict[Size, torch.Tensor]:
    """Masks (B, N_latent, C) area-averaged to every level's grid -> {(h, w): (B, N_level, C)},
    one pooling operator per level below the latent (same numbers as `area_pyramid`)."""
    batch, _, channels = masks.shape
    grid = masks.view(batch, latent_hw[0], latent_hw[1], channels).permute(0, 3, 1, 2)  # (B, C, h, w), channels-last
    out = {}
    for hw in (downsampled_hw(latent_hw, level) for level in sorted(set(levels))):
        if tuple(hw) == tuple(latent_hw):
            out[hw] = masks
            continue
        pooled = F.adaptive_avg_pool2d(grid, hw)  # (B, C, h', w'), channels-last like its input
        out[hw] = pooled.permute(0, 2, 3, 1).reshape(batch, hw[0] * hw[1], channels)  # (B, N_level, C): a view
    return out
