"""The OpenCV connected components and hole filling give exactly the masks the former numpy
union-find gave: the former code is kept here, unchanged, as the oracle."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from charadapter.segmentation import _cleanup, connected_components, masks_from_maps

# ---- the former implementation (charadapter/segmentation.py before OpenCV), the oracle -----------

_OFFSETS = {4: ((0, 1), (1, 0)), 8: ((0, 1), (1, 0), (1, 1), (1, -1))}  # each undirected edge once


def _neighbour_pairs(h, w, connectivity):
    for dy, dx in _OFFSETS[connectivity]:
        a = (slice(0, h - dy), slice(max(0, -dx), w - max(0, dx)))
        b = (slice(dy, h), slice(max(0, dx), w - max(0, -dx)))
        yield a, b, dy * w + dx, max(0, -dx)


def _old_components(values, active, connectivity):
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
        live = ru != rv
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
    labels[flat] = inverse.reshape(-1) + 1
    return labels.reshape(h, w), sizes


def old_connected_components(mask, connectivity=4):
    mask = np.asarray(mask, dtype=bool)
    return _old_components(np.zeros(mask.shape, dtype=np.int8), mask, connectivity)


def old_cleanup(labels, regions):
    comp, sizes = _old_components(labels, labels >= 0, 4)
    if sizes.size == 0:
        return labels
    comp_ids, first = np.unique(comp.ravel(), return_index=True)
    first = first[comp_ids > 0]
    region_of = labels.ravel()[first]
    keep = np.zeros(sizes.size + 1, dtype=bool)
    for r in range(regions):
        mine = np.flatnonzero(region_of == r)
        if mine.size:
            keep[mine[np.argmax(sizes[mine])] + 1] = True
    kept = np.where(keep[comp], labels, -1)
    background = kept < 0
    holes, hole_sizes = _old_components(kept, background, 8)
    if hole_sizes.size == 0:
        return kept
    h, w = kept.shape
    pairs = []
    for a, b, _, _ in _neighbour_pairs(h, w, 8):
        for x, y in ((a, b), (b, a)):
            touch = background[x] & ~background[y]
            pairs.append(np.stack([holes[x][touch], kept[y][touch]], axis=1))
    pairs = np.unique(np.concatenate(pairs), axis=0)
    n_regions = np.bincount(pairs[:, 0], minlength=hole_sizes.size + 1)
    owner = np.full(hole_sizes.size + 1, -1, dtype=np.int64)
    owner[pairs[:, 0]] = pairs[:, 1]
    fill = n_regions == 1
    fill[np.unique(np.concatenate([holes[0], holes[-1], holes[:, 0], holes[:, -1]]))] = False
    fill[0] = False
    return np.where(fill[holes], owner[holes], kept)


# ---- masks: random and built to break things -------------------------------------------------------


def adversarial_masks():
    """Named bool grids where 4- and 8-connectivity, raster order or long chains matter."""
    yy, xx = np.mgrid[0:33, 0:31]
    serpentine = np.zeros((40, 40), bool)
    serpentine[0::2, :] = True
    serpentine[1::4, 39] = True
    serpentine[3::4, 0] = True
    spiral = np.zeros((31, 31), bool)
    top, left, bottom, right = 0, 0, 30, 30
    while top <= bottom and left <= right:  # a one-cell-wide inward spiral: one long chain
        spiral[top, left:right + 1] = spiral[top:bottom + 1, right] = True
        spiral[bottom, left:right + 1] = spiral[top + 2:bottom + 1, left] = True
        top, left, bottom, right = top + 2, left + 2, bottom - 2, right - 2
    radius = np.hypot(yy - 16, xx - 15)
    return {
        "checkerboard": (yy + xx) % 2 == 0,  # 4: every cell alone; 8: one component
        "diagonals": (yy - xx) % 3 == 0,
        "anti-diagonals": (yy + xx) % 4 == 0,  # joined only through the (1, -1) neighbour
        "serpentine": serpentine,
        "spiral": spiral,
        "rings": (radius.astype(int) % 4) < 2,  # nested rings: holes inside holes
        "all": np.ones((5, 7), bool),
        "none": np.zeros((6, 4), bool),
        "one cell": np.ones((1, 1), bool),
        "row": np.array([[1, 0, 1, 1, 0, 0, 1]], bool),
        "column": np.array([[1], [1], [0], [1]], bool),
        "border frame": (yy == 0) | (xx == 0) | (yy == 32) | (xx == 30),
        "equal blobs": ((yy % 8) < 3) & ((xx % 8) < 3),  # same sizes: ties go to raster order
    }


@pytest.mark.parametrize("connectivity", [4, 8])
def test_components_equal_the_former_union_find(connectivity):
    rng = np.random.default_rng(connectivity)
    masks = list(adversarial_masks().items())
    for i in range(300):
        h, w = rng.integers(1, 48, size=2)
        masks.append((f"random {i}", rng.random((h, w)) < rng.random()))
    for name, mask in masks:
        labels, sizes = connected_components(mask, connectivity)
        old_labels, old_sizes = old_connected_components(mask, connectivity)
        assert labels.dtype == np.int64 and sizes.dtype == np.int64, name
        assert np.array_equal(labels, old_labels) and np.array_equal(sizes, old_sizes), name


def test_components_read_any_truthy_grid_like_before():
    grid = np.array([[0, 2, 0], [0.5, 0, -1], [0, 0, 256]])
    for connectivity in (4, 8):
        labels, sizes = connected_components(grid, connectivity)
        old_labels, old_sizes = old_connected_components(grid, connectivity)
        assert np.array_equal(labels, old_labels) and np.array_equal(sizes, old_sizes)
    with pytest.raises(ValueError):
        connected_components(grid, 6)


def label_grids(rng, count):
    """Region label grids (-1 background): noise, smooth blobs, and masks made into nested regions."""
    for i in range(count):
        h, w = (int(v) for v in rng.integers(1, 40, size=2))
        regions = int(rng.integers(1, 5))
        if i % 3 == 0:
            yield rng.integers(-1, regions, size=(h, w)), regions
        else:
            coarse = torch.from_numpy(rng.random((1, regions + 1, max(h // 5, 1), max(w // 5, 1)))).float()
            smooth = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)[0]
            yield smooth.argmax(dim=0).numpy().astype(np.int64) - 1, regions
    for name, mask in adversarial_masks().items():
        yield np.where(mask, 0, -1).astype(np.int64), 1
        rings = np.where(mask, 1, -1).astype(np.int64)
        rings[::5, ::7] = 0  # a second region sprinkled over it: holes touching two regions
        yield rings, 2


def test_cleanup_equals_the_former_implementation():
    rng = np.random.default_rng(7)
    for labels, regions in label_grids(rng, 300):
        ours = _cleanup(labels, regions)
        assert ours.dtype == np.int64
        assert np.array_equal(ours, old_cleanup(labels, regions)), (labels, regions)


def test_masks_from_maps_equal_the_former_implementation():
    g = torch.Generator().manual_seed(11)
    for trial in range(40):
        regions = 1 + trial % 4
        coarse = torch.rand(1, regions, 5, 4, generator=g)
        maps = F.interpolate(coarse, size=(24, 20), mode="bilinear")[0] + 0.2 * torch.rand(regions, 24, 20, generator=g)
        for threshold in (0.3, 0.6):
            raw = masks_from_maps(maps, threshold=threshold, cleanup=False).labels
            assert np.array_equal(masks_from_maps(maps, threshold=threshold).labels, old_cleanup(raw, regions))
