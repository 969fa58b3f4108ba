"""Prompt-guided segmentation of the reference: attention maps -> region masks -> crops.

Host-free: the host captures the text cross-attention maps of each region phrase (averaged over
heads and the phrase's tokens); everything after that is here, in torch / numpy / PIL.

Fallbacks (documented behaviour, flagged so the host can warn the user):
- A region that ends up with no cell (zero or flat attention, or beaten everywhere by another
  region) is marked ``empty``; its box and crop are the whole image.
- Ties between regions go to the lowest region index, so two identical maps (a duplicated
  phrase) give the first region the cells and leave the second one empty.
"""

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, ImageDraw

from .errors import CharacterAdapterError, GeometryError
from .geometry import grid_for_positions
from .masks import merge_maps
from .images import GREY, pad_to_square

Box = Tuple[int, int, int, int]  # (left, top, right, bottom), right/bottom exclusive
Frac = Tuple[float, float, float, float]  # (left, top, right, bottom) as fractions of the canvas

PALETTE = [(230, 60, 60), (60, 180, 75), (60, 110, 230), (245, 200, 40), (200, 70, 220), (40, 200, 220),
           (245, 130, 50), (150, 100, 60)]


# --- maps ----------------------------------------------------------------------------------


def aggregate_maps(layer_maps: Sequence[torch.Tensor], latent_hw: Tuple[int, int]) -> torch.Tensor:
    """Average per-layer region maps (R, N_layer) on the latent grid: returns (R, h, w)."""
    if len(layer_maps) == 0:
        raise GeometryError("aggregate_maps got no layer maps (expected at least one (R, N) tensor)")
    h, w = int(latent_hw[0]), int(latent_hw[1])
    regions = layer_maps[0].shape[0] if layer_maps[0].dim() == 2 else None
    gridded = []
    for i, m in enumerate(layer_maps):
        if m.dim() != 2 or m.shape[0] != regions:
            raise GeometryError(
                f"layer map {i} has shape {tuple(m.shape)}; expected (R={regions}, N) like layer 0 "
                f"{tuple(layer_maps[0].shape)}"
            )
        try:
            grid = grid_for_positions((h, w), m.shape[1])
        except GeometryError as err:
            raise GeometryError(f"layer map {i} of shape {tuple(m.shape)}: {err}") from err
        gridded.append((grid, m[None]))  # (R, N_layer) -> (1, R, N_layer)
    return merge_maps(gridded, (h, w))[0].reshape(regions, h, w)  # (1, R, h*w) -> (R, h, w)


def normalise_maps(maps: np.ndarray, flat_tol: float = 1e-6) -> np.ndarray:
    """Min-max each region map (R, h, w) to [0, 1]; a flat map (no localisation) becomes all zero."""
    lo = maps.min(axis=(1, 2), keepdims=True)
    rng = maps.max(axis=(1, 2), keepdims=True) - lo
    scale = max(float(np.abs(maps).max()), 1e-30)
    flat = rng <= flat_tol * scale  # relative to the strongest map: scale-free
    return np.where(flat, 0.0, (maps - lo) / np.where(flat, 1.0, rng))


# --- connected components ------------------------------------------------------------------

_OFFSETS = {4: ((0, 1), (1, 0)), 8: ((0, 1), (1, 0), (1, 1), (1, -1))}  # each undirected edge once


def _neighbour_pairs(h: int, w: int, connectivity: int):
    """For each offset: slices (a, b) of an (h, w) grid with b the neighbour of a, and the flat
    index step from a to b."""
    for dy, dx in _OFFSETS[connectivity]:
        a = (slice(0, h - dy), slice(max(0, -dx), w - max(0, dx)))
        b = (slice(dy, h), slice(max(0, dx), w - max(0, -dx)))
        yield a, b, dy * w + dx, max(0, -dx)


