"""Finite output under extreme and degenerate maps: the mask math, the text maps, the region term
and the whole fusion (soft, hard, global) on a real tiny ldm UNet.

Real text maps are attention probabilities (in [0, 1]); these drive every stage with what no
healthy model gives (all zero, constant, huge: 1e4, 1e30, float16's max) and with degenerate
layouts (one region, everything background, a phrase with no tokens, no cond row carrying a
phrase), and require finite numbers everywhere: no stage may turn them into NaN or inf.
"""

import pytest
import torch

from charadapter import hooks as hooks_module
from charadapter.attention import (
    add_region_ip, head_mask, ip_heads, region_coefficients, region_ip_delta, text_map_matrix, text_maps,
)
from charadapter.fusion import FusionConfig, FusionSession, RowPlan
from charadapter.layers import find_attn2_layers
from charadapter.masks import BACKGROUND, hard_masks, mask_pyramid, resize_masks, soft_masks
from tiny_unet import sd15_unet

FP16_MAX = float(torch.finfo(torch.float16).max)
HUGE = (1e4, 1e30, FP16_MAX)
CTX = 32
LATENT = (8, 8)
T_TEXT = 12


def extreme(kind: str, shape, scale: float = 1.0, seed: int = 0) -> torch.Tensor:
    """Maps of one extreme kind, float32 (B, R, N)."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "zero":
        return torch.zeros(shape)
    if kind == "constant":
        return torch.full(shape, scale)
    if kind == "random":  # huge and varied, non-negative like attention maps
        return torch.rand(shape, generator=gen) * scale
    if kind == "signed":
        return (torch.rand(shape, generator=gen) * 2 - 1) * scale
    if kind == "spike":  # one position per map holds everything
        maps = torch.zeros(shape)
        maps[..., 0] = scale
        return maps
    raise ValueError(kind)


KINDS = [("zero", 1.0), ("constant", 0.3)] + [(k, s) for k in ("constant", "random", "signed", "spike") for s in HUGE]


def _id(value):
    return f"{value:g}" if isinstance(value, float) else str(value)


def finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t).all())


def cpu_matmul(dtype: torch.dtype) -> bool:
    """Whether this torch multiplies `dtype` matrices on the CPU (float16: not the WebUI's 2.1)."""
    try:
        torch.bmm(torch.ones(1, 1, 1, dtype=dtype), torch.ones(1, 1, 1, dtype=dtype))
    except RuntimeError:
        return False
    return True


# ---------------------------------------------------------------- masks


@pytest.mark.parametrize("regions", [1, 3])
@pytest.mark.parametrize("kind,scale", KINDS, ids=_id)
def test_soft_and_hard_masks_stay_finite(kind, scale, regions):
    maps = extreme(kind, (2, regions, 64), scale)
    for masks in (soft_masks(maps, 0.1, 0.4), soft_masks(maps, 0.001, 0.4), hard_masks(maps, 0.4)):
        assert masks.shape == (2, regions + 1, 64) and finite(masks)
        torch.testing.assert_close(masks.sum(dim=1), torch.ones(2, 64))
        pyramid = mask_pyramid(masks, LATENT, (0, 1, 2, 3))
        assert all(finite(m) and m.min() >= 0 and m.max() <= 1 for m in pyramid.values())
        bigger = resize_masks(masks, LATENT, (16, 16))
        assert finite(bigger)
        torch.testing.assert_close(bigger.sum(dim=1), torch.ones(2, 256))


def test_float16_maps_at_their_limit():
    """Maps handed over in float16 at its largest value (and a flat map at it) give finite masks."""
    maps = torch.full((1, 2, 64), FP16_MAX, dtype=torch.float16)
    maps[:, 0, :32] = 0
    for masks in (soft_masks(maps, 0.1, 0.4), hard_masks(maps, 0.4)):
        assert finite(masks)
        torch.testing.assert_close(masks.sum(dim=1), torch.ones(1, 64))


@pytest.mark.parametrize("kind", ["zero", "constant"])
def test_maps_without_evidence_are_all_background(kind):
    """No map localises anything: every position is background in hard mode, and background
    leads in soft mode."""
    maps = extreme(kind, (1, 3, 64), 1e30)
    hard = hard_masks(maps, 0.4)
    assert hard[:, BACKGROUND].eq(1).all()
    soft = soft_masks(maps, 0.1, 0.4)
    assert soft.argmax(dim=1).eq(BACKGROUND).all()
    assert mask_pyramid(hard, LATENT, (0, 1))[LATENT].eq(0).all()  # region masks: nothing


# ---------------------------------------------------------------- text maps


def _text_inputs(scale: float, dtype: torch.dtype, heads: int = 2, width: int = 16, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = (torch.randn(2, 64, width, generator=gen) * scale).clamp(-FP16_MAX, FP16_MAX).to(dtype)
    k = (torch.randn(2, T_TEXT, width, generator=gen) * scale).clamp(-FP16_MAX, FP16_MAX).to(dtype)
    return q, k, heads


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("scale", (0.0,) + HUGE, ids=_id)
def test_text_maps_stay_finite(scale, dtype):
    """Zero q and k (every score equal: a constant softmax row) and huge ones, whose scores
    overflow float16 (65504) long before the host's own float32-accumulating attention would."""
    if not cpu_matmul(dtype):
        pytest.skip(f"torch {torch.__version__} has no {dtype} matmul on the CPU")
    q, k, heads = _text_inputs(scale, dtype)
    groups = ((2, 3), (), (5,))  # the middle phrase has no tokens
    matrix = text_map_matrix(groups, T_TEXT, heads, allow_empty=True)
    maps = text_maps(q, k, heads, matrix)
    assert maps.shape == (2, 3, 64) and maps.dtype == torch.float32 and finite(maps)
    assert maps[:, 1].eq(0).all()  # no tokens: no evidence
    assert maps.min() >= 0 and maps.max() <= 1 + 1e-6  # still means of probabilities


def test_float16_text_map_scores_do_not_overflow_into_nan():
    """Regression: scores past float16's 65504 were inf, and softmax(inf - inf) gave NaN maps,
    which became NaN masks and a NaN image. The largest score now wins, as in float32."""
    if not cpu_matmul(torch.float16):
        pytest.skip(f"torch {torch.__version__} has no float16 matmul on the CPU")
    heads, width = 1, 4
    q = torch.full((1, 2, width), 256.0, dtype=torch.float16)  # q.k / sqrt(4) = 256*256*4/2 = 131072 > 65504
    k = torch.zeros(1, 3, width, dtype=torch.float16)
    k[0, 1] = 256.0  # token 1: the overflowing score; tokens 0 and 2: score 0
    matrix = text_map_matrix(((0,), (1,), (2,)), 3, heads)
    maps = text_maps(q, k, heads, matrix, head_mask(width, heads, dtype=torch.float16))
    assert finite(maps)
    torch.testing.assert_close(maps[0, :, 0], torch.tensor([0.0, 1.0, 0.0]))


# ---------------------------------------------------------------- region term


@pytest.mark.parametrize("kind,scale", KINDS, ids=_id)
def test_region_term_with_extreme_masks_and_keys(kind, scale):
    """Masks made from extreme maps, huge keys (float32) and zero keys (a constant softmax row)."""
    gen = torch.Generator().manual_seed(1)
    heads, width, regions, tokens = 2, 16, 3, 4
    q = torch.randn(2, 64, width, generator=gen)
    masks = soft_masks(extreme(kind, (2, regions, 64), scale), 0.1, 0.4)[:, BACKGROUND + 1:]  # (B, R, N)
    for keys in (torch.zeros(regions, 2, tokens, width), torch.randn(regions, 2, tokens, width, generator=gen) * 1e4):
        values = torch.randn(regions, 2, tokens, width, generator=gen)
        delta = region_ip_delta(q, keys, values, heads, masks=masks, weights=torch.tensor([1.0, 0.0, 2.0]))
        assert delta.shape == q.shape and finite(delta)
        ip = ip_heads(keys, values, heads)
        coef = region_coefficients(masks, None, 2, regions, 64, q.device)  # (B, N, R)
        assert finite(add_region_ip(q, ip, coef, base=torch.zeros_like(q), alpha=0.8))


# ---------------------------------------------------------------- the whole fusion on a tiny UNet


@pytest.fixture(scope="module")
def unet():
    return sd15_unet(32, CTX, seed=21)


@pytest.fixture(scope="module")
def adapter(unet):
    gen = torch.Generator().manual_seed(22)
    ip = [(torch.randn(l.inner_dim, CTX, generator=gen) / CTX ** 0.5,
           torch.randn(l.inner_dim, CTX, generator=gen) / CTX ** 0.5) for l in find_attn2_layers(unet)]
    return ip, torch.randn(3, 4, CTX, generator=gen), torch.randn(4, CTX, generator=gen)


def _plan(groups):
    """One image under CFG: its cond row, then its uncond row."""
    return RowPlan(is_cond=(True, False), image=(0, 0), token_groups=(groups, None))


def _fuse(unet, adapter, mode, regions, groups, context_scale=1.0, steps=2):
    """Run `steps` sampling steps through a FusionSession; the outputs and the last layout."""
    ip, tokens, negative = adapter
    config = FusionConfig(weight=1.0, region_weights=(1.0, 0.7, 1.2)[:regions], mode=mode)
    fusion = FusionSession(unet, find_attn2_layers(unet), ip, tokens[:max(regions, 1)], negative, config)
    gen = torch.Generator().manual_seed(23)
    x = torch.randn(2, 4, *LATENT, generator=gen)
    context = torch.randn(2, T_TEXT, CTX, generator=gen) * context_scale
    outs = []
    with fusion, torch.no_grad():
        fusion.begin_pass(LATENT, steps)
        for step in range(steps):
            fusion.begin_step(step, _plan(groups))
            outs.append(unet(x, timesteps=torch.full((2,), 500.0), context=context))  # step 1+: masks from maps
        fusion.begin_step(steps, _plan(groups))  # folds the last step's maps
        layout = fusion.masks
    return outs, layout


# a UNet run per case: every kind once, each scale once
FUSION_KINDS = [("zero", 1.0), ("constant", 0.3), ("constant", 1e30), ("random", 1e4), ("signed", FP16_MAX),
                ("spike", 1e30)]


@pytest.mark.parametrize("mode,regions", [("soft", 3), ("hard", 3), ("soft", 1), ("hard", 1)])
@pytest.mark.parametrize("kind,scale", FUSION_KINDS, ids=_id)
def test_fusion_stays_finite_when_the_maps_are_extreme(unet, adapter, monkeypatch, kind, scale, mode, regions):
    """Every map layer reports extreme maps: the masks, and so every UNet output, stay finite."""
    def extreme_text_maps(q, k, heads, matrix, mask=None):  # (L*B, R, N), what the hooks fold
        return extreme(kind, (q.shape[0], matrix.shape[1], q.shape[1]), scale).to(q.device)

    monkeypatch.setattr(hooks_module, "text_maps", extreme_text_maps)
    outs, layout = _fuse(unet, adapter, mode, regions, ((2, 3), (5,), (8, 9))[:regions])
    assert all(finite(o) for o in outs)
    assert layout is not None and finite(layout)
    torch.testing.assert_close(layout.sum(dim=1), torch.ones(1, LATENT[0] * LATENT[1]))


@pytest.mark.parametrize("context_scale", [0.0, 1.0, 1e4], ids=_id)
def test_global_mode_stays_finite(unet, adapter, context_scale):
    """One region over the whole image (regions []): no maps, mask 1; zero or huge prompts."""
    outs, layout = _fuse(unet, adapter, "soft", 0, ((2, 3),), context_scale=context_scale)
    assert all(finite(o) for o in outs) and layout is None


@pytest.mark.parametrize("mode", ["soft", "hard"])
@pytest.mark.parametrize("context_scale", [0.0, 1e4], ids=_id)
def test_fusion_stays_finite_with_extreme_text(unet, adapter, mode, context_scale):
    """A zero prompt embedding (every text score equal: constant maps) and a huge one (saturated,
    one-hot softmax rows), through the real text maps."""
    outs, layout = _fuse(unet, adapter, mode, 3, ((2, 3), (5,), (8, 9)), context_scale=context_scale)
    assert all(finite(o) for o in outs) and finite(layout)


@pytest.mark.parametrize("mode", ["soft", "hard"])
@pytest.mark.parametrize("groups", [((2, 3), (), (8, 9)), ((), (), ())], ids=["a phrase without tokens", "no phrase has tokens"])
def test_fusion_stays_finite_with_phrases_without_tokens(unet, adapter, mode, groups):
    """A region whose phrase has no token in the prompt gives no evidence (all background for
    it); with none, no maps are gathered at all and the even split stays."""
    outs, layout = _fuse(unet, adapter, mode, 3, groups)
    assert all(finite(o) for o in outs)
    if not any(groups):
        assert layout is None
        return
    assert finite(layout)
    if mode == "hard":
        assert layout[0, 2].eq(0).all()  # the phrase without tokens never wins a position


def test_fusion_stays_finite_when_no_row_carries_a_phrase(unet, adapter):
    """Calls whose rows are all uncond (batch_cond_uncond off: the second call) have an empty group
    of map rows: nothing is recorded for them, and the term still applies."""
    ip, tokens, negative = adapter
    fusion = FusionSession(unet, find_attn2_layers(unet), ip, tokens, negative,
                           FusionConfig(weight=1.0, region_weights=(1.0, 0.7, 1.2)))
    gen = torch.Generator().manual_seed(24)
    x, context = torch.randn(2, 4, *LATENT, generator=gen), torch.randn(2, T_TEXT, CTX, generator=gen)
    plan = _plan(((2, 3), (5,), (8, 9)))
    with fusion, torch.no_grad():
        fusion.begin_pass(LATENT, 3)
        for step in range(3):
            fusion.begin_step(step, plan)
            cond = unet(x[:1], timesteps=torch.full((1,), 500.0), context=context[:1])
            uncond = unet(x[1:], timesteps=torch.full((1,), 500.0), context=context[1:])
            assert finite(cond) and finite(uncond)
        fusion.begin_step(3, plan)
        assert finite(fusion.masks)
    assert fusion.calls_with_adapter == 6
