"""Regions located from their own phrase (issue 14): the phrase bank's columns on the map layers,
against a plain per-head oracle, on a real tiny ldm UNet; what it leaves alone, and what it costs."""

import math

import pytest
import torch

from charadapter.errors import CharacterAdapterError
from charadapter.fusion import FusionConfig, FusionSession, RowPlan
from charadapter.geometry import downsampled_hw
from charadapter.hooks import HookSession, RegionState, plan_region_hooks
from charadapter.layers import find_attn2_layers, map_layers
from charadapter.phrases import PhraseBank, bank_entry, bank_rows, resolve_columns
from fusion_fixtures import CTX, adapter, layers, unet  # noqa: F401  (fixtures by name)
from tiny_unet import sd15_unet

LATENT = (8, 8)
T_TEXT = 12
IN_PROMPT = ((2, 3), (5,), (8, 9))




@pytest.fixture(scope="module")
def bank():
    gen = torch.Generator().manual_seed(21)
    return PhraseBank.stack([torch.randn(n, CTX, generator=gen) for n in (1, 2, 2)])  # face, upper body, lower body


def inputs(rows, seed=13):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, 4, *LATENT, generator=gen), torch.full((rows,), 500.0),
            torch.randn(rows, T_TEXT, CTX, generator=gen))


def plan(groups, images=2):
    return RowPlan(is_cond=(True,) * images + (False,) * images, image=tuple(range(images)) * 2,
                   token_groups=(groups,) * images + (None,) * images)


def session(unet, layers, adapter, bank=None, **config):
    ip, tokens, negative = adapter
    cfg = FusionConfig(weight=config.pop("weight", 0.8), region_weights=(1.0, 0.7, 1.2), **config)
    return FusionSession(unet, layers, ip, tokens, negative, cfg, phrase_bank=bank)


def run(unet, fusion, groups, steps=3, total=4):
    x, t, ctx = inputs(4)
    outs = []
    fusion.begin_pass(LATENT, total)
    with torch.no_grad():
        for step in range(steps):
            fusion.begin_step(step, plan(groups))
            outs.append(unet(x, timesteps=t, context=ctx))
        fusion.begin_step(steps, plan(groups))  # folds the last step's maps
    return outs


def ours(unet):
    return sum(1 for m in unet.modules() for d in (m._forward_hooks, m._forward_pre_hooks)
               for fn in d.values() if getattr(fn, "_charadapter", False))


# ---------------------------------------------------------------- columns


def test_bank_entries_name_rows_and_resolve_after_the_prompt(bank):
    assert bank.spans == ((0, 1), (1, 3), (3, 5)) and bank.embeddings.shape == (5, CTX)
    assert bank.entries(1) == (bank_entry(1), bank_entry(2)) == (-2, -3)
    groups = ((2, 3), bank.entries(2), (5,) + bank.entries(0))
    assert bank_rows(groups) == (0, 3, 4) and bank_rows(IN_PROMPT) == ()
    # the rows a call names are appended in ascending order after the T prompt columns
    assert resolve_columns(groups, 12, (0, 3, 4)) == ((2, 3), (13, 14), (5, 12))
    with pytest.raises(CharacterAdapterError, match="row 3"):
        resolve_columns(groups, 12, (0, 4))
    with pytest.raises(CharacterAdapterError, match="no phrase token"):
        PhraseBank.stack([torch.zeros(0, CTX)])


# ---------------------------------------------------------------- the maps, against an oracle


def oracle_maps(q, k, extra, heads, groups):
    """Per head: softmax(q [k | extra]^T / sqrt(D)) over T+P, mean over heads and each group's columns."""
    batch, positions, width = q.shape
    dim = width // heads
    keys = torch.cat([k, extra.expand(batch, -1, -1)], dim=1) if extra is not None else k
    qh = q.double().view(batch, positions, heads, dim).transpose(1, 2)  # (B, H, N, D)
    kh = keys.double().view(batch, keys.shape[1], heads, dim).transpose(1, 2)  # (B, H, T+P, D)
    probs = (qh @ kh.transpose(2, 3) / math.sqrt(dim)).softmax(dim=-1).mean(dim=1)  # (B, N, T+P)
    return torch.stack([probs[:, :, list(g)].mean(dim=-1) for g in groups], dim=1)  # (B, R, N)


