"""HookSession and the region hooks on the WebUI's ldm CrossAttention, under the ways the host and
other extensions change attn2's forward."""

import contextlib

import pytest
import torch
import torch.nn.functional as F

import ldm.modules.attention as ldm_attention
from charadapter.attention import ip_keys_values, text_region_maps
from charadapter.errors import CharacterAdapterError, GeometryError
from charadapter.hooks import HookSession, MarkedHook, RegionState, clear_stale, plan_region_hooks
from charadapter.layers import find_attn2_layers
from charadapter.masks import mask_pyramid, soft_masks
from tiny_unet import sd15_unet

CTX = 32
LATENT = (8, 8)
TOL = 1e-5


@pytest.fixture(scope="module")
def unet():
    return sd15_unet(32, CTX, seed=5)


@pytest.fixture(scope="module")
def inputs():
    gen = torch.Generator().manual_seed(6)
    return (torch.randn(2, 4, *LATENT, generator=gen), torch.tensor([5.0, 700.0]),
            torch.randn(2, 6, CTX, generator=gen))


def _state(unet, regions=2, sets=1, masks=True, **kw):
    layers = find_attn2_layers(unet)
    gen = torch.Generator().manual_seed(7)
    tokens = torch.randn(regions, sets, 4, CTX, generator=gen)  # (R, S, T, C)
    kv = []
    for layer in layers:
        wk = torch.randn(layer.inner_dim, CTX, generator=gen) / CTX ** 0.5
        wv = torch.randn(layer.inner_dim, CTX, generator=gen) / CTX ** 0.5
        kv.append(ip_keys_values(tokens, wk, wv))
    pyramid = None
    if masks:
        maps = torch.rand(2, regions, LATENT[0] * LATENT[1], generator=gen)
        pyramid = mask_pyramid(soft_masks(maps, 0.3, 0.4), LATENT, {l.level for l in layers})
    weights = torch.linspace(0.6, 1.1, regions)
    return layers, RegionState(kv=kv, weights=weights, masks=pyramid, **kw)


def _run(unet, inputs, state=None):
    x, t, ctx = inputs
    with torch.no_grad():
        if state is None:
            return unet(x, timesteps=t, context=ctx)
        session = HookSession(root=unet)
        plan_region_hooks(session, unet, find_attn2_layers(unet), state)
        with session:
            return unet(x, timesteps=t, context=ctx)


def _our_hooks(unet):
    return sum(1 for m in unet.modules() for d in (m._forward_hooks, m._forward_pre_hooks)
               for fn in d.values() if getattr(fn, "_charadapter", False))


@pytest.fixture(scope="module")
def baseline(unet, inputs):
    """(plain output, hooked output with the vanilla ldm forward)."""
    _, state = _state(unet)
    return _run(unet, inputs), _run(unet, inputs, state)


# --- ways the host and extensions change attn2.forward -------------------------------------

