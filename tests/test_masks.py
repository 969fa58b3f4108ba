"""Properties of the mask functions, over seeded random maps."""

import pytest
import torch

from charadapter.errors import GeometryError
from charadapter.masks import (
    BACKGROUND, hard_masks, layout_labels, mask_logits, mask_pyramid, merge_maps, normalize_maps, resize_masks,
    soft_masks, uniform_masks,
)

SEEDS = range(8)


def _maps(seed, b=2, r=3, n=64):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(b, r, n, generator=gen) * 5 - 1


def test_normalize_range_and_constant_maps():
    for seed in SEEDS:
        m = normalize_maps(_maps(seed))
        assert m.min() >= 0 and m.max() <= 1
        assert torch.allclose(m.amin(-1), torch.zeros(2, 3)) and torch.allclose(m.amax(-1), torch.ones(2, 3))
    const = torch.full((1, 2, 10), 3.5)
    out = normalize_maps(const)
    assert torch.isfinite(out).all() and (out == 0).all()


@pytest.mark.parametrize("seed", SEEDS)
def test_soft_masks_sum_to_one_and_shape(seed):
    maps = _maps(seed)
    s = soft_masks(maps, temperature=0.2, background_logit=0.4)
    assert s.shape == (2, 4, 64)
    assert torch.allclose(s.sum(dim=1), torch.ones(2, 64), atol=1e-6)
    assert (s >= 0).all()


