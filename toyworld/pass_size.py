"""How small can the reference pass be before the masks degrade? ``python -m toyworld.pass_size``

The toy model was trained at 32x32 (its native area). Each held-out reference is resized (LANCZOS,
as the extension resizes a reference) to S x S, segmented there with the extension's own
`segment_reference` (the toy's 16x16-at-32px maps, level 1), and its masks are brought back to
32x32 (nearest) and compared with the true masks: IoU per region, and the error of each region's
strip (its top and bottom row, what a "strip" crop keeps) in pixels of the 32-pixel reference.
"oracle" is the IoU of masks made the same way from ideal maps on the same grid (the true masks,
area-averaged, blurred by one cell; charadapter.bench_pass): the part of the loss that the grid
alone explains, apart from how the model's attention changes away from its training size.
Prints a table, then one JSON line.
"""

import argparse
import json
import time
from typing import Dict, List, Sequence

import numpy as np
import torch
from PIL import Image

from charadapter.bench_pass import grid_map
from charadapter.geometry import downsampled_hw
from charadapter.segmentation import aggregate_maps, masks_from_maps

from . import data
from .evaluate import MAP_LEVELS, TextWorld, iou
from .model import WEIGHTS, load_sd

SIZES = (16, 24, 32, 40, 48, 64)  # multiples of 8: the toy UNet halves three times
TIMESTEPS = (150, 650)


def resized(image: np.ndarray, side: int) -> np.ndarray:
    """The reference at side x side, resized the way the extension resizes one (LANCZOS)."""
    if side == image.shape[0]:
        return image
    return np.asarray(Image.fromarray(image).resize((side, side), Image.LANCZOS), dtype=np.uint8)


def to_native(masks: np.ndarray, side: int) -> np.ndarray:
    """Masks (R, h, w) bool -> (R, side, side) bool, nearest."""
    return np.stack([np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize((side, side), Image.NEAREST)) > 127
                     for m in masks])


def strip_error(mask: np.ndarray, truth: np.ndarray) -> float:
    """Mean |top| and |bottom| row difference (pixels) of a mask's band vs the true region's."""
    rows, true_rows = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(truth.any(axis=1))
    if rows.size == 0:  # an empty region's crop is the whole image
        rows = np.array([0, mask.shape[0] - 1])
    return 0.5 * (abs(rows[0] - true_rows[0]) + abs(rows[-1] - true_rows[-1]))


def per_reference(world: TextWorld, samples: Sequence[data.Sample], side: int, timestep: int):
    """IoU (refs, R) and strip error in pixels (refs, R) of every reference segmented at `side`."""
    ious: List[List[float]] = []
    strips: List[List[float]] = []
    for s in samples:
        phrases = [data.region_phrase(s.character, r) for r in data.REGIONS]
        result = world.segment(resized(s.image, side), phrases, timestep)
        masks = to_native(result.masks, data.SIZE)
        ious.append([iou(masks[r], s.masks[r]) for r in range(len(data.REGIONS))])
        strips.append([strip_error(masks[r], s.masks[r]) for r in range(len(data.REGIONS))])
    return np.asarray(ious), np.asarray(strips)


def oracle(samples: Sequence[data.Sample], side: int) -> np.ndarray:
    """IoU (refs, R) of masks made the same way from ideal maps (each true mask area-averaged onto
    the map grid of a pass at `side`, blurred by one cell): what the grid alone loses."""
    ious = []
    for s in samples:
        truth = np.stack([to_native(m[None], side)[0] for m in s.masks])  # (R, side, side)
        maps = [torch.stack([grid_map(m, downsampled_hw((side, side), level)) for m in truth]) for level in MAP_LEVELS]
        masks = to_native(masks_from_maps(aggregate_maps(maps, (side, side))).masks, data.SIZE)
        ious.append([iou(masks[r], s.masks[r]) for r in range(len(data.REGIONS))])
    return np.asarray(ious)


def summary(ious: np.ndarray, strips: np.ndarray, native: np.ndarray) -> Dict[str, float]:
    """Means over references; `drop`: paired IoU difference to the native size, with its s.e."""
    per_ref = ious.mean(axis=1)
    diff = per_ref - native.mean(axis=1)
    n = len(per_ref)
    return {
        "iou": round(float(per_ref.mean()), 3),
        "iou_se": round(float(per_ref.std(ddof=1) / np.sqrt(n)), 3),
        **{f"iou_{r}": round(float(ious[:, i].mean()), 3) for i, r in enumerate(data.REGIONS)},
        "strip_px": round(float(strips.mean()), 2),
        "drop": round(float(diff.mean()), 3),
        "drop_se": round(float(diff.std(ddof=1) / np.sqrt(n)), 3),
    }


def main(argv=None) -> Dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--refs", type=int, default=48, help="held-out references")
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="pass sides in pixels (multiples of 8)")
    parser.add_argument("--timesteps", default=",".join(map(str, TIMESTEPS)))
    parser.add_argument("--weights", default=WEIGHTS)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    world = TextWorld(load_sd(args.weights), MAP_LEVELS)
    samples = data.held_out(args.refs)
    sizes = [int(v) for v in args.sizes.split(",")]
    timesteps = [int(v) for v in args.timesteps.split(",")]
    start = time.perf_counter()
    rows = {}
    print(f"{'T':>4} {'side':>4} {'area':>6} {'IoU':>6} {'±se':>6} {'face':>6} {'jacket':>6} {'trousers':>8} "
          f"{'strip px':>8} {'Δ vs 32':>8} {'±se':>6} {'oracle':>6}")
    for t in timesteps:
        native = per_reference(world, samples, data.SIZE, t)
        for side in sizes:
            row = summary(*(native if side == data.SIZE else per_reference(world, samples, side, t)), native[0])
            row["area"] = round(side * side / data.SIZE ** 2, 3)
            row["oracle_iou"] = round(float(oracle(samples, side).mean()), 3)
            rows[f"{t}/{side}"] = row
            print(f"{t:>4} {side:>4} {row['area']:>6} {row['iou']:>6} {row['iou_se']:>6} {row['iou_face']:>6} "
                  f"{row['iou_jacket']:>6} {row['iou_trousers']:>8} {row['strip_px']:>8} "
                  f"{row['drop']:>8} {row['drop_se']:>6} {row['oracle_iou']:>6}", flush=True)
    out = {"refs": len(samples), "map_levels": list(MAP_LEVELS), "rows": rows,
           "seconds": round(time.perf_counter() - start, 1)}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