@pytest.mark.parametrize("per_row", [False, True])
def test_maps_from_the_phrase_are_softmax_over_prompt_plus_phrase_tokens(unet, layers, bank, per_row):
    """Each map layer: the bank rows the groups name, projected with that layer's own to_k, are
    extra key columns of the scores; the groups take their columns. Rows with different groups
    (a batch of different prompts) share the call's keys, each averaging its own columns. The
    hooks sum a grid's map layers (background column first): the oracle's layers, added up."""
    groups = ((2, 3), bank.entries(1), bank.entries(2))  # face in the prompt, the others from the phrase
    row_groups = (groups, ((4,), bank.entries(0), (7, 8))) if per_row else (groups, groups)
    rows = bank_rows(groups + row_groups[1])  # appended after the 12 prompt tokens, ascending
    chosen = map_layers(layers, (1, 2))
    captured, recorded = {}, {}

    def keep(state):
        recorded.update({hw: (maps.clone(), state.grid_layers[hw]) for hw, maps in state.grid_maps.items()})

    state = RegionState(kv=[(torch.zeros(1, 1, 1, l.inner_dim),) * 2 for l in layers], weights=torch.ones(3),
                        map_layers=frozenset(l.index for l in chosen), token_groups=groups, add_term=False,
                        bank=bank.embeddings, after_call=keep, row_groups=row_groups if per_row else None)
    session_ = HookSession(root=unet)
    plan_region_hooks(session_, unet, layers, state)
    def probe(name, index):
        def hook(module, args, out):
            captured.setdefault(index, {}).setdefault(name, out)  # the host's call comes first
        return hook

    probes = []
    for layer in chosen:
        probes.append(layer.module.to_q.register_forward_hook(probe("q", layer.index)))
        probes.append(layer.module.to_k.register_forward_hook(probe("k", layer.index)))
    x, t, ctx = inputs(2)
    try:
        with session_, torch.no_grad():
            unet(x, timesteps=t, context=ctx)
    finally:
        for handle in probes:
            handle.remove()
    grids = {downsampled_hw(LATENT, l.level) for l in chosen}
    assert ours(unet) == 0 and set(recorded) == grids
    assert {hw: n for hw, (_, n) in recorded.items()} == {
        hw: sum(1 for l in chosen if downsampled_hw(LATENT, l.level) == hw) for hw in grids}
    assert rows == ((0, 1, 2, 3, 4) if per_row else (1, 2, 3, 4))
    if not per_row:
        assert resolve_columns(groups, T_TEXT, rows) == ((2, 3), (12, 13), (14, 15))
    want = {hw: 0 for hw in grids}
    for layer in chosen:
        got = captured[layer.index]
        with torch.no_grad():
            extra = layer.module.to_k(bank.embeddings[list(rows)])[None]  # (1, P, C)
        want[downsampled_hw(LATENT, layer.level)] += torch.cat([
            oracle_maps(got["q"][row:row + 1], got["k"][row:row + 1], extra, layer.heads,
                        resolve_columns(own, T_TEXT, rows)) for row, own in enumerate(row_groups)])  # (B, R, N)
    for hw, (maps, _) in recorded.items():  # maps (B, h, w, R+1)
        assert (maps[..., 0] == 0).all()  # the background column
        summed = maps[..., 1:].reshape(2, hw[0] * hw[1], 3).transpose(1, 2).double()  # (B, R, N)
        assert (summed - want[hw]).abs().max() < 1e-6  # as tight as each layer was held


# ---------------------------------------------------------------- what it leaves alone


def test_phrase_columns_never_reach_the_host_attention(unet, layers, adapter, bank):
    """Before the window opens the session only gathers maps: with phrase columns the UNet's output
    is bit for bit the plain one; weight 0 too."""
    groups = tuple(bank.entries(r) for r in range(3))
    x, t, ctx = inputs(4)
    with torch.no_grad():
        plain = unet(x, timesteps=t, context=ctx)
    with session(unet, layers, adapter, bank.embeddings, start=0.6) as fusion:
        outs = run(unet, fusion, groups, steps=3, total=4)  # steps 0..2 before the window
        assert fusion.masks is not None
    assert all(torch.equal(o, plain) for o in outs)
    with session(unet, layers, adapter, bank.embeddings, weight=0.0) as fusion:
        assert all(torch.equal(o, plain) for o in run(unet, fusion, groups))
    assert ours(unet) == 0


def test_in_prompt_groups_are_unchanged_bit_for_bit_with_a_bank(unet, layers, adapter, bank):
    """When every phrase is in the prompt nothing is appended: same images, same layout."""
    with session(unet, layers, adapter) as fusion:
        before, masks = run(unet, fusion, IN_PROMPT), fusion.masks
    with session(unet, layers, adapter, bank.embeddings) as fusion:
        after, masks_after = run(unet, fusion, IN_PROMPT), fusion.masks
        assert not fusion.state._bank_keys  # nothing was projected
    assert all(torch.equal(a, b) for a, b in zip(before, after)) and torch.equal(masks, masks_after)


def test_a_prompt_naming_no_region_gives_every_region_a_place(unet, layers, adapter, bank):
    """Groups with no prompt token (no maps before issue 14) now give a layout: masks sum to 1 and
    every region wins somewhere; it differs from an in-prompt layout, and changes the image."""
    groups = tuple(bank.entries(r) for r in range(3))
    with session(unet, layers, adapter, bank.embeddings) as fusion:
        outs = run(unet, fusion, groups)
        masks = fusion.masks
    assert masks.shape == (2, 4, LATENT[0] * LATENT[1])
    assert torch.allclose(masks.sum(dim=1), torch.ones(2, 64), atol=1e-5)
    winners = masks.argmax(dim=1)  # (I, N)
    assert all(set(range(1, 4)) <= set(w.tolist()) for w in winners)
    with session(unet, layers, adapter) as fusion:
        plain_layout = run(unet, fusion, IN_PROMPT)
    assert not torch.equal(outs[-1], plain_layout[-1])