def _components(values: np.ndarray, active: np.ndarray, connectivity: int) -> Tuple[np.ndarray, np.ndarray]:
    """Label connected runs of equal `values` among `active` cells of an (h, w) grid: labels
    1..K in raster order of each component's first cell (0 = inactive), and sizes (K,).
    Vectorised union-find: hook the higher root onto the lower, then jump pointers."""
    h, w = values.shape
    us, steps = [], []
    for a, b, step, col0 in _neighbour_pairs(h, w, connectivity):
        same = active[a] & active[b] & (values[a] == values[b])
        r, c = np.nonzero(same)
        us.append(r * w + c + col0)
        steps.append(np.full(r.size, step))
    u = np.concatenate(us)
    v = u + np.concatenate(steps)
    parent = np.arange(h * w)
    while u.size:
        ru, rv = parent[u], parent[v]
        live = ru != rv  # an edge whose ends share a root stays settled: drop it
        u, v, ru, rv = u[live], v[live], ru[live], rv[live]
        if not u.size:
            break
        np.minimum.at(parent, np.maximum(ru, rv), np.minimum(ru, rv))
        while True:
            jumped = parent[parent]
            if np.array_equal(jumped, parent):
                break
            parent = jumped
    flat = active.ravel()
    _, inverse, sizes = np.unique(parent[flat], return_inverse=True, return_counts=True)
    labels = np.zeros(h * w, dtype=np.int64)
    labels[flat] = inverse.reshape(-1) + 1  # a root is its component's lowest index: raster order
    return labels.reshape(h, w), sizes  # (h*w,) -> (h, w)


def connected_components(mask: np.ndarray, connectivity: int = 4) -> Tuple[np.ndarray, np.ndarray]:
    """Label the components of a bool grid (h, w): labels 1..K in raster order of first cell
    (0 = outside the mask), and sizes (K,)."""
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
    mask = np.asarray(mask, dtype=bool)
    return _components(np.zeros(mask.shape, dtype=np.int8), mask, connectivity)


# --- masks ---------------------------------------------------------------------------------


@dataclass
class SegmentationResult:
    """Region masks on the latent grid and their bounding boxes in grid cells."""

    masks: np.ndarray  # (R, h, w) bool, disjoint
    soft: np.ndarray  # (R, h, w) float32, each map normalised to [0, 1]
    empty: List[bool]  # True: region has no cell; its crop falls back to the whole image
    grid_boxes: List[Optional[Box]]  # tight box in grid cells, None when empty
    threshold: float

    @property
    def labels(self) -> np.ndarray:
        """(h, w) int: region index per cell, -1 for background."""
        out = np.full(self.masks.shape[1:], -1, dtype=np.int64)
        for r in range(self.masks.shape[0]):
            out[self.masks[r]] = r
        return out

    def boxes(self, image_size: Tuple[int, int], style: str = "strip", margin: float = 0.05,
              content: Optional[Frac] = None) -> List[Box]:
        """Pixel boxes in the original image: see region_boxes."""
        return region_boxes(self.masks, image_size, style, margin, content)

    def to_overlay(self, image: Image.Image, colors: Optional[Sequence[Tuple[int, int, int]]] = None,
                   alpha: float = 0.45, content: Optional[Frac] = None,
                   boxes: Optional[Sequence[Box]] = None) -> Image.Image:
        """The reference with each region's cells tinted in its colour (and boxes outlined)."""
        return mask_overlay(image, self.labels, colors, alpha, content, boxes)


def masks_from_maps(maps, threshold: float = 0.5, cleanup: bool = True) -> SegmentationResult:
    """Region maps (R, h, w) -> disjoint masks: normalise each to [0, 1], give each cell to the
    strongest region at or above `threshold` (ties: lowest index; a value of 0 never counts),
    else background; then keep each region's largest 4-connected component and fill its holes.
    Regions left without a cell are flagged in `empty` (their crop is the whole image)."""
    arr = maps.detach().float().cpu().numpy() if isinstance(maps, torch.Tensor) else np.asarray(maps)
    arr = arr.astype(np.float64)
    if arr.ndim != 3 or arr.shape[0] < 1 or arr.shape[1] < 1 or arr.shape[2] < 1:
        raise GeometryError(f"region maps have shape {arr.shape}; expected (R, h, w) with R, h, w >= 1")
    if not np.isfinite(arr).all():
        raise CharacterAdapterError(f"region maps of shape {arr.shape} contain NaN or infinity")
    if not 0.0 <= threshold <= 1.0:
        raise CharacterAdapterError(f"segmentation threshold must be in [0, 1], got {threshold}")
    soft = normalise_maps(arr)
    regions = soft.shape[0]
    best = np.argmax(soft, axis=0)  # (h, w); argmax returns the first maximum: lowest index wins
    strength = np.take_along_axis(soft, best[None], axis=0)[0]
    labels = np.where((strength >= threshold) & (strength > 0.0), best, -1)
    if cleanup:
        labels = _cleanup(labels, regions)
    masks = np.stack([labels == r for r in range(regions)])  # (R, h, w)
    empty = [not bool(m.any()) for m in masks]
    return SegmentationResult(masks=masks, soft=soft.astype(np.float32), empty=empty,
                              grid_boxes=[_grid_box(m) for m in masks], threshold=float(threshold))