@pytest.mark.parametrize("seed", SEEDS)
def test_hard_is_one_hot_argmax_of_soft(seed):
    maps = _maps(seed)
    s = soft_masks(maps, temperature=0.3, background_logit=0.5)
    h = hard_masks(maps, background_logit=0.5)
    assert set(h.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(h.sum(dim=1), torch.ones(2, 64))
    assert torch.equal(h.argmax(dim=1), s.argmax(dim=1))


def test_background_is_channel_zero():
    maps = torch.tensor([[[0.0, 1.0, 0.2, 0.2], [0.0, 0.0, 1.0, 0.3]]])  # (1, R=2, N=4)
    h = hard_masks(maps, background_logit=0.5)
    assert BACKGROUND == 0
    # position 0: both regions at their minimum -> background; 1 -> region 0; 2 -> region 1; 3 -> background
    assert h.argmax(dim=1).tolist() == [[0, 1, 2, 0]]


@pytest.mark.parametrize("seed", SEEDS)
def test_permuting_regions_permutes_masks(seed):
    maps = _maps(seed, r=4)
    perm = torch.randperm(4, generator=torch.Generator().manual_seed(seed))
    full = torch.cat([torch.zeros(1, dtype=torch.long), perm + 1])  # background stays first
    assert torch.allclose(soft_masks(maps[:, perm], 0.25, 0.3), soft_masks(maps, 0.25, 0.3)[:, full], atol=1e-6)
    # hard: equal up to ties (each normalised map reaches exactly 1 somewhere; ties go to the lower channel)
    top2 = mask_logits(maps, 0.3).topk(2, dim=1).values
    untied = (top2[:, 0] > top2[:, 1]).unsqueeze(1)  # (B, 1, N)
    a, b = hard_masks(maps[:, perm], 0.3), hard_masks(maps, 0.3)[:, full]
    assert torch.equal(a * untied, b * untied)


@pytest.mark.parametrize("seed", SEEDS)
def test_small_temperature_approaches_hard(seed):
    maps = _maps(seed)
    logits = mask_logits(maps, 0.4)
    top2 = logits.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-2  # positions without a near tie
    h = hard_masks(maps, 0.4)
    errors = []
    for tau in (0.1, 0.01, 0.001):
        s = soft_masks(maps, tau, 0.4)
        errors.append((s - h).abs().amax(dim=1)[clear].max().item())
    assert errors[0] > errors[1] > errors[2] or errors[2] == 0.0
    assert errors[2] < 1e-3


def test_temperature_must_be_positive():
    with pytest.raises(ValueError, match="temperature"):
        soft_masks(_maps(0), 0.0, 0.5)


@pytest.mark.parametrize("src,dst", [((8, 8), (4, 4)), ((8, 8), (16, 16)), ((16, 24), (3, 5)), ((7, 5), (4, 3))])
def test_resize_keeps_range_and_partition(src, dst):
    for seed in SEEDS:
        maps = _maps(seed, n=src[0] * src[1])
        for masks in (soft_masks(maps, 0.2, 0.4), hard_masks(maps, 0.4)):
            out = resize_masks(masks, src, dst)
            assert out.shape == (2, 4, dst[0] * dst[1])
            assert out.min() >= 0 and out.max() <= 1
            assert torch.allclose(out.sum(dim=1), torch.ones(2, dst[0] * dst[1]), atol=1e-5)


def test_pyramid_grids_and_values():
    latent = (16, 24)
    masks = soft_masks(_maps(3, n=16 * 24), 0.2, 0.4)
    pyr = mask_pyramid(masks, latent, [0, 1, 2, 3, 1])
    assert sorted(pyr) == [(2, 3), (4, 6), (8, 12), (16, 24)]
    assert torch.allclose(pyr[(16, 24)], masks[:, 1:])
    for hw, m in pyr.items():
        assert m.shape == (2, 3, hw[0] * hw[1])
        assert (m.sum(dim=1) <= 1 + 1e-5).all()


def test_geometry_errors_name_the_shapes():
    masks = soft_masks(_maps(0, n=60), 0.2, 0.4)
    with pytest.raises(GeometryError, match=r"8x8 has 64 cells, tensor has N=60"):
        resize_masks(masks, (8, 8), (4, 4))
    with pytest.raises(GeometryError, match=r"8x8 has 64 cells, tensor has N=60"):
        mask_pyramid(masks, (8, 8), [1])
    with pytest.raises(GeometryError, match=r"\(B, R, N\).*\(2, 60\)"):
        soft_masks(torch.rand(2, 60), 0.2, 0.4)


def test_uniform_prior_and_merge():
    u = uniform_masks(2, 3, 10)
    assert u.shape == (2, 4, 10) and (u[:, BACKGROUND] == 0).all()
    assert torch.allclose(u.sum(dim=1), torch.ones(2, 10))
    a = torch.rand(1, 2, 16)
    merged = merge_maps([((4, 4), a), ((2, 2), torch.ones(1, 2, 4))], (4, 4))
    assert torch.allclose(merged, (a + 1) / 2)


@pytest.mark.parametrize("src,dst", [((8, 8), (3, 5)), ((4, 6), (9, 13)), ((8, 4), (4, 9)), ((5, 7), (5, 7))])
def test_resize_never_overshoots(src, dst):
    """Area and bilinear resizing are convex combinations: no clamp is needed to stay in range."""
    from charadapter.geometry import resize_maps
    maps = _maps(1, b=2, r=3, n=src[0] * src[1])
    out = resize_maps(maps, src, dst)
    assert out.shape == (2, 3, dst[0] * dst[1])
    assert (out >= maps.amin(-1, keepdim=True) - 1e-6).all() and (out <= maps.amax(-1, keepdim=True) + 1e-6).all()


def test_area_pyramid_is_linear_and_keeps_partition():
    from charadapter.masks import area_pyramid
    latent = (12, 10)
    masks = soft_masks(_maps(4, n=120), 0.2, 0.4)  # (2, 4, N): background + 3 regions
    weights = torch.tensor([0.5, 1.0, 2.0, 0.8]).view(1, 4, 1)
    plain, weighted = area_pyramid(masks, latent, [0, 1, 2]), area_pyramid(masks * weights, latent, [0, 1, 2])
    for hw, m in plain.items():
        assert torch.allclose(m.sum(dim=1), torch.ones(2, hw[0] * hw[1]), atol=1e-5)
        assert torch.allclose(weighted[hw], m * weights, atol=1e-6)


@pytest.mark.parametrize("seed", SEEDS)
def test_layout_labels_name_the_winning_region(seed):
    """Show masks draws region r where channel r+1 wins, nothing (-1) where the background wins."""
    maps = _maps(seed, b=2, r=3, n=6 * 4)
    layout = soft_masks(maps, 0.1, 0.4)
    labels = layout_labels(layout, (6, 4))
    assert labels.shape == (2, 6, 4) and labels.dtype == torch.int64
    winner = hard_masks(maps, 0.4).argmax(dim=1).reshape(2, 6, 4)  # (B, N) -> (B, h, w)
    assert torch.equal(labels, winner - 1) and int(labels.min()) >= -1 and int(labels.max()) <= 2
    background = torch.zeros(1, 3, 8)
    background[:, BACKGROUND] = 1.0
    assert (layout_labels(background, (2, 4)) == -1).all()


# --- the channels-last path of the sampling loop, against the functions above ---------------------


def _channels_last_maps(seed, images=2, regions=3, n=64, flat=()):
    """Maps (I, N, R+1) as the fusion's canvas gives them: column 0 constant, all >= MAP_FLOOR."""
    from charadapter.masks import MAP_FLOOR
    gen = torch.Generator().manual_seed(seed)
    maps = torch.rand(images, n, regions + 1, generator=gen) * 3
    maps[..., 0] = 0.0
    for column in flat:  # an absent phrase: exactly flat
        maps[..., column] = 0.0
    return maps + MAP_FLOOR


@pytest.mark.parametrize("seed", SEEDS)
def test_fused_logits_are_mask_logits(seed):
    from charadapter.masks import fused_logits, one_hot_last
    maps = _channels_last_maps(seed, flat=(2,))
    temperature, background = 0.1, 0.4
    bias = torch.tensor([background / temperature, 0.0, 0.0, 0.0])
    logits = fused_logits(maps, bias, temperature, copies=2)  # (2, I, N, R+1)
    assert logits.shape == (2, 2, 64, 4) and torch.equal(logits[0], logits[1])
    reference = mask_logits(maps[..., 1:].transpose(1, 2), background) / temperature  # (I, R+1, N)
    assert torch.allclose(logits[0].transpose(1, 2), reference, atol=1e-4)
    assert (logits[0][..., 2] == 0).all()  # the flat map gives no evidence, exactly
    soft = torch.softmax(logits[0], dim=-1).transpose(1, 2)
    assert torch.allclose(soft, soft_masks(maps[..., 1:].transpose(1, 2), temperature, background), atol=1e-5)
    hard = one_hot_last(logits[0], torch.float16)
    assert hard.dtype == torch.float16
    assert torch.equal(hard.float().transpose(1, 2), hard_masks(maps[..., 1:].transpose(1, 2), background))


def test_pyramid_channels_last_is_the_area_pyramid():
    from charadapter.masks import area_pyramid, pyramid_channels_last
    latent = (12, 10)
    masks = torch.rand(3, 120, 4, generator=torch.Generator().manual_seed(3))  # (B, N, C)
    got = pyramid_channels_last(masks, latent, [0, 1, 2, 3])
    expected = area_pyramid(masks.transpose(1, 2), latent, [0, 1, 2, 3])  # (B, C, N) per grid
    assert set(got) == set(expected) == {(12, 10), (6, 5), (3, 3), (2, 2)}
    for hw, m in got.items():
        assert m.shape == (3, hw[0] * hw[1], 4)
        assert torch.allclose(m.transpose(1, 2), expected[hw], atol=1e-6), hw
    assert got[(12, 10)] is masks
