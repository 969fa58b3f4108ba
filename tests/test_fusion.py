"""Dynamic fusion controller and reference segmentation on a real ldm UNet (tiny, random)."""

import pytest
import torch

from charadapter.fusion import COND, UNCOND, FusionConfig, FusionSession, RowPlan
from charadapter.hooks import HookSession, RegionState, plan_region_hooks
from charadapter.attention import ip_keys_values
from charadapter.layers import find_attn2_layers
from charadapter.reference import noise_latent, segment_reference
from fusion_fixtures import CTX, adapter, layers, unet  # noqa: F401  (fixtures by name)
from tiny_unet import sd15_unet

LATENT = (8, 8)
T_TEXT = 12
GROUPS = ((2, 3), (5,), (8, 9))




def inputs(rows, seed=13):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, 4, *LATENT, generator=gen), torch.full((rows,), 500.0),
            torch.randn(rows, T_TEXT, CTX, generator=gen))


def cfg_plan(images=2):
    """Cond rows of every image first, then uncond rows, as CFGDenoiser stacks them."""
    return RowPlan(is_cond=(True,) * images + (False,) * images,
                   image=tuple(range(images)) * 2,
                   token_groups=(GROUPS,) * images + (None,) * images)


def session(unet, layers, adapter, **config):
    ip, tokens, negative = adapter
    regions = config.pop("regions", 3)
    cfg = FusionConfig(weight=config.pop("weight", 0.8),
                       region_weights=(1.0, 0.7, 1.2)[:regions], **config)
    region_tokens = tokens[:1] if regions == 0 else tokens[:regions]
    return FusionSession(unet, layers, ip, region_tokens, negative, cfg)


def ours(unet):
    return sum(1 for m in unet.modules() for d in (m._forward_hooks, m._forward_pre_hooks)
               for fn in d.values() if getattr(fn, "_charadapter", False))


def run_steps(unet, fusion, steps=3, total=4, split=False):
    x, t, ctx = inputs(4)
    outs = []
    fusion.begin_pass(LATENT, total)
    with torch.no_grad():
        for step in range(steps):
            fusion.begin_step(step, cfg_plan())
            if split:  # batch_cond_uncond off: cond rows, then uncond rows, in two calls
                outs.append(torch.cat([unet(x[:2], timesteps=t[:2], context=ctx[:2]),
                                       unet(x[2:], timesteps=t[2:], context=ctx[2:])]))
            else:
                outs.append(unet(x, timesteps=t, context=ctx))
    return outs


def test_adapter_changes_output_and_leaves_nothing(unet, layers, adapter):
    x, t, ctx = inputs(4)
    with torch.no_grad():
        plain = unet(x, timesteps=t, context=ctx)
    fusion = session(unet, layers, adapter)
    try:
        fusion.install()
        outs = run_steps(unet, fusion)
    finally:
        fusion.remove()
    assert ours(unet) == 0
    assert (outs[0] - plain).abs().max() > 1e-3
    with torch.no_grad():
        assert torch.equal(unet(x, timesteps=t, context=ctx), plain)


def test_masks_follow_the_maps(unet, layers, adapter):
    fusion = session(unet, layers, adapter)
    with fusion:
        run_steps(unet, fusion, steps=2)
        fusion.begin_step(2, cfg_plan())  # folds step 1's maps
        masks = fusion.masks
    assert masks.shape == (2, 4, LATENT[0] * LATENT[1])  # (I, R+1, N)
    assert torch.allclose(masks.sum(dim=1), torch.ones(2, 64), atol=1e-5)


def test_map_levels_choose_the_layers_whose_maps_make_the_masks(unet, layers, adapter):
    """A model whose coarser maps do not localise (the toy world's 8x8 level) fuses with its
    finest level alone; the default averages levels 1 and 2."""
    masks = {}
    for levels in ((1,), (1, 2)):
        fusion = session(unet, layers, adapter, map_levels=levels)
        assert fusion.state.map_layers == {l.index for l in layers if l.level in levels}
        with fusion:
            run_steps(unet, fusion, steps=1)
            fusion.begin_step(1, cfg_plan())
            masks[levels] = fusion.masks.clone()
    assert FusionConfig(weight=1.0, region_weights=(1.0,)).map_levels == (1, 2)
    assert not torch.allclose(masks[(1,)], masks[(1, 2)])