def test_images_with_different_groups_in_one_call_each_get_their_layout(unet, layers, adapter, bank):
    """Two prompts in one batch (one names the regions, one does not): before, only the rows with
    the first cond row's groups gave maps; now every cond row with columns does."""
    mixed = RowPlan(is_cond=(True, True, False, False), image=(0, 1, 0, 1),
                    token_groups=(IN_PROMPT, tuple(bank.entries(r) for r in range(3)), None, None))
    x, t, ctx = inputs(4)
    with session(unet, layers, adapter, bank.embeddings) as fusion, torch.no_grad():
        fusion.begin_pass(LATENT, 4)
        for step in range(2):
            fusion.begin_step(step, mixed)
            unet(x, timesteps=t, context=ctx)
        fusion.begin_step(2, mixed)
        masks = fusion.masks
    regions = masks[:, 1:]
    assert ((regions.amax(dim=2) - regions.amin(dim=2)) > 0.3).all()  # both images, every region


def test_groups_naming_rows_without_a_bank_are_refused(unet, layers, adapter, bank):
    with session(unet, layers, adapter) as fusion, pytest.raises(CharacterAdapterError, match="no phrase bank"):
        run(unet, fusion, ((2,), bank.entries(1), (8,)), steps=1)
    assert ours(unet) == 0


def test_projections_follow_the_pass(unet, layers, adapter, bank):
    """Projected once per pass (weights may change between passes: LoRA, hires), never per step."""
    groups = ((2,), bank.entries(1), bank.entries(2))
    with session(unet, layers, adapter, bank.embeddings) as fusion:
        run(unet, fusion, groups, steps=2)
        first = dict(fusion.state._bank_keys)
        assert len(first) == len(fusion.state.map_layers)
        fusion.begin_step(2, plan(groups))
        with torch.no_grad():
            unet(*inputs(4)[:1], timesteps=inputs(4)[1], context=inputs(4)[2])
        assert all(fusion.state._bank_keys[k] is v for k, v in first.items())
        fusion.begin_pass(LATENT, 4)
        assert not fusion.state._bank_keys


# ---------------------------------------------------------------- cost


class _Ops(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the operators run, and the ones that read a device value back to the host."""

    def __init__(self):
        super().__init__()
        self.count = 0
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default):
            self.reads.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_phrase_columns_cost_no_operator_and_no_host_read(adapter, bank, device):
    """A steady UNet call with every region from its phrase runs no operator more than with the same
    regions in the prompt (the phrase keys ride in the map queue's one copy of every q and k), and
    reads nothing back from the device."""
    unet = sd15_unet(32, CTX, seed=11).to(device)
    layers = find_attn2_layers(unet)
    ip, tokens, negative = adapter
    counts = {}
    for name, groups in (("prompt", IN_PROMPT), ("phrase", tuple(bank.entries(r) for r in range(3)))):
        cfg = FusionConfig(weight=0.8, region_weights=(1.0, 0.7, 1.2))
        fusion = FusionSession(unet, layers, ip, tokens, negative, cfg, phrase_bank=bank.embeddings)
        x, t, ctx = (tensor.to(device) for tensor in inputs(4))
        with fusion, torch.no_grad():
            fusion.begin_pass(LATENT, 10)
            for step in range(3):
                ops = _Ops()
                with ops:
                    fusion.begin_step(step, plan(groups))
                    unet(x, timesteps=t, context=ctx)
        counts[name] = (ops.count, ops.reads, len(fusion.state._bank_keys))
    assert counts["phrase"][1] == counts["prompt"][1] == []
    assert counts["prompt"][2] == 0 and counts["phrase"][2] == len(fusion.state.map_layers)  # phrases projected
    assert counts["phrase"][0] == counts["prompt"][0]


# ---------------------------------------------------------------- what the user sees


def test_the_layout_legend_keeps_the_picture_and_names_each_region_in_its_colour():
    from PIL import Image

    from charadapter.overlays import PALETTE, with_legend

    image = Image.new("RGB", (64, 48), (10, 20, 30))
    out = with_legend(image, ["face: from the phrase", "upper body: in the prompt"])
    assert out.height > image.height and out.width >= image.width
    assert out.crop((0, 0, 64, 48)).tobytes() == image.tobytes()  # the picture itself is untouched
    strip = {out.getpixel((x, y)) for x in range(out.width) for y in range(48, out.height)}
    assert {PALETTE[0], PALETTE[1], (255, 255, 255)} <= strip and PALETTE[2] not in strip
    assert with_legend(image, []) is image