def webui_sdp_forward(self, x, context=None, mask=None, **kwargs):
    """Like the WebUI's sdp optimisation: the class forward, projections via the submodules."""
    h = self.heads
    q = self.to_q(x)
    context = x if context is None else context
    k, v = self.to_k(context), self.to_v(context)
    b, n, c = q.shape
    q, k, v = (t.view(b, -1, h, c // h).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v)
    return self.to_out(out.transpose(1, 2).reshape(b, n, c))


def controlnet_like_forward(self, x, context=None, **kwargs):
    """Like ControlNet's IP-Adapter hack: an instance forward that does the attention itself."""
    return webui_sdp_forward(self, x, context)


def f_linear_forward(self, x, context=None, mask=None, **kwargs):
    """A forward that never calls to_q as a module: our q capture cannot fire."""
    h = self.heads
    q = F.linear(x, self.to_q.weight)
    context = x if context is None else context
    k, v = self.to_k(context), self.to_v(context)
    b, n, c = q.shape
    q, k, v = (t.view(b, -1, h, c // h).transpose(1, 2) for t in (q, k, v))
    return self.to_out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))


def _attend(self, q, context):
    """Multi-head attention of queries q (B, N, C) over context, before the output projection."""
    h = self.heads
    k, v = self.to_k(context), self.to_v(context)
    b, n, c = q.shape
    q, k, v = (t.view(b, -1, h, c // h).transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)


def chunked_q_forward(self, x, context=None, mask=None, **kwargs):
    """A forward that calls to_q twice (on halves): the capture is ambiguous and must not be used."""
    half = x.shape[1] // 2
    q = torch.cat([self.to_q(x[:, :half]), self.to_q(x[:, half:])], dim=1)
    return self.to_out(_attend(self, q, x if context is None else context))


def functional_out_forward(self, x, context=None, mask=None, **kwargs):
    """A forward that applies to_out's weights with F.linear: our to_out[0] pre-hook cannot fire."""
    out = _attend(self, self.to_q(x), x if context is None else context)
    return F.linear(out, self.to_out[0].weight, self.to_out[0].bias)


def chunked_out_forward(self, x, context=None, mask=None, **kwargs):
    """A forward that projects the attention output in two halves: no to_out[0] call sees all of it."""
    out = _attend(self, self.to_q(x), x if context is None else context)
    n = out.shape[1]
    return torch.cat([self.to_out(out[:, : n // 2]), self.to_out(out[:, n // 2:])], dim=1)


@contextlib.contextmanager
def class_forward(fn):
    """Swap CrossAttention.forward at class level, as the WebUI's optimisations do."""
    original = ldm_attention.CrossAttention.forward
    ldm_attention.CrossAttention.forward = fn
    try:
        yield
    finally:
        ldm_attention.CrossAttention.forward = original


@contextlib.contextmanager
def instance_patch(modules, make):
    """Patch forward on instances (module.forward = new), restore after."""
    saved = []
    try:
        for m in modules:
            saved.append((m, m.__dict__.get("forward")))
            m.forward = make(m)
        yield
    finally:
        for m, old in saved:
            if old is None:
                del m.forward
            else:
                m.forward = old


def wrapping_patch(m):
    """An extension patch that calls the original bound forward (and counts calls)."""
    original = m.forward

    def forward(*args, **kwargs):
        forward.calls += 1
        return original(*args, **kwargs)
    forward.calls = 0
    return forward


def _attn2(unet):
    return [l.module for l in find_attn2_layers(unet)]


@pytest.mark.parametrize("fn", [webui_sdp_forward, f_linear_forward, chunked_q_forward, functional_out_forward,
                                chunked_out_forward],
                         ids=["webui_sdp", "no_to_q_call", "to_q_twice", "no_to_out_call", "to_out_in_halves"])
def test_class_forward_swaps_apply_delta_once(unet, inputs, baseline, fn):
    plain, hooked = baseline
    _, state = _state(unet)
    with class_forward(fn):
        got = _run(unet, inputs, state)
        plain_swapped = _run(unet, inputs)
    assert (hooked - plain).abs().max() > 1e-2
    assert (plain_swapped - plain).abs().max() <= TOL
    assert (got - hooked).abs().max() <= TOL
    assert _our_hooks(unet) == 0


def test_instance_patches_before_and_after_session(unet, inputs, baseline):
    plain, hooked = baseline
    x, t, ctx = inputs
    attn2 = _attn2(unet)
    _, state = _state(unet)
    with instance_patch(attn2, wrapping_patch):  # installed before our session
        session = HookSession(root=unet)
        plan_region_hooks(session, unet, find_attn2_layers(unet), state)
        with torch.no_grad(), session:
            with instance_patch(attn2, wrapping_patch):  # and one installed while we are active
                got = unet(x, timesteps=t, context=ctx)
                inner_calls = [m.forward.calls for m in attn2]
            got_outer_only = unet(x, timesteps=t, context=ctx)
        assert _our_hooks(unet) == 0
        with torch.no_grad():
            after = unet(x, timesteps=t, context=ctx)
        assert all(c == 1 for c in inner_calls)
    assert (got - hooked).abs().max() <= TOL
    assert (got_outer_only - hooked).abs().max() <= TOL
    assert (after - plain).abs().max() <= TOL
    assert all("forward" not in m.__dict__ for m in attn2)


def test_controlnet_like_replacement(unet, inputs, baseline):
    _, hooked = baseline
    _, state = _state(unet)
    attn2 = _attn2(unet)
    with instance_patch(attn2, lambda m: controlnet_like_forward.__get__(m)):
        got = _run(unet, inputs, state)
    assert (got - hooked).abs().max() <= TOL


def test_exception_in_forward_leaves_no_hooks_and_no_stale_q(unet, inputs, baseline):
    _, hooked = baseline
    x, t, ctx = inputs
    _, state = _state(unet)
    attn2 = _attn2(unet)
    session = HookSession(root=unet)
    plan_region_hooks(session, unet, find_attn2_layers(unet), state)
    boom = {"on": True}

    def failing(m):
        original = m.forward

        def forward(x_, context=None, **kw):
            if boom["on"]:
                m.to_q(x_ * 3.0)  # a captured q whose attn2 call never finishes
                raise RuntimeError("boom")
            return original(x_, context=context, **kw)
        return forward

    with torch.no_grad(), session:
        with instance_patch(attn2[5:6], failing):
            with pytest.raises(RuntimeError, match="boom"):
                unet(x, timesteps=t, context=ctx)
            boom["on"] = False
            got = unet(x, timesteps=t, context=ctx)  # same session: slots must be clean
    assert (got - hooked).abs().max() <= TOL
    assert _our_hooks(unet) == 0

    with pytest.raises(RuntimeError, match="boom2"):
        with session_for(unet, state):
            raise RuntimeError("boom2")
    assert _our_hooks(unet) == 0


def session_for(unet, state):
    session = HookSession(root=unet)
    plan_region_hooks(session, unet, find_attn2_layers(unet), state)
    return session


def test_clear_stale_removes_only_ours(unet, inputs, baseline):
    plain, hooked = baseline
    x, t, ctx = inputs
    _, state = _state(unet)
    foreign_calls = []
    foreign = unet.input_blocks[1].register_forward_hook(lambda m, a, o: foreign_calls.append(1))
    try:
        crashed = session_for(unet, state)
        crashed.__enter__()  # a session whose __exit__ never ran
        planned = len(crashed)
        assert _our_hooks(unet) == planned > 0
        fresh = session_for(unet, state)
        with torch.no_grad(), fresh:  # entering clears the leftovers first
            assert fresh.stale_removed == planned
            got = unet(x, timesteps=t, context=ctx)
        assert (got - hooked).abs().max() <= TOL  # delta applied once, not twice
        leftover = session_for(unet, state)
        leftover.__enter__()
        assert clear_stale(unet) == len(leftover)
        assert _our_hooks(unet) == 0
        with torch.no_grad():
            assert (unet(x, timesteps=t, context=ctx) - plain).abs().max() <= TOL
        assert foreign_calls  # the foreign hook survived
    finally:
        foreign.remove()


def test_all_or_nothing_registration(unet):
    modules = [unet.input_blocks[i] for i in range(1, 5)]

    class Refuses(torch.nn.Linear):
        def register_forward_hook(self, *a, **k):
            raise RuntimeError("cannot hook this one")

    bad = Refuses(2, 2)
    session = HookSession()
    for m in modules + [bad]:
        session.add_forward_hook(m, lambda *a: None)
    with pytest.raises(RuntimeError, match="cannot hook"):
        session.__enter__()
    assert not session.active
    assert all(len(m._forward_hooks) == 0 for m in modules)
    with pytest.raises(RuntimeError, match="plan every hook"):
        with HookSession() as s:
            s.add_forward_hook(modules[0], lambda *a: None)


def test_marked_hook_and_no_forward_assignment(unet, inputs):
    _, state = _state(unet)
    forwards = {id(m): m.__dict__.get("forward") for m in unet.modules()}
    session = session_for(unet, state)
    with torch.no_grad(), session:
        hooks = [fn for m in unet.modules() for d in (m._forward_hooks, m._forward_pre_hooks) for fn in d.values()]
        assert hooks and all(isinstance(fn, MarkedHook) for fn in hooks)
        unet(inputs[0], timesteps=inputs[1], context=inputs[2])
    assert forwards == {id(m): m.__dict__.get("forward") for m in unet.modules()}


def test_rows_pick_token_sets(unet, inputs):
    _, state = _state(unet, sets=2, masks=False)
    a = _run(unet, inputs, state)  # rows None, S == B: row i uses set i
    swapped = RegionState(kv=[(k.flip(1), v.flip(1)) for k, v in state.kv], weights=state.weights,
                          rows=torch.tensor([1, 0]))
    b = _run(unet, inputs, swapped)
    assert (a - b).abs().max() <= TOL
    bad = RegionState(kv=state.kv, weights=state.weights, rows=torch.tensor([0, 1, 0]))
    with pytest.raises(GeometryError, match=r"rows has shape \(3,\), the UNet call has B=2"):
        _run(unet, inputs, bad)


def test_geometry_and_batch_errors(unet, inputs):
    layers, state = _state(unet)
    state.masks = {hw: m for hw, m in state.masks.items() if hw != (4, 4)}
    with pytest.raises(GeometryError, match=r"no masks for grid 4x4"):
        _run(unet, inputs, state)
    # attn2 called alone with a batch other than the UNet call's
    _, state = _state(unet)
    session = session_for(unet, state)
    x, t, ctx = inputs
    with torch.no_grad(), session:
        unet(x, timesteps=t, context=ctx)
        with pytest.raises(GeometryError, match=r"B=3 rows, the UNet call had B=2"):
            layers[0].module(torch.randn(3, 64, layers[0].module.to_q.in_features), context=torch.randn(3, 6, CTX))
        with pytest.raises(GeometryError, match=r"grid 8x8 has 64 cells, tensor has N=60"):
            layers[0].module(torch.randn(2, 60, layers[0].module.to_q.in_features), context=ctx)


def test_text_maps_from_host_q_and_k(unet, inputs):
    """Maps are summed per grid over its map layers, background column first: the same numbers as
    each layer's text attention computed from the host's q and k, added up."""
    layers, state = _state(unet, masks=False)
    map_layers = {l.index for l in layers if l.level == 1}
    calls = []
    state.map_layers = frozenset(map_layers)
    state.token_groups = [[t] for t in range(6)]  # every token its own region: maps sum to 1
    state.after_call = lambda s: calls.append((dict(s.grid_maps), dict(s.grid_layers)))
    seen = {}
    handles = [l.module.register_forward_pre_hook(
        lambda m, a, kw, i=l.index: seen.__setitem__(i, (a[0], kw["context"])), with_kwargs=True)
        for l in layers if l.index in map_layers]
    try:
        _run(unet, inputs, state)
    finally:
        for h in handles:
            h.remove()
    assert len(calls) == 1
    grid_maps, grid_layers = calls[0]
    assert set(grid_maps) == {(4, 4)} and grid_layers == {(4, 4): len(map_layers)}
    maps = grid_maps[(4, 4)]
    assert maps.shape == (2, 4, 4, 7) and maps.dtype == torch.float32  # (B, h, w, R+1)
    assert (maps[..., 0] == 0).all()  # the background column
    assert torch.allclose(maps[..., 1:].sum(dim=-1), torch.full((2, 4, 4), float(len(map_layers))), atol=1e-5)
    expected = 0
    for index in map_layers:
        x, ctx = seen[index]
        layer = layers[index]
        expected = expected + text_region_maps(layer.module.to_q(x), layer.module.to_k(ctx), layer.heads,
                                               state.token_groups)  # (B, R, N)
    assert torch.allclose(maps[..., 1:].reshape(2, 16, 6).transpose(1, 2), expected, atol=1e-5)


def test_before_call_sets_per_call_fields(unet, inputs):
    _, state = _state(unet, masks=False)
    seen = []

    def before(s, x):
        seen.append((s.latent_hw, s.batch, tuple(x.shape)))
        s.enabled = False  # the host can switch the term off for a call (e.g. outside the step range)
    state.before_call = before
    plain = _run(unet, inputs)
    got = _run(unet, inputs, state)
    assert seen == [(LATENT, 2, (2, 4, *LATENT))]
    assert (got - plain).abs().max() == 0


def test_not_a_region_state_size_error(unet):
    layers, state = _state(unet)
    state.kv = state.kv[:-1]
    with pytest.raises(CharacterAdapterError, match="15 layers, the UNet has 16"):
        plan_region_hooks(HookSession(), unet, layers, state)


def test_install_remove_aliases(unet):
    session = HookSession()
    session.add_forward_hook(unet.input_blocks[1], lambda *a: None)
    assert session.install() is session and session.active and len(session) == 1
    session.remove()
    session.remove()  # idempotent
    assert not session.active and len(unet.input_blocks[1]._forward_hooks) == 0


class _Ops(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the aten operators dispatched, by name."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def test_term_rides_on_the_hosts_out_projection(unet, inputs):
    """With a host that calls to_out[0], the term is added before it: no extra C x C matmul."""
    _, state = _state(unet)
    x, t, ctx = inputs
    with class_forward(webui_sdp_forward):
        plain_ops, hooked_ops = _Ops(), _Ops()
        with torch.no_grad(), plain_ops:
            unet(x, timesteps=t, context=ctx)
        session = session_for(unet, state)
        with torch.no_grad(), session, hooked_ops:
            unet(x, timesteps=t, context=ctx)
    dense = ("aten.mm", "aten.addmm", "aten.linear")
    assert [n for n in hooked_ops.names if n in dense] == [n for n in plain_ops.names if n in dense]
    assert hooked_ops.names.count("aten.baddbmm_") == 16  # masks @ region outputs, added in place, per layer


def test_autocast_query_of_the_running_torch():
    """The query picked for the installed torch answers for the CPU, in and out of autocast."""
    from charadapter import hooks

    query = hooks._autocast_query()
    takes_device = torch.__version__ >= (2, 4)  # torch < 2.4 (the WebUI's 2.1): no argument, CUDA only
    assert (query is torch.is_autocast_enabled) == takes_device
    assert not query("cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert query("cpu")


def test_autocast_query_is_picked_once_for_new_torch(monkeypatch):
    """torch >= 2.4 takes the device type: the query is torch's own function, no wrapper."""
    from charadapter import hooks

    def is_autocast_enabled(device_type):
        return f"{device_type}-flag"

    monkeypatch.setattr(torch, "is_autocast_enabled", is_autocast_enabled)
    assert hooks._autocast_query() is is_autocast_enabled


def test_autocast_query_is_picked_once_for_old_torch(monkeypatch):
    """torch < 2.4 (the WebUI's 2.1) has a no-argument, CUDA-only is_autocast_enabled."""
    from charadapter import hooks

    monkeypatch.setattr(torch, "is_autocast_enabled", lambda: "cuda-flag")
    monkeypatch.setattr(torch, "is_autocast_cpu_enabled", lambda: "cpu-flag", raising=False)
    query = hooks._autocast_query()
    assert query("cuda") == "cuda-flag" and query("cpu") == "cpu-flag"
