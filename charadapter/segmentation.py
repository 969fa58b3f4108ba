"""Prompt-guided segmentation of the reference: attention maps -> region masks -> crops.

Host-free: the host captures the text cross-attention maps of each region phrase (averaged over
heads and the phrase's tokens); everything after that is here, in torch / numpy / OpenCV / PIL.

Fallbacks (documented behaviour, flagged so the host can warn the user):
- A region that ends up with no cell (zero or flat attention, or beaten everywhere by another
  region) is marked ``empty``; its box and crop are the whole image.
- Ties between regions go to the lowest region index, so two identical maps (a duplicated
  phrase) give the first region the cells and leave the second one empty.
"""

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
from PIL import Image

from .errors import CharacterAdapterError, GeometryError
from .geometry import Box, Frac, content_rect, grid_for_positions
from .images import GREY, pad_to_square
from .masks import merge_maps
from .overlays import mask_overlay


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


def connected_components(mask: np.ndarray, connectivity: int = 4) -> Tuple[np.ndarray, np.ndarray]:
    """Label the components of a bool grid (h, w): labels 1..K in raster order of first cell
    (0 = outside the mask), and sizes (K,)."""
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
    grid = np.asarray(mask, dtype=bool).astype(np.uint8)  # (h, w) 0 / 1, contiguous
    if grid.ndim != 2:
        raise ValueError(f"expected a mask of shape (h, w), got {grid.shape}")
    if grid.size == 0:  # OpenCV crashes on an empty image
        return np.zeros(grid.shape, dtype=np.int64), np.zeros(0, dtype=np.int64)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(grid, connectivity=connectivity, ltype=cv2.CV_32S)
    # OpenCV's numbering depends on its algorithm (and threads): renumber by first cell
    ids, first = np.unique(labels.ravel(), return_index=True)
    ids, first = ids[ids > 0], first[ids > 0]
    ids = ids[np.argsort(first, kind="stable")]  # OpenCV label of the k-th component in raster order
    renumber = np.zeros(count, dtype=np.int64)
    renumber[ids] = np.arange(1, ids.size + 1)
    return renumber[labels], stats[ids, cv2.CC_STAT_AREA].astype(np.int64)


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
    kept = np.full_like(labels, -1)
    for r in range(regions):
        parts, sizes = connected_components(labels == r, 4)
        if sizes.size:
            kept[parts == int(np.argmax(sizes)) + 1] = r  # argmax: ties go to the first in raster order

    background = kept < 0
    holes, hole_sizes = connected_components(background, 8)
    if hole_sizes.size == 0:
        return kept
    touches = np.zeros((regions, hole_sizes.size + 1), dtype=bool)  # (R, K+1): region r borders hole k
    ring = np.ones((3, 3), dtype=np.uint8)  # the 8-neighbourhood
    for r in range(regions):
        near = cv2.dilate((kept == r).astype(np.uint8), ring).astype(bool) & background
        touches[r, holes[near]] = True
    fill = touches.sum(axis=0) == 1
    fill[np.unique(np.concatenate([holes[0], holes[-1], holes[:, 0], holes[:, -1]]))] = False
    fill[0] = False
    owner = touches.argmax(axis=0)  # (K+1,): the one region of a hole that is filled
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
    cx0, cy0, cx1, cy1 = content_rect(content)
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
