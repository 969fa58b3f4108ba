"""Finite output under extreme and degenerate maps: the mask math, the text maps, the region term
and the whole fusion (soft, hard, global) on a real tiny ldm UNet.

Real text maps are attention probabilities (in [0, 1]); these drive every stage with what no
healthy model gives (all zero, constant, huge: 1e4, 1e30, float16's max) and with degenerate
layouts (one region, everything background, a phrase with no tokens, no cond row carrying a
phrase), and require finite numbers everywhere: no stage may turn them into NaN or inf. float16
scores past 65504 are checked under torch's own attention and under its unfused one, which keeps
them in float16 off CUDA and the CPU (MPS; ROCm builds without fused kernels).
"""

import math

import pytest
import torch
import torch.nn.functional as F

from charadapter import hooks as hooks_module
from charadapter.attention import (
    add_region_term, attention_dtype, map_dtype, mask_coefficients, region_ip_delta, region_kv, text_map_values,
    text_maps,
)
from charadapter.fusion import CharacterTokens, FusionConfig, FusionSession, RowPlan
from charadapter.hooks import RegionState
from charadapter.layers import find_attn2_layers
from charadapter.masks import (
    BACKGROUND, MAP_FLOOR, character_logits, fused_logits, hard_masks, mask_pyramid, one_hot_last,
    pyramid_channels_last, resize_masks, soft_masks,
)
from tiny_unet import sd15_unet

MPS = torch.device("mps")  # a device whose attention (torch's unfused one) keeps float16 scores
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


def unfused_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
    """torch's unfused "math" attention as torch 2.1 runs it off the CPU (MPS; ROCm without fused
    kernels): q and k scaled by sqrt(scale), the scores and the softmax in the inputs' dtype, so
    float16 scores past 65504 are inf and their softmax rows NaN (CUDA's flash and memory-efficient
    kernels, and the CPU's, score in float32 instead)."""
    assert attn_mask is None and dropout_p == 0.0 and not is_causal
    root = math.sqrt(scale if scale is not None else 1.0 / math.sqrt(q.shape[-1]))
    scores = torch.matmul(q * root, (k * root).transpose(-2, -1))  # (..., N, T) in q's dtype
    return torch.matmul(torch.softmax(scores, dim=-1), v)


@pytest.fixture(params=["torch", "unfused"])
def attention(request, monkeypatch):
    """Run a test under torch's own attention, then under the unfused one (float16 matmul needed)."""
    if request.param == "unfused":
        if not cpu_matmul(torch.float16):
            pytest.skip(f"torch {torch.__version__} has no float16 matmul on the CPU")
        monkeypatch.setattr(F, "scaled_dot_product_attention", unfused_attention)
    return request.param


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


