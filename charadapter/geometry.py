"""Spatial geometry of UNet attention layers: computed from the latent size, never guessed."""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .errors import GeometryError

Size = Tuple[int, int]
Box = Tuple[int, int, int, int]  # (left, top, right, bottom) in pixels, right/bottom exclusive
Frac = Tuple[float, float, float, float]  # (left, top, right, bottom) as fractions of the canvas


def downsampled_hw(latent_hw: Size, level: int) -> Size:
    """Grid (h, w) of a UNet level: halve with ceil once per level, as strided convs do."""
    h, w = latent_hw
    for _ in range(level):
        h, w = (h + 1) // 2, (w + 1) // 2
    return h, w


def grid_for_positions(latent_hw: Size, positions: int, max_level: int = 6) -> Size:
    """The (h, w) among the UNet levels whose h*w equals `positions`; raise when none does."""
    tried = []
    for level in range(max_level + 1):
        hw = downsampled_hw(latent_hw, level)
        if hw[0] * hw[1] == positions:
            return hw
        tried.append(hw)
    raise GeometryError(
        f"attention layer has N={positions} positions, but latent {latent_hw[0]}x{latent_hw[1]} "
        f"gives grids {tried} (h*w = {[h * w for h, w in tried]})"
    )


def check_grid(hw: Size, positions: int) -> None:
    """Raise unless the grid holds exactly `positions` cells."""
    if hw[0] * hw[1] != positions:
        raise GeometryError(f"grid {hw[0]}x{hw[1]} has {hw[0] * hw[1]} cells, tensor has N={positions}")


def resize_maps(maps: torch.Tensor, src_hw: Size, dst_hw: Size) -> torch.Tensor:
    """Resize flattened maps (..., N_src) to (..., N_dst): area when shrinking, bilinear when
    growing. Both give convex combinations of input cells, so nothing overshoots the input range."""
    check_grid(src_hw, maps.shape[-1])
    if tuple(src_hw) == tuple(dst_hw):
        return maps
    lead = maps.shape[:-1]
    grid = maps.reshape(-1, 1, src_hw[0], src_hw[1]).float()  # (L, 1, h, w), L = prod(lead)
    if dst_hw[0] <= src_hw[0] and dst_hw[1] <= src_hw[1]:
        out = F.interpolate(grid, size=dst_hw, mode="area")
    else:
        out = F.interpolate(grid, size=dst_hw, mode="bilinear", align_corners=False)
    return out.reshape(*lead, dst_hw[0] * dst_hw[1]).to(maps.dtype)  # (..., N_dst)


def content_rect(content: Optional[Frac]) -> Frac:
    """Validate where an image lies on its canvas (fractions); None = the whole canvas."""
    if content is None:
        return 0.0, 0.0, 1.0, 1.0
    cx0, cy0, cx1, cy1 = (float(c) for c in content)
    if not (0.0 <= cx0 < cx1 <= 1.0 and 0.0 <= cy0 < cy1 <= 1.0):
        raise GeometryError(f"content rectangle {content} must satisfy 0 <= left < right <= 1, 0 <= top < bottom <= 1")
    return cx0, cy0, cx1, cy1


def interpolation_matrix(src: int, dst: int) -> torch.Tensor:
    """(dst, src) float64 matrix of 1-D linear interpolation as F.interpolate does it (bilinear,
    align_corners=False) when growing a side from src to dst cells; the identity when equal."""
    if dst < src:
        raise GeometryError(f"interpolation_matrix grows a side: got {src} -> {dst} cells")
    matrix = torch.zeros(dst, src, dtype=torch.float64)
    scale = src / dst
    for j in range(dst):
        pos = max((j + 0.5) * scale - 0.5, 0.0)  # source coordinate, clamped at the first cell
        i0 = min(int(pos), src - 1)
        i1 = min(i0 + 1, src - 1)
        frac = pos - i0
        matrix[j, i0] += 1.0 - frac
        matrix[j, i1] += frac
    return matrix