def test_hard_mode_is_one_hot(unet, layers, adapter):
    fusion = session(unet, layers, adapter, mode="hard")
    with fusion:
        run_steps(unet, fusion, steps=1)
        fusion.begin_step(1, cfg_plan())
    assert set(fusion.masks.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(fusion.masks.sum(dim=1), torch.ones(2, 64))


def test_split_calls_equal_one_call(unet, layers, adapter):
    with session(unet, layers, adapter) as fusion:
        joined = run_steps(unet, fusion)
    with session(unet, layers, adapter) as fusion:
        split = run_steps(unet, fusion, split=True)
    for a, b in zip(joined, split):
        assert (a - b).abs().max() < 1e-5


def test_weight_zero_and_outside_window_are_bit_identical(unet, layers, adapter):
    x, t, ctx = inputs(4)
    with torch.no_grad():
        plain = unet(x, timesteps=t, context=ctx)
    with session(unet, layers, adapter, weight=0.0) as fusion:
        assert all(torch.equal(o, plain) for o in run_steps(unet, fusion))
    with session(unet, layers, adapter, start=0.5, end=1.0) as fusion:
        outs = run_steps(unet, fusion, steps=3, total=4)  # steps 0, 1 before the window, 2 inside
        assert fusion.masks is not None  # maps were gathered before the window opened
    assert torch.equal(outs[0], plain) and torch.equal(outs[1], plain)
    assert not torch.equal(outs[2], plain)


def test_global_region_matches_region_state(unet, layers, adapter):
    """regions=() is a plain IP-Adapter: cond rows get the tokens, uncond rows the negatives."""
    ip, tokens, negative = adapter
    fusion = session(unet, layers, adapter, regions=0)
    x, t, ctx = inputs(4)
    with fusion, torch.no_grad():
        fusion.begin_pass(LATENT, 4)
        fusion.begin_step(0, cfg_plan())
        ours_out = unet(x, timesteps=t, context=ctx)
    sets = torch.stack([tokens[:1], negative[None]], dim=1)  # (1, 2, T, C)
    state = RegionState(kv=[ip_keys_values(sets, wk, wv) for wk, wv in ip], weights=torch.tensor([0.8]),
                        rows=torch.tensor([COND, COND, UNCOND, UNCOND]))
    reference = HookSession(root=unet)
    plan_region_hooks(reference, unet, layers, state)
    with reference, torch.no_grad():
        expected = unet(x, timesteps=t, context=ctx)
    assert torch.equal(ours_out, expected)


def test_fixed_layout_routes_each_region_where_it_says(unet, layers, adapter):
    """fix_layout, oracle: a layout that gives every position to region 1 is a plain IP-Adapter with
    region 1's tokens at weight w * w_1; it holds over the steps and no maps are gathered."""
    ip, tokens, negative = adapter
    x, t, ctx = inputs(4)
    layout = torch.zeros(2, 4, LATENT[0] * LATENT[1])  # (I, R+1, N)
    layout[:, 2] = 1.0
    fusion = session(unet, layers, adapter)
    outs = []
    with fusion, torch.no_grad():
        fusion.begin_pass(LATENT, 4)
        fusion.fix_layout(layout)
        for step in range(2):
            fusion.begin_step(step, cfg_plan())
            assert not fusion.collecting and torch.equal(fusion.masks, layout)
            outs.append(unet(x, timesteps=t, context=ctx))
            assert fusion.state.token_groups is None and not fusion.state.grid_maps  # no map gathered
    cfg = FusionConfig(weight=0.8 * 0.7, region_weights=())
    with FusionSession(unet, layers, ip, tokens[1:2], negative, cfg) as plain, torch.no_grad():
        plain.begin_pass(LATENT, 4)
        plain.begin_step(0, cfg_plan())
        expected = unet(x, timesteps=t, context=ctx)
    for out in outs:
        assert (out - expected).abs().max() < 1e-5


def test_fixed_even_split_freezes_the_first_steps_prior(unet, layers, adapter):
    """The even-split prior frozen: every step equals step 0 (before any map), where the dynamic
    session moves on; fix_layout(None) hands the layout back to the maps."""
    x, t, ctx = inputs(4)
    prior = torch.full((2, 4, LATENT[0] * LATENT[1]), 1.0 / 3)  # (I, R+1, N): regions 1/3, background 0
    prior[:, 0] = 0.0
    outs = {}
    for frozen in (False, True):
        fusion = session(unet, layers, adapter)
        with fusion, torch.no_grad():
            fusion.begin_pass(LATENT, 4)
            if frozen:
                fusion.fix_layout(prior)
            outs[frozen] = []
            for step in range(2):
                fusion.begin_step(step, cfg_plan())
                outs[frozen].append(unet(x, timesteps=t, context=ctx))
            if frozen:
                fusion.fix_layout(None)
                assert fusion.collecting and fusion.masks is None
    assert torch.allclose(outs[True][0], outs[False][0], atol=1e-6)  # step 0 of dynamic fusion is the prior
    assert torch.allclose(outs[True][1], outs[True][0], atol=1e-6)
    assert (outs[False][1] - outs[False][0]).abs().max() > 1e-4


def test_fixed_layout_refuses_what_does_not_fit(unet, layers, adapter):
    from charadapter.errors import CharacterAdapterError

    fusion = session(unet, layers, adapter)
    n = LATENT[0] * LATENT[1]
    with pytest.raises(CharacterAdapterError, match="before begin_pass"):
        fusion.fix_layout(torch.ones(2, 4, n))
    fusion.begin_pass(LATENT, 4)
    for bad in (torch.ones(2, 3, n), torch.ones(2, 4, n + 1), torch.ones(4, n)):
        with pytest.raises(CharacterAdapterError, match="fixed layout"):
            fusion.fix_layout(bad)
    fusion.fix_layout(torch.ones(3, 4, n) / 4)
    with pytest.raises(CharacterAdapterError, match="holds 3 images"):
        fusion.begin_step(0, cfg_plan())
    with pytest.raises(CharacterAdapterError, match="global session"):
        session(unet, layers, adapter, regions=0).fix_layout(torch.ones(2, 2, n))


def test_exception_mid_sampling_leaves_no_hook(unet, layers, adapter):
    fusion = session(unet, layers, adapter)
    with pytest.raises(RuntimeError):
        try:
            fusion.install()
            fusion.begin_pass(LATENT, 4)
            fusion.begin_step(0, cfg_plan())
            with torch.no_grad():
                unet(torch.randn(4, 4, *LATENT), timesteps=torch.ones(4), context=torch.randn(4, 5, CTX + 1))
        finally:
            fusion.remove()
    assert ours(unet) == 0


def test_hires_pass_resizes_layout(unet, layers, adapter):
    fusion = session(unet, layers, adapter)
    with fusion:
        run_steps(unet, fusion, steps=2)
        fusion.begin_step(2, cfg_plan())
        fusion.begin_pass((16, 16), 2)
        assert fusion.masks.shape == (2, 4, 256)
        x = torch.randn(4, 4, 16, 16)
        fusion.begin_step(0, cfg_plan())
        with torch.no_grad():
            out = unet(x, timesteps=torch.full((4,), 300.0), context=inputs(4)[2])
    assert out.shape == x.shape


def test_reference_segmentation_runs_once_and_is_deterministic(unet, layers):
    latent = torch.randn(1, 4, *LATENT)
    alphas = torch.linspace(0.9999, 0.005, 1000)
    noisy = noise_latent(latent, alphas, 650)
    assert torch.equal(noisy, noise_latent(latent, alphas, 650))
    context = torch.randn(1, T_TEXT, CTX)
    calls = []

    def run():
        calls.append(1)
        return unet(noisy, timesteps=torch.tensor([650.0]), context=context)

    result, maps = segment_reference(unet, layers, run, LATENT, [list(g) for g in GROUPS])
    assert calls == [1] and ours(unet) == 0
    assert maps.shape == (3, *LATENT) and result.masks.shape == (3, *LATENT)
    again, maps2 = segment_reference(unet, layers, run, LATENT, [list(g) for g in GROUPS])
    assert torch.equal(maps, maps2)


class _DeviceTraffic(torch.utils._python_dispatch.TorchDispatchMode):
    """Records operators that mix host tensors with device tensors (a copy between them)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.utils._pytree import tree_flatten
        out = func(*args, **(kwargs or {}))
        tensors = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor) and t.ndim > 0]
        if len({t.device.type for t in tensors}) > 1:
            self.ops.append(str(func))
        return out


@pytest.mark.parametrize("mode,regions", [("soft", 3), ("hard", 3), ("soft", 0)])
def test_steady_steps_move_nothing_between_host_and_device(mode, regions):
    """On a device UNet (meta: any read of a value would raise), a step after the first two copies
    nothing from the host beyond what the plain UNet copies itself, and never reads a value back."""
    device_unet = sd15_unet(32, CTX, seed=11).to("meta")
    layers = find_attn2_layers(device_unet)
    gen = torch.Generator().manual_seed(12)
    ip = [(torch.randn(l.inner_dim, CTX, generator=gen), torch.randn(l.inner_dim, CTX, generator=gen))
          for l in layers]
    config = FusionConfig(weight=0.8, region_weights=(1.0, 0.7, 1.2)[:regions], mode=mode)
    tokens = torch.randn(max(regions, 1), 4, CTX, generator=gen)
    fusion = FusionSession(device_unet, layers, ip, tokens, torch.randn(4, CTX, generator=gen), config)
    x, t, ctx = (torch.empty(4, 4, *LATENT, device="meta"), torch.empty(4, device="meta"),
                 torch.empty(4, T_TEXT, CTX, device="meta"))
    traffic = []
    with torch.no_grad():
        plain = _DeviceTraffic()
        with plain:
            device_unet(x, timesteps=t, context=ctx)
        with fusion:
            fusion.begin_pass(LATENT, 10)
            for step in range(4):
                watch = _DeviceTraffic()
                with watch:
                    fusion.begin_step(step, cfg_plan())
                    device_unet(x, timesteps=t, context=ctx)
                traffic.append(watch.ops)
    assert fusion.calls_with_adapter == 4
    assert traffic[2] == traffic[3] == plain.ops  # the first steps copy keys/values and weights once


def test_canvas_brings_every_map_grid_to_the_latent_in_two_products():
    """The step's maps of all grids, resized (bilinear) to the latent grid and added up, plus the
    floor: what two matrix products over the block-diagonal canvas give."""
    from charadapter.fusion import _Canvas
    from charadapter.geometry import resize_maps
    from charadapter.masks import MAP_FLOOR
    latent, grids = (15, 12), [(8, 6), (4, 3)]
    canvas = _Canvas(grids, latent, images=2, channels=4, device=torch.device("cpu"))
    gen = torch.Generator().manual_seed(5)
    maps = {hw: torch.rand(2, hw[0], hw[1], 4, generator=gen) for hw in grids}  # (I, h, w, R+1)
    for hw, m in maps.items():
        canvas.block(hw, 0, 2).copy_(m)
    got = canvas.on_latent()  # (I, N, R+1)
    expected = sum(resize_maps(m.permute(0, 3, 1, 2).reshape(2, 4, -1), hw, latent)  # (I, R+1, N)
                   for hw, m in maps.items())
    assert got.shape == (2, 180, 4)
    assert torch.allclose(got.transpose(1, 2), expected + MAP_FLOOR, atol=1e-5)
    # an image that got no maps this step is cleared at the fold: no stale maps, only the floor
    canvas.written = {(hw, 0): True for hw in grids}
    assert canvas.clear_unwritten() and canvas.written == {}
    assert torch.equal(canvas.on_latent()[1], torch.full((180, 4), MAP_FLOOR))
    assert not canvas.clear_unwritten()  # nothing written: nothing to fold