@pytest.mark.parametrize("regions", [1, 3])
@pytest.mark.parametrize("kind,scale", KINDS, ids=_id)
def test_channels_last_masks_stay_finite(kind, scale, regions):
    """The sampling loop's own mask math (fused_logits, softmax or one_hot_last, the pyramid) on
    extreme maps with a zero background column, plus the floor the canvas adds."""
    maps = extreme(kind, (2, regions, 64), scale)  # (I, R, N)
    maps = torch.cat([torch.zeros(2, 1, 64), maps], dim=1).transpose(1, 2) + MAP_FLOOR  # (I, N, R+1)
    bias = torch.zeros(regions + 1)
    bias[BACKGROUND] = 0.4 / 0.1
    logits = fused_logits(maps, bias, 0.1, copies=2)  # (2, I, N, R+1)
    assert logits.shape == (2, 2, 64, regions + 1) and finite(logits)
    dtypes = (torch.float32, torch.float16) if cpu_matmul(torch.float16) else (torch.float32,)  # 2.1: no CPU pooling
    for masks in [m for dtype in dtypes for m in (torch.softmax(logits[0], dim=-1).to(dtype),
                                                  one_hot_last(logits[0], dtype))]:
        assert finite(masks)
        torch.testing.assert_close(masks.float().sum(dim=-1), torch.ones(2, 64), atol=2e-3, rtol=0)
        pyramid = pyramid_channels_last(masks, LATENT, (0, 1, 2, 3))
        assert all(finite(m) and m.min() >= 0 and m.max() <= 1 for m in pyramid.values())


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
def test_text_maps_stay_finite(scale, dtype, attention):
    """Zero q and k (every score equal: a constant softmax row) and huge ones, whose scores
    overflow float16 (65504) long before the host's own float32-accumulating attention would."""
    q, k, heads = _text_inputs(scale, dtype)
    groups = ((2, 3), (), (5,))  # the middle phrase has no tokens
    values = text_map_values(groups, T_TEXT, heads, q.shape[2] // heads, dtype=dtype, allow_empty=True)  # (H, T, Ev)
    maps = text_maps(q, k, values, len(groups))
    assert maps.shape == (2, 3, 64) and maps.dtype == torch.float32 and finite(maps)
    assert maps[:, 1].eq(0).all()  # no tokens: no evidence
    assert maps.min() >= 0 and maps.max() <= 1 + 1e-6  # still means of probabilities


def _overflowing_text(heads: int = 1, width: int = 4):
    """float16 q (1, 2, C) and k (1, 3, C) whose score with token 1 is 131072 > 65504; 0 with 0 and 2."""
    q = torch.full((1, 2, width), 256.0, dtype=torch.float16)  # q.k / sqrt(4) = 256*256*4/2 = 131072
    k = torch.zeros(1, 3, width, dtype=torch.float16)
    k[0, 1] = 256.0
    return q, k


def test_float16_text_map_scores_do_not_overflow_into_nan(attention):
    """Regression: scores past float16's 65504 were inf, and softmax(inf - inf) gave NaN maps,
    which became NaN masks and a NaN image. The text maps attend float16 in float32 (map_dtype),
    so the largest score wins, as in float32, under any attention kernel."""
    q, k = _overflowing_text()
    values = text_map_values(((0,), (1,), (2,)), 3, 1, 4, dtype=torch.float16)
    maps = text_maps(q, k, values, 3)
    assert finite(maps)
    torch.testing.assert_close(maps[0, :, 0], torch.tensor([0.0, 1.0, 0.0]))


def test_float16_maps_of_the_sampling_loop_do_not_overflow_into_nan(attention):
    """The same through the hooks' map queue (RegionState.flush_maps): its one copy of every q and
    k casts float16 to float32, at no operator of its own."""
    assert map_dtype(torch.float16) == torch.float32 and map_dtype(torch.bfloat16) == torch.bfloat16
    q, k = _overflowing_text()
    q = q[:, :1].expand(1, 4, 4).contiguous()  # a 2x2 grid
    kv = (torch.zeros(1, 1, 1, 4), torch.zeros(1, 1, 1, 4))  # unused: maps only
    state = RegionState(kv=[kv], weights=torch.ones(1), map_layers=frozenset({0}), token_groups=((0,), (1,), (2,)),
                        add_term=False, map_total=1)
    state.start_call((2, 2), 1)
    state.add_map((2, 2), 1, q, k)  # the call's only map layer: computed now
    maps = state.grid_maps[(2, 2)]  # (B_map, h, w, R+1)
    assert maps.dtype == torch.float32 and finite(maps)
    torch.testing.assert_close(maps[0, 0, 0], torch.tensor([0.0, 0.0, 1.0, 0.0]))


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
        kv = region_kv(keys, values, heads, 2, weights=torch.full((regions,), 0.8))  # alpha 0.8 folded in
        coef = mask_coefficients(masks, 2, regions, 64, q.dtype, q.device)  # (B, N, R)
        assert finite(add_region_term(torch.zeros_like(q), q, kv, coef))


def test_the_region_term_attends_float16_in_float32_where_scores_may_stay_float16():
    """Where attention may keep float16 scores (MPS; ROCm builds), the region term attends in
    float32; CUDA's fused kernels and the CPU score in float32 already, so float16 stays."""
    half = torch.float16
    for device, dtype in (("mps", torch.float32), ("cpu", half), ("meta", torch.float32)):
        assert attention_dtype(half, torch.device(device)) == dtype, device
    if torch.version.hip is None:
        assert attention_dtype(half, torch.device("cuda")) == half
    for dtype in (torch.float32, torch.bfloat16):
        assert attention_dtype(dtype, torch.device("mps")) == dtype


@pytest.mark.parametrize("regions", [1, 3])
def test_float16_region_scores_do_not_overflow_into_nan(regions, monkeypatch):
    """Regression: a float16 q against IP keys whose scores pass 65504 (131072 here) gave NaN
    through an attention that keeps float16 scores; with float32 keys and values (attention_dtype
    off CUDA and the CPU) the float16 host output gets the float32 term."""
    if not cpu_matmul(torch.float16):
        pytest.skip(f"torch {torch.__version__} has no float16 matmul on the CPU")
    monkeypatch.setattr(F, "scaled_dot_product_attention", unfused_attention)
    heads, width, batch, positions = 1, 4, 1, 2
    q, text_k = _overflowing_text()
    keys = text_k.expand(regions, batch, 3, width)  # (R, B, T, C)
    values = torch.arange(regions * 3 * width, dtype=torch.float32).reshape(regions, batch, 3, width) / 10
    coef = torch.full((batch, positions, regions), 0.5)  # (B, N, R)
    expected = region_ip_delta(q.float(), keys.float(), values, heads, masks=coef.transpose(1, 2))
    stays_half = add_region_term(torch.zeros_like(q), q, region_kv(keys, values.half(), heads, batch), coef.half())
    assert not finite(stays_half)  # what the float32 keys are for
    kv = region_kv(keys.float(), values, heads, batch)  # as RegionState.layer_kv builds them on such a device
    out = torch.zeros_like(q)
    got = add_region_term(out, q, kv, coef)  # masks in the keys' dtype (RegionState.coefficients)
    assert got is out and got.dtype == torch.float16 and finite(got)
    torch.testing.assert_close(got.float(), expected, atol=1e-2, rtol=1e-3)


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
    def extreme_attention(q, k, values):  # (L*B, N, H, Ev), what the map queue sums over layers and heads
        raw = torch.zeros(q.shape[0], q.shape[1], values.shape[-3], values.shape[-1])
        raw[:, :, 0, 1:] = extreme(kind, (q.shape[0], values.shape[-1] - 1, q.shape[1]), scale).transpose(1, 2)
        return raw.to(q.device)  # head 0 holds the region maps (columns 1..), the background column stays 0

    monkeypatch.setattr(hooks_module, "text_attention_raw", extreme_attention)
    outs, layout = _fuse(unet, adapter, mode, regions, ((2, 3), (5,), (8, 9))[:regions])
    assert all(finite(o) for o in outs)
    assert layout is not None and finite(layout)
    torch.testing.assert_close(layout.sum(dim=1), torch.ones(1, LATENT[0] * LATENT[1]))


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_float16_fusion_where_attention_keeps_float16_scores(unet, adapter, monkeypatch, mode):
    """A float16 UNet (autocast, as the WebUI samples) on a device whose attention keeps float16
    scores, with IP keys 1e4 times larger: scores past 65504 made every output NaN; with the keys,
    values and masks in float32 there (attention_dtype) the outputs and the layout stay finite."""
    if not cpu_matmul(torch.float16):
        pytest.skip(f"torch {torch.__version__} has no float16 matmul on the CPU")
    monkeypatch.setattr(F, "scaled_dot_product_attention", unfused_attention)
    ip, tokens, negative = adapter
    huge_keys = ([(wk * 1e4, wv) for wk, wv in ip], tokens, negative)
    groups = ((2, 3), (5,), (8, 9))
    with torch.autocast("cpu", dtype=torch.float16):
        outs, _ = _fuse(unet, huge_keys, mode, 3, groups)  # float16 kv: what such a device would do
        assert not all(finite(o) for o in outs)
        monkeypatch.setattr(hooks_module, "attention_dtype", lambda dtype, device: attention_dtype(dtype, MPS))
        outs, layout = _fuse(unet, huge_keys, mode, 3, groups)
    assert all(o.dtype == torch.float16 and finite(o) for o in outs) and finite(layout)


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


# ---------------------------------------------------------------- several characters (issue 15)


@pytest.mark.parametrize("mode,temperature", [("soft", 0.1), ("soft", 0.001), ("hard", 0.1), ("hard", 0.001)])
@pytest.mark.parametrize("kind,scale", KINDS, ids=_id)
def test_character_logits_stay_finite(kind, scale, mode, temperature):
    """The layout's second level (figure shares x each figure's regions) on extreme region and
    subject maps: characters with regions, a whole-figure one, one without a subject phrase."""
    counts, subjects = [3, 0, 2], [6, 7, None]  # logit columns: background, 5 regions, 2 subject phrases
    maps = extreme(kind, (2, 7, 64), scale)  # (I, regions + subjects, N)
    maps = torch.cat([torch.zeros(2, 1, 64), maps], dim=1).transpose(1, 2) + MAP_FLOOR  # (I, N, 1+M)
    bias = torch.zeros(1 + 7)
    bias[BACKGROUND] = 0.4 / temperature
    logits = character_logits(fused_logits(maps, bias, temperature)[0], counts, subjects, mode, temperature)
    assert logits.shape == (2, 64, 1 + 3 + 1 + 2) and not torch.isnan(logits).any()
    masks = torch.softmax(logits, dim=-1) if mode == "soft" else one_hot_last(logits, torch.float32)
    assert finite(masks)
    torch.testing.assert_close(masks.sum(dim=-1), torch.ones(2, 64))


@pytest.mark.parametrize("mode", ["soft", "hard"])
@pytest.mark.parametrize("kind,scale", FUSION_KINDS, ids=_id)
def test_two_characters_stay_finite_when_the_maps_are_extreme(unet, adapter, monkeypatch, kind, scale, mode):
    """Two characters of three regions sharing their region phrases, each found by its subject
    phrase; every map layer reports extreme maps: the outputs and the layout stay finite."""
    def extreme_attention(q, k, values):  # as in test_fusion_stays_finite_when_the_maps_are_extreme
        raw = torch.zeros(q.shape[0], q.shape[1], values.shape[-3], values.shape[-1])
        raw[:, :, 0, 1:] = extreme(kind, (q.shape[0], values.shape[-1] - 1, q.shape[1]), scale).transpose(1, 2)
        return raw.to(q.device)

    monkeypatch.setattr(hooks_module, "text_attention_raw", extreme_attention)
    ip, tokens, negative = adapter
    config = FusionConfig(weight=1.0, region_weights=(1.0, 0.7, 1.2), mode=mode, subject=True)
    second = CharacterTokens(ip, tokens.flip(0), negative, config)
    fusion = FusionSession(unet, find_attn2_layers(unet), ip, tokens, negative, config, others=[second])
    regions = ((2, 3), (5,), (8, 9))
    plan = _plan(regions + regions + ((1,), (10, 11)))  # both characters' regions, then their subjects
    gen = torch.Generator().manual_seed(25)
    x, context = torch.randn(2, 4, *LATENT, generator=gen), torch.randn(2, T_TEXT, CTX, generator=gen)
    with fusion, torch.no_grad():
        fusion.begin_pass(LATENT, 2)
        for step in range(2):
            fusion.begin_step(step, plan)
            assert finite(unet(x, timesteps=torch.full((2,), 500.0), context=context))
        fusion.begin_step(2, plan)
        layout = fusion.masks
    assert layout is not None and layout.shape == (1, 7, LATENT[0] * LATENT[1]) and finite(layout)
    torch.testing.assert_close(layout.sum(dim=1), torch.ones(1, LATENT[0] * LATENT[1]))
