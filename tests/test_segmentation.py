"""Segmentation math: maps -> masks -> boxes -> crops, on synthetic maps with a known answer."""

from collections import deque

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from charadapter.errors import CharacterAdapterError, GeometryError
from charadapter.segmentation import (
    SegmentationResult,
    aggregate_maps,
    connected_components,
    masks_from_maps,
    region_boxes,
    region_crops,
)

N = 64  # latent grid side of the synthetic reference


def truth_masks() -> np.ndarray:
    """(3, 64, 64) bool: face ellipse, jacket rectangle, two-legged trousers."""
    yy, xx = np.mgrid[0:N, 0:N]
    face = ((yy - 12) / 7.5) ** 2 + ((xx - 32) / 6.5) ** 2 <= 1.0
    jacket = (yy >= 21) & (yy <= 38) & (xx >= 20) & (xx <= 44)
    hips = (yy >= 39) & (yy <= 44) & (xx >= 22) & (xx <= 42)
    legs = (yy >= 45) & (yy <= 60) & (((xx >= 22) & (xx <= 30)) | ((xx >= 34) & (xx <= 42)))
    return np.stack([face, jacket, hips | legs])


def blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (R, h, w) maps."""
    r = int(3 * sigma)
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-t ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    x = x[:, None]  # (R, h, w) -> (R, 1, h, w)
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))
    return x[:, 0]  # (R, 1, h, w) -> (R, h, w)


def fake_layer_maps(truth: np.ndarray, seed: int, levels=(0, 1), spill=0.3, noise=0.05):
    """Per-layer (R, N_layer) 'attention' maps: blurred truth, weaker spill into the other
    regions, a floor, Gaussian noise; one layer per UNet level (area-downsampled)."""
    g = torch.Generator().manual_seed(seed)
    b = blur(torch.from_numpy(truth).float(), 1.5)
    maps = b + spill * (b.sum(0, keepdim=True) - b) + 0.05
    out = []
    for lv in levels:
        s = N >> lv
        m = F.interpolate(maps[None], size=(s, s), mode="area")[0]
        m = m + noise * torch.randn(m.shape, generator=g)
        out.append(m.clamp_min(0).reshape(truth.shape[0], s * s))  # (R, s, s) -> (R, N)
    return out


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def test_synthetic_blobs_recovered():
    truth = truth_masks()
    for seed in range(3):
        maps = aggregate_maps(fake_layer_maps(truth, seed), (N, N))
        assert maps.shape == (3, N, N)
        res = masks_from_maps(maps, threshold=0.5)
        ious = [iou(res.masks[r], truth[r]) for r in range(3)]
        print(f"seed {seed}: IoU face/jacket/trousers = " + " / ".join(f"{v:.3f}" for v in ious))
        assert min(ious) >= 0.9, ious
        assert res.empty == [False, False, False]
        assert not (res.masks.sum(0) > 1).any()  # disjoint
        assert res.soft.shape == (3, N, N) and res.soft.min() >= 0 and res.soft.max() <= 1
    # the leg gap is open at the bottom: not a hole, stays background
    assert not res.masks[2, 52, 32]


def test_zero_attention_region_is_empty_and_falls_back():
    truth = truth_masks()
    layers = fake_layer_maps(truth, 0)
    layers = [torch.cat([m, torch.zeros(1, m.shape[1])]) for m in layers]  # 4th region: no attention
    res = masks_from_maps(aggregate_maps(layers, (N, N)))
    assert res.empty == [False, False, False, True]
    assert res.grid_boxes[3] is None and not res.masks[3].any()
    boxes = res.boxes((300, 500))
    assert boxes[3] == (0, 0, 300, 500)
    crops = region_crops(Image.new("RGB", (300, 500), (10, 20, 30)), boxes)
    assert crops[3].size == (500, 500)
    # a constant (flat) map says nothing either
    flat = torch.full((1, N, N), 0.3)
    res2 = masks_from_maps(torch.cat([aggregate_maps(layers[:1], (N, N))[:3], flat]))
    assert res2.empty[3]


def test_identical_maps_lowest_index_wins():
    truth = truth_masks()
    maps = aggregate_maps(fake_layer_maps(truth, 1), (N, N))
    dup = torch.cat([maps, maps[1:2]])  # region 3 duplicates region 1 ("jacket" twice)
    res = masks_from_maps(dup)
    assert not res.empty[1] and res.empty[3]
    again = masks_from_maps(dup)
    assert np.array_equal(res.masks, again.masks)


def test_holes_filled_only_background():
    maps = np.zeros((2, 20, 20))
    maps[0, 3:15, 3:15] = 1.0
    maps[0, 6:9, 6:9] = 0.0  # background hole -> filled
    maps[0, 10:13, 10:13] = 0.0
    maps[1, 10:13, 10:13] = 1.0  # region 1 nested inside region 0: kept
    res = masks_from_maps(maps)
    assert res.masks[0, 6:9, 6:9].all()
    assert res.masks[1, 10:13, 10:13].all() and res.masks[1].sum() == 9
    assert not res.masks[0, 10:13, 10:13].any()
    # a concavity open to the border is not a hole
    maps2 = np.zeros((1, 10, 10))
    maps2[0, 2:8, 2:8] = 1.0
    maps2[0, 4:10, 4:6] = 0.0  # channel from the inside down to the bottom edge
    res2 = masks_from_maps(maps2)
    assert not res2.masks[0, 5, 4]
    # without cleanup the hole stays
    no = masks_from_maps(maps, cleanup=False)
    assert not no.masks[0, 7, 7]


def test_no_background_left():
    maps = np.zeros((2, 6, 6))
    maps[0, :, :3] = 1.0
    maps[1, :, 3:] = 1.0
    maps[0, 0, 0], maps[1, 0, 0] = 0.0, 1.0  # a stray cell of region 1 in region 0's half: dropped
    res = masks_from_maps(maps, threshold=0.5)
    assert res.masks[0].sum() == 17 and res.masks[1].sum() == 18
    assert not res.masks[0, 0, 0] and not res.masks[1, 0, 0]  # on the border: not a hole


def test_only_largest_component_kept():
    maps = np.zeros((2, 16, 16))
    maps[0, 1:4, 1:4] = 1.0  # 9 cells
    maps[0, 8:14, 8:14] = 1.0  # 36 cells: kept
    maps[1, 0:2, 12:16] = 1.0
    res = masks_from_maps(maps)
    assert res.masks[0].sum() == 36 and not res.masks[0, 2, 2]
    assert res.grid_boxes[0] == (8, 8, 14, 14)
    raw = masks_from_maps(maps, cleanup=False)
    assert raw.masks[0].sum() == 45
    # diagonal neighbours are not 4-connected
    diag = np.zeros((1, 6, 6))
    diag[0, 0, 0] = diag[0, 1, 1] = diag[0, 2, 2] = 1.0
    diag[0, 4, 3:6] = 1.0
    assert masks_from_maps(diag).masks[0].sum() == 3 and masks_from_maps(diag).masks[0, 4, 3:].all()


def _bfs_labels(mask, conn):
    """Reference labelling by breadth-first search."""
    h, w = mask.shape
    lab = np.zeros((h, w), int)
    steps = [(0, 1), (1, 0), (0, -1), (-1, 0)]
    if conn == 8:
        steps += [(1, 1), (1, -1), (-1, 1), (-1, -1)]
    k = 0
    for r in range(h):
        for c in range(w):
            if mask[r, c] and not lab[r, c]:
                k += 1
                lab[r, c] = k
                q = deque([(r, c)])
                while q:
                    y, x = q.popleft()
                    for dy, dx in steps:
                        yy, xx = y + dy, x + dx
                        if 0 <= yy < h and 0 <= xx < w and mask[yy, xx] and not lab[yy, xx]:
                            lab[yy, xx] = k
                            q.append((yy, xx))
    return lab


@pytest.mark.parametrize("conn", [4, 8])
def test_connected_components_match_bfs(conn):
    rng = np.random.default_rng(conn)
    for p in (0.3, 0.5, 0.6):
        mask = rng.random((37, 23)) < p
        ours, sizes = connected_components(mask, conn)
        ref = _bfs_labels(mask, conn)
        assert np.array_equal(ours, ref)  # both number components in raster order
        assert sizes.tolist() == [int((ref == k).sum()) for k in range(1, ref.max() + 1)]
    empty, sizes = connected_components(np.zeros((4, 5), bool), conn)
    assert not empty.any() and sizes.size == 0


def _reference_cleanup(labels, regions):
    """The documented rule, written the slow way: per region, largest 4-component (first in
    raster order on ties); then each 8-component of its complement that is off the border and
    holds only background is filled."""
    kept = np.full_like(labels, -1)
    for r in range(regions):
        lab = _bfs_labels(labels == r, 4)
        if lab.max():
            sizes = [(lab == k).sum() for k in range(1, lab.max() + 1)]
            kept[lab == int(np.argmax(sizes)) + 1] = r
    out = kept.copy()
    for r in range(regions):
        comp = _bfs_labels(kept != r, 8)
        border = set(comp[0]) | set(comp[-1]) | set(comp[:, 0]) | set(comp[:, -1])
        for k in range(1, comp.max() + 1):
            cells = comp == k
            if k not in border and (kept[cells] == -1).all():
                out[cells] = r
    return out


def test_cleanup_matches_reference_rule():
    g = torch.Generator().manual_seed(3)
    for trial in range(6):
        coarse = torch.rand(1, 4, 6, 5, generator=g)
        maps = F.interpolate(coarse, size=(30, 25), mode="bilinear")[0] + 0.1 * torch.rand(4, 30, 25, generator=g)
        raw = masks_from_maps(maps, threshold=0.6, cleanup=False).labels
        ours = masks_from_maps(maps, threshold=0.6).labels
        assert np.array_equal(ours, _reference_cleanup(raw, 4)), trial


def test_connected_components_serpentine_128():
    m = np.zeros((128, 128), bool)
    m[0::2, :] = True
    m[1::4, 127] = True
    m[3::4, 0] = True
    labels, sizes = connected_components(m, 4)
    assert sizes.tolist() == [int(m.sum())]


def test_aggregate_two_levels_geometry():
    latent = (45, 60)  # odd sizes: ceil halving -> 23x30, 12x15
    a = torch.rand(2, 23 * 30)
    b = torch.rand(2, 12 * 15)
    out = aggregate_maps([a, b], latent)
    assert out.shape == (2, 45, 60)
    # constant maps stay constant through upsampling and averaging
    c = aggregate_maps([torch.full((2, 23 * 30), 0.2), torch.full((2, 12 * 15), 0.4)], latent)
    assert torch.allclose(c, torch.full_like(c, 0.3), atol=1e-6)
    # a single full-resolution layer passes through unchanged
    d = torch.rand(3, 45 * 60)
    assert torch.allclose(aggregate_maps([d], latent), d.reshape(3, 45, 60))


def test_aggregate_mismatch_names_shapes():
    with pytest.raises(GeometryError) as err:
        aggregate_maps([torch.rand(3, 32 * 32), torch.rand(3, 250)], (64, 64))
    msg = str(err.value)
    assert "(3, 250)" in msg and "N=250" in msg and "64x64" in msg and "layer map 1" in msg
    with pytest.raises(GeometryError, match="expected"):
        aggregate_maps([torch.rand(3, 256), torch.rand(2, 256)], (64, 64))
    with pytest.raises(GeometryError):
        aggregate_maps([], (64, 64))


def test_bad_inputs():
    with pytest.raises(GeometryError):
        masks_from_maps(np.zeros((4, 4)))
    with pytest.raises(CharacterAdapterError):
        masks_from_maps(np.full((1, 4, 4), np.nan))
    with pytest.raises(CharacterAdapterError):
        masks_from_maps(np.zeros((1, 4, 4)), threshold=1.5)


def _mask(rows, cols, shape=(64, 64)):
    m = np.zeros((1,) + shape, bool)
    m[0, rows[0]:rows[1], cols[0]:cols[1]] = True
    return m


def test_strip_spans_full_width():
    m = _mask((16, 32), (20, 30))
    (box,) = region_boxes(m, (512, 512), style="strip", margin=0.0)
    assert box == (0, 128, 512, 256)
    (box,) = region_boxes(m, (512, 512), style="strip", margin=0.25)
    assert box == (0, 96, 512, 288)  # vertical margin: 0.25 * 128 px each side


def test_box_margin_and_clamp():
    m = _mask((16, 32), (20, 30))
    (tight,) = region_boxes(m, (640, 640), style="box", margin=0.0)
    assert tight == (200, 160, 300, 320)
    (wide,) = region_boxes(m, (640, 640), style="box", margin=0.1)
    assert wide == (190, 144, 310, 336)
    (edge,) = region_boxes(_mask((0, 10), (50, 64)), (640, 640), style="box", margin=0.5)
    assert edge == (430, 0, 640, 150)  # clamped to the image


def test_boxes_scale_to_original_non_square():
    m = _mask((16, 48), (8, 24), shape=(64, 32))  # grid h=64, w=32
    assert region_boxes(m, (40, 10000), style="box", margin=0.0) == [(10, 2500, 30, 7500)]
    assert region_boxes(m, (40, 10000), style="strip", margin=0.0) == [(0, 2500, 40, 7500)]
    m2 = _mask((8, 24), (16, 48), shape=(32, 64))
    assert region_boxes(m2, (10000, 40), style="box", margin=0.0) == [(2500, 10, 7500, 30)]
    assert region_boxes(m2, (10000, 40), style="strip", margin=0.0) == [(0, 10, 10000, 30)]
    # the reference was resized to 576x512 for encoding (grid 64x72): boxes stay in original pixels
    m3 = _mask((32, 64), (0, 36), shape=(64, 72))
    assert region_boxes(m3, (700, 600), style="box", margin=0.0) == [(0, 300, 350, 600)]


def test_boxes_with_letterbox_content():
    # a 1000x500 image letterboxed on a square canvas: content rows 0.25..0.75
    content = (0.0, 0.25, 1.0, 0.75)
    m = _mask((16, 32), (0, 64))  # canvas rows 0.25..0.5 -> image rows 0..250
    assert region_boxes(m, (1000, 500), style="strip", margin=0.0, content=content) == [(0, 0, 1000, 250)]
    pad_only = _mask((0, 8), (0, 64))  # lies on the padding: whole image
    assert region_boxes(pad_only, (1000, 500), content=content) == [(0, 0, 1000, 500)]
    with pytest.raises(GeometryError):
        region_boxes(m, (1000, 500), content=(0.5, 0, 0.4, 1))


def test_crops_padded_to_square_keep_content():
    img = Image.new("RGB", (100, 400), (200, 0, 0))
    img.paste((0, 200, 0), (0, 0, 100, 10))  # green hat at the top
    img.paste((0, 0, 200), (0, 390, 100, 400))  # blue feet at the bottom
    (crop,) = region_crops(img, [(0, 0, 100, 400)])
    assert crop.size == (400, 400)
    assert crop.getpixel((200, 5)) == (0, 200, 0) and crop.getpixel((200, 395)) == (0, 0, 200)
    assert crop.getpixel((10, 200)) == (127, 127, 127)  # side padding, neutral
    (wide,) = region_crops(img, [(0, 100, 100, 150)], pad_color=(1, 2, 3))
    assert wide.size == (100, 100) and wide.getpixel((50, 5)) == (1, 2, 3)
    with pytest.raises(GeometryError):
        region_crops(img, [(0, 0, 101, 10)])


def test_overlay_colours_regions():
    maps = np.zeros((2, 8, 8))
    maps[0, 0:4] = 1.0
    maps[1, 4:8, 0:4] = 1.0
    res = masks_from_maps(maps)
    assert isinstance(res, SegmentationResult)
    img = Image.new("RGB", (80, 160), (0, 0, 0))
    over = res.to_overlay(img, colors=[(255, 0, 0), (0, 0, 255)], alpha=1.0, boxes=res.boxes((80, 160)))
    assert over.size == (80, 160)
    assert over.getpixel((40, 40)) == (255, 0, 0)
    assert over.getpixel((20, 120)) == (0, 0, 255)
    assert over.getpixel((60, 120)) == (0, 0, 0)  # background untouched
    half = res.to_overlay(img, alpha=0.5)
    assert 0 < half.getpixel((40, 40))[0] < 255