def _cleanup(labels: np.ndarray, regions: int) -> np.ndarray:
    """Largest 4-connected component per region, then fill holes: a hole is an 8-connected
    run of background cells off the border whose neighbours all belong to one region.

    A hole that also touches another region (e.g. a region nested inside this one) is left
    alone, so no region is ever overwritten and the result does not depend on region order."""
    comp, sizes = _components(labels, labels >= 0, 4)
    if sizes.size == 0:
        return labels
    comp_ids, first = np.unique(comp.ravel(), return_index=True)
    first = first[comp_ids > 0]  # flat index of each component's first cell, components 1..K
    region_of = labels.ravel()[first]  # (K,)
    keep = np.zeros(sizes.size + 1, dtype=bool)
    for r in range(regions):
        mine = np.flatnonzero(region_of == r)
        if mine.size:
            keep[mine[np.argmax(sizes[mine])] + 1] = True  # argmax: ties go to the first in raster order
    kept = np.where(keep[comp], labels, -1)

    background = kept < 0
    holes, hole_sizes = _components(kept, background, 8)
    if hole_sizes.size == 0:
        return kept
    h, w = kept.shape
    pairs = []  # (hole id, region) for every 8-adjacency between a background run and a region
    for a, b, _, _ in _neighbour_pairs(h, w, 8):
        for x, y in ((a, b), (b, a)):
            touch = background[x] & ~background[y]
            pairs.append(np.stack([holes[x][touch], kept[y][touch]], axis=1))
    pairs = np.unique(np.concatenate(pairs), axis=0)  # (P, 2) distinct (hole, region)
    n_regions = np.bincount(pairs[:, 0], minlength=hole_sizes.size + 1)
    owner = np.full(hole_sizes.size + 1, -1, dtype=np.int64)
    owner[pairs[:, 0]] = pairs[:, 1]
    fill = n_regions == 1
    fill[np.unique(np.concatenate([holes[0], holes[-1], holes[:, 0], holes[:, -1]]))] = False
    fill[0] = False
    return np.where(fill[holes], owner[holes], kept)


def _grid_box(mask: np.ndarray) -> Optional[Box]:
    """Tight box (left, top, right, bottom) in grid cells, exclusive ends; None if empty."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


# --- boxes and crops -----------------------------------------------------------------------


def region_boxes(masks, image_size: Tuple[int, int], style: str = "strip", margin: float = 0.05,
                 content: Optional[Frac] = None) -> List[Box]:
    """Pixel boxes (left, top, right, bottom) in the ORIGINAL image for masks (R, h, w).

    The mask grid covers the canvas the host encoded; `content` is where the original image
    lies on that canvas, as fractions (left, top, right, bottom); None = the whole canvas (the
    image was resized, even non-uniformly, to the encoded size). "strip": full-width band between
    the mask's top and bottom rows (the paper's figure); "box": tight box. `margin` grows each
    side by that fraction of the box's height (and width, for "box"). Empty masks, and masks that
    lie only on the padding, give the whole image."""
    m = masks.detach().cpu().numpy() if isinstance(masks, torch.Tensor) else np.asarray(masks)
    if m.ndim != 3:
        raise GeometryError(f"masks have shape {m.shape}; expected (R, h, w)")
    if style not in ("strip", "box"):
        raise CharacterAdapterError(f"crop style must be 'strip' or 'box', got {style!r}")
    if margin < 0:
        raise CharacterAdapterError(f"crop margin must be >= 0, got {margin}")
    W, H = int(image_size[0]), int(image_size[1])
    if W <= 0 or H <= 0:
        raise GeometryError(f"image size {W}x{H} is empty")
    cx0, cy0, cx1, cy1 = _check_content(content)
    h, w = m.shape[1:]
    out = []
    for mask in m.astype(bool):
        box = _grid_box(mask)
        if box is None:
            out.append((0, 0, W, H))
            continue
        # grid cell edges -> canvas fractions -> original pixels
        x0 = (box[0] / w - cx0) / (cx1 - cx0) * W
        x1 = (box[2] / w - cx0) / (cx1 - cx0) * W
        y0 = (box[1] / h - cy0) / (cy1 - cy0) * H
        y1 = (box[3] / h - cy0) / (cy1 - cy0) * H
        if style == "strip":
            x0, x1 = 0.0, float(W)
        dy = margin * (y1 - y0)
        dx = margin * (x1 - x0) if style == "box" else 0.0
        left = max(0, int(np.floor(x0 - dx + 1e-6)))
        top = max(0, int(np.floor(y0 - dy + 1e-6)))
        right = min(W, int(np.ceil(x1 + dx - 1e-6)))
        bottom = min(H, int(np.ceil(y1 + dy - 1e-6)))
        if right <= left or bottom <= top:
            out.append((0, 0, W, H))  # the mask lies on the padding only
            continue
        out.append((left, top, right, bottom))
    return out


def _check_content(content: Optional[Frac]) -> Frac:
    """Validate the content rectangle (fractions of the canvas); default the whole canvas."""
    if content is None:
        return 0.0, 0.0, 1.0, 1.0
    cx0, cy0, cx1, cy1 = (float(c) for c in content)
    if not (0.0 <= cx0 < cx1 <= 1.0 and 0.0 <= cy0 < cy1 <= 1.0):
        raise GeometryError(f"content rectangle {content} must satisfy 0 <= left < right <= 1, 0 <= top < bottom <= 1")
    return cx0, cy0, cx1, cy1


def region_crops(image: Image.Image, boxes: Sequence[Box],
                 pad_color: Tuple[int, int, int] = GREY) -> List[Image.Image]:
    """Crop each box from the image and pad it to a square (never centre-crop)."""
    W, H = image.size
    crops = []
    for i, (left, top, right, bottom) in enumerate(boxes):
        if not (0 <= left < right <= W and 0 <= top < bottom <= H):
            raise GeometryError(f"box {i} {(left, top, right, bottom)} is not inside the {W}x{H} image")
        crops.append(pad_to_square(image.crop((left, top, right, bottom)), pad_color))
    return crops


def mask_overlay(image: Image.Image, labels: np.ndarray,
                 colors: Optional[Sequence[Tuple[int, int, int]]] = None, alpha: float = 0.45,
                 content: Optional[Frac] = None, boxes: Optional[Sequence[Box]] = None) -> Image.Image:
    """Tint each pixel of the image by the region label (h, w) of its grid cell (-1: none)."""
    colors = list(colors) if colors else PALETTE
    rgb = image.convert("RGB")
    W, H = rgb.size
    h, w = labels.shape
    cx0, cy0, cx1, cy1 = _check_content(content)
    # grid cell of each pixel centre: pixel -> canvas fraction -> cell
    cols = np.floor((cx0 + (np.arange(W) + 0.5) / W * (cx1 - cx0)) * w).astype(np.int64).clip(0, w - 1)
    rows = np.floor((cy0 + (np.arange(H) + 0.5) / H * (cy1 - cy0)) * h).astype(np.int64).clip(0, h - 1)
    shifted = (np.clip(labels, -1, 254) + 1).astype(np.uint8)  # (h, w): 0 = background, r + 1
    per_pixel = Image.fromarray(shifted[rows[:, None], cols[None, :]])  # (H, W), mode L
    tint = per_pixel.copy()  # putpalette makes an L image P, keeping the values as indices
    tint.putpalette([0, 0, 0] + [c for r in range(255) for c in colors[r % len(colors)]])
    opacity = int(round(255 * min(max(alpha, 0.0), 1.0)))
    mask = per_pixel.point(lambda v: opacity if v else 0)
    out = Image.composite(tint.convert("RGB"), rgb, mask)
    if boxes:
        draw = ImageDraw.Draw(out)
        width = max(1, round(min(W, H) / 200))
        for r, (left, top, right, bottom) in enumerate(boxes):
            draw.rectangle((left, top, right - 1, bottom - 1), outline=colors[r % len(colors)], width=width)
    return out
