"""Several characters in the core: the layout math on synthetic maps, the fusion session with
(character, region) pairs on a tiny ldm UNet, and the settings (UI, API dicts, infotext, X/Y/Z)."""

import base64
import io

import pytest
import torch
from PIL import Image

from charadapter.attention import ip_keys_values, region_ip_delta
from charadapter.errors import CharacterAdapterError
from charadapter.fusion import CharacterTokens, FusionConfig, FusionSession, RowPlan, repeat_tokens
from charadapter.masks import (
    character_layout, character_prior, figure_shares, hard_masks, pair_count, soft_masks, uniform_masks,
)
from charadapter.params import ARG_NAMES, ARG_NAMES_ONE, UNIT_ARGS, Character, ParamError, Params, Region
from fusion_fixtures import CTX, layers, random_adapter, unet  # noqa: F401  (fixtures by name)

SEEDS = range(6)
H = W = 8
N = H * W


def _maps(seed, b=2, r=3, n=N):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(b, r, n, generator=gen) * 3 - 1


def _halves(b=1):
    """Subject maps (B, 2, N): character 1 fills the left half of an 8x8 grid, character 2 the right."""
    grid = torch.zeros(b, 2, H, W)
    grid[:, 0, :, :W // 2] = 1.0
    grid[:, 1, :, W // 2:] = 1.0
    return grid.view(b, 2, N) + 0.01 * torch.rand(b, 2, N, generator=torch.Generator().manual_seed(0))


def _blob(rows, cols):
    """A map (N,) that is 1 on the given rows/cols of the grid, 0 elsewhere."""
    grid = torch.zeros(H, W)
    grid[rows, cols] = 1.0
    return grid.view(N)


# ---------------------------------------------------------------- layout math


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_one_character_is_todays_layout_bit_for_bit(seed, mode):
    """With one character (with or without a subject map) the layout is soft_masks / hard_masks itself."""
    maps = _maps(seed)
    today = soft_masks(maps, 0.1, 0.4) if mode == "soft" else hard_masks(maps, 0.4)
    assert torch.equal(character_layout(None, maps, [3], mode, 0.1, 0.4), today)
    assert torch.equal(character_layout(_maps(seed + 50, r=1), maps, [3], mode, 0.1, 0.4), today)
    assert torch.equal(character_prior([3], 2, N), uniform_masks(2, 3, N))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_layout_shape_sums_to_one_and_factorises(seed, mode):
    counts = [3, 2, 0]  # the third character is one whole-figure pair
    subjects, regions = _maps(seed, r=3), _maps(seed + 10, r=5)
    layout = character_layout(subjects, regions, counts, mode, 0.2, 0.4)
    assert layout.shape == (2, pair_count(counts) + 1, N) == (2, 7, N)
    assert torch.allclose(layout.sum(dim=1), torch.ones(2, N), atol=1e-6) and (layout >= 0).all()
    shares = figure_shares(subjects, mode, 0.2)  # (B, K, N)
    own = soft_masks(regions[:, :3], 0.2, 0.4) if mode == "soft" else hard_masks(regions[:, :3], 0.4)
    assert torch.allclose(layout[:, 1:4], own[:, 1:] * shares[:, :1], atol=1e-7)  # M_1j = A_1 L_1[j]
    assert torch.allclose(layout[:, 6], shares[:, 2], atol=1e-7)  # whole figure: M = A_3
    if mode == "hard":
        assert set(layout.unique().tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_shared_region_phrases_are_confined_to_each_characters_figure(mode):
    """Two characters both have a "face": the one face map covers both faces, and the subject maps
    give the left face to character 1 and the right face to character 2."""
    face = _blob(slice(0, 3), slice(1, 3)) + _blob(slice(0, 3), slice(5, 7))  # both faces, one phrase
    body = _blob(slice(3, 8), slice(0, 8))
    regions = torch.stack([face, body, face, body]).unsqueeze(0)  # (1, 4, N): same maps for both characters
    layout = character_layout(_halves(), regions, [2, 2], mode, 0.1, 0.4).view(1, 5, H, W)
    left, right = layout[0, :, :, :W // 2], layout[0, :, :, W // 2:]
    tight = 0.0 if mode == "hard" else 1e-3
    assert left[3:].max() <= tight and right[1:3].max() <= tight  # each pair stays in its own figure
    assert layout[0, 1, 0:3, 1:3].min() > 0.9 and layout[0, 3, 0:3, 5:7].min() > 0.9  # its own face is its
    assert layout[0, 2, 3:, :W // 2].min() > 0.9 and layout[0, 4, 3:, W // 2:].min() > 0.9


def test_a_character_without_a_subject_map_only_takes_what_no_other_claims():
    subjects = _halves()
    subjects[:, 1] = 0.0  # character 2's subject phrase is not in the prompt: no evidence
    shares = figure_shares(subjects, "soft", 0.1).view(1, 2, H, W)
    assert shares[0, 0, :, :W // 2].min() > 0.99  # character 1 keeps its figure
    assert torch.allclose(figure_shares(torch.zeros(1, 2, N), "soft", 0.1), torch.full((1, 2, N), 0.5))


def test_without_subject_maps_characters_split_evenly_and_the_prior_too():
    regions = _maps(1, b=1, r=2)
    layout = character_layout(None, regions, [1, 1], "soft", 0.1, 0.4)
    single = soft_masks(regions[:, :1], 0.1, 0.4)
    assert torch.allclose(layout[:, 1], 0.5 * single[:, 1])
    prior = character_prior([3, 1, 0], 2, N)
    assert prior.shape == (2, 6, N) and torch.allclose(prior.sum(dim=1), torch.ones(2, N))
    assert torch.allclose(prior[0, :, 0], torch.tensor([0.0, 1 / 9, 1 / 9, 1 / 9, 1 / 3, 1 / 3]))


def test_layout_refuses_maps_that_do_not_fit_the_counts():
    with pytest.raises(CharacterAdapterError, match="region maps"):
        character_layout(_halves(), _maps(0, b=1, r=3), [2, 2], "soft", 0.1, 0.4)
    with pytest.raises(CharacterAdapterError, match="subject maps"):
        character_layout(_maps(0, b=1, r=3), _maps(0, b=1, r=4), [2, 2], "soft", 0.1, 0.4)
    with pytest.raises(ValueError, match="mode"):
        character_layout(None, _maps(0), [3], "medium", 0.1, 0.4)


# ---------------------------------------------------------------- tokens of different lengths


def test_repeated_tokens_give_the_same_attention():
    """A 4-token adapter's tokens repeated to 16 (a Plus adapter's count) attend exactly alike."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 16, 32, generator=gen)
    tokens = torch.randn(2, 4, 8, generator=gen)  # (R, T, C_ctx)
    wk, wv = torch.randn(32, 8, generator=gen), torch.randn(32, 8, generator=gen)
    k, v = ip_keys_values(tokens.unsqueeze(1), wk, wv)  # (R, 1, T, C)
    k16, v16 = ip_keys_values(repeat_tokens(tokens, 16, dim=1).unsqueeze(1), wk, wv)
    assert k16.shape == (2, 1, 16, 32)
    assert torch.allclose(region_ip_delta(q, k, v, 4), region_ip_delta(q, k16, v16, 4), atol=1e-5)
    with pytest.raises(CharacterAdapterError, match="not a multiple"):
        repeat_tokens(tokens, 6, dim=1)


# ---------------------------------------------------------------- the session on a tiny UNet

T_TEXT = 12
GROUPS_1 = ((2, 3), (5,))  # character 1: two regions
GROUPS_2 = ((2, 3), (8,))  # character 2: shares the first region phrase
SUBJECTS = ((1,), (10,))
GROUPS = GROUPS_1 + GROUPS_2 + SUBJECTS  # the map columns: region phrases, then subjects


def _characters(layers, tokens=(4, 4), **second):
    one = CharacterTokens(*random_adapter(layers, 12, tokens[0], regions=2), FusionConfig(
        weight=0.8, region_weights=(1.0, 0.7), subject=True))
    two = CharacterTokens(*random_adapter(layers, 13, tokens[1], regions=2), FusionConfig(**{
        **dict(weight=1.0, region_weights=(1.0, 1.2), subject=True), **second}))
    return one, two


def _run(unet, fusion, steps=3, total=4, groups=GROUPS):
    gen = torch.Generator().manual_seed(14)
    x, t, ctx = torch.randn(2, 4, H, W, generator=gen), torch.full((2,), 500.0), torch.randn(2, T_TEXT, CTX, generator=gen)
    plan = RowPlan(is_cond=(True, False), image=(0, 0), token_groups=(groups, None))
    outs = []
    fusion.begin_pass((H, W), total)
    with torch.no_grad():
        for step in range(steps):
            fusion.begin_step(step, plan)
            outs.append(unet(x, timesteps=t, context=ctx))
    return outs


def test_two_characters_make_one_layout_of_their_pairs(unet, layers):
    one, two = _characters(layers)
    fusion = FusionSession(unet, layers, *one, others=[two])
    assert (fusion.pairs, fusion.map_columns, fusion.owner) == (4, 6, (0, 0, 1, 1))
    assert fusion.state.kv[0][0].shape[:3] == (4, 2, 4)  # (P, token sets, T, C): one stacked term
    with fusion:
        _run(unet, fusion)
        masks = fusion.masks
    assert masks.shape == (1, 5, N) and torch.allclose(masks.sum(dim=1), torch.ones(1, N), atol=1e-5)


def test_adapters_with_4_and_16_tokens_share_one_term(unet, layers):
    one, two = _characters(layers, tokens=(4, 16))
    fusion = FusionSession(unet, layers, *one, others=[two])
    assert fusion.state.kv[0][0].shape[:3] == (4, 2, 16)
    with fusion:
        outs = _run(unet, fusion, steps=2)
    assert all(torch.isfinite(o).all() for o in outs)


def test_each_character_keeps_its_own_window(unet, layers):
    """Character 2 from half-way: before that its pairs add nothing, exactly as with weight 0."""
    one, two = _characters(layers)
    late = FusionSession(unet, layers, *one, others=[two._replace(config=FusionConfig(
        weight=1.0, region_weights=(1.0, 1.2), subject=True, start=0.5))])
    off = FusionSession(unet, layers, *one, others=[two._replace(config=FusionConfig(
        weight=0.0, region_weights=(1.0, 1.2), subject=True))])
    both = FusionSession(unet, layers, *one, others=[two])
    outs = {}
    for name, fusion in (("late", late), ("off", off), ("both", both)):
        with fusion:
            outs[name] = _run(unet, fusion, steps=3, total=4)
    assert torch.equal(outs["late"][0], outs["off"][0]) and torch.equal(outs["late"][1], outs["off"][1])
    assert not torch.equal(outs["late"][2], outs["off"][2])  # step 2 of 4: in character 2's window
    assert not torch.equal(outs["both"][0], outs["off"][0])


def test_session_refuses_mismatched_characters(unet, layers):
    one, two = _characters(layers)
    with pytest.raises(CharacterAdapterError, match="mode"):
        FusionSession(unet, layers, *one, others=[two._replace(config=FusionConfig(
            weight=1.0, region_weights=(1.0, 1.2), mode="hard"))])
    fusion = FusionSession(unet, layers, *one, others=[two])
    fusion.begin_pass((H, W), 4)
    with pytest.raises(CharacterAdapterError, match="6 phrases"):
        fusion.begin_step(0, RowPlan(is_cond=(True, False), image=(0, 0), token_groups=(GROUPS_1, None)))


# ---------------------------------------------------------------- settings


def _png(colour=(200, 30, 30)):
    buffer = io.BytesIO()
    Image.new("RGB", (40, 48), colour).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _dict(**kwargs):
    data = {"image": _png(), "model": "ip-adapter_sd15.safetensors"}
    data.update(kwargs)
    return data


def test_positional_layout_keeps_todays_25_values_first():
    assert ARG_NAMES[:25] == ARG_NAMES_ONE and ARG_NAMES[25] == "subject"
    assert ARG_NAMES[26:26 + UNIT_ARGS] == tuple(f"character2_{n}" for n in (
        "image", "model", "encoder", "weight", "start", "end", "subject")) + tuple(
        f"character2_region{s}_{p}" for s in range(1, 5) for p in ("reference_phrase", "phrase", "weight"))


def test_ui_units_without_an_image_are_off_and_keep_their_tab_number():
    image = Image.new("RGB", (40, 40))
    params = Params(enabled=True, characters=(
        Character(image=image, model="a", subject="girl"),
        Character(image=image, model="b", subject="knight", weight=1.2, unit=3)))
    args = params.to_args()
    assert len(args) == len(ARG_NAMES)
    back = Params.from_args(args)
    assert [c.unit for c in back.characters] == [1, 3] and back.characters[1].weight == 1.2
    assert back == params.validated()
    only_second = Params.from_args(Params(enabled=True, characters=(
        Character(image=image, model="b", unit=2),)).to_args())
    assert [c.unit for c in only_second.characters] == [2]


def test_ui_errors_name_the_character():
    image = Image.new("RGB", (40, 40))
    two = (Character(image=image, model="a", subject="girl"), Character(image=image, model="b", subject="knight", unit=2))
    with pytest.raises(ParamError, match=r"Character 2: weight: must be between") as err:
        Params(enabled=True, characters=(two[0], Character(**{**two[1].__dict__, "weight": 3}))).validated()
    assert err.value.field == "Character 2: weight"
    with pytest.raises(ParamError, match="Character 2: subject: required with two or more characters"):
        Params(enabled=True, characters=(two[0], Character(**{**two[1].__dict__, "subject": ""}))).validated()
    with pytest.raises(ParamError, match="Character 2: subject: 'Girl' is also Character 1's subject"):
        Params(enabled=True, characters=(two[0], Character(**{**two[1].__dict__, "subject": "Girl"}))).validated()
    with pytest.raises(ParamError, match=r"Character 2: regions\[0\].weight"):
        Params(enabled=True, characters=(two[0], Character(**{**two[1].__dict__, "regions": (
            Region("face", "face", -1.0),)}))).validated()


def test_api_takes_one_dict_per_character():
    params = Params.from_args([_dict(subject="girl", fusion="hard"),
                               _dict(subject="knight", weight=1.1, regions=[{"reference_phrase": "helmet"}])])
    assert params.fusion == "hard" and [c.unit for c in params.characters] == [1, 2]
    assert params.characters[1].weight == 1.1 and params.characters[1].regions == (Region("helmet", "helmet"),)
    assert params.characters[1].image.size == (40, 48)
    # the WebUI API puts UI defaults after the request's args: ignored
    assert Params.from_args([_dict(subject="a"), _dict(subject="b")] + list(Params().to_args())[2:]) == Params.from_args(
        [_dict(subject="a"), _dict(subject="b")])


@pytest.mark.parametrize("second,field", [
    ({"fusion": "hard"}, "args[1].fusion"),
    ({"temperature": 0.5}, "args[1].temperature"),
    ({"enabled": False}, "args[1].enabled"),
    ({"weight": "1"}, "args[1].weight"),
    ({"weight": 2.5}, "args[1].weight"),
    ({"colour": "red"}, "args[1].colour"),
    ({"image": "not base64!"}, "args[1].image"),
    ({"image": None}, "args[1].image"),
    ({"model": "../x"}, "args[1].model"),
    ({"model": ""}, "args[1].model"),
    ({"start": 0.9, "end": 0.2}, "args[1].start"),
    ({"subject": ""}, "args[1].subject"),
    ({"subject": 5}, "args[1].subject"),
    ({"regions": [{"reference_phrase": "face", "weight": "1"}]}, "args[1].regions[0].weight"),
    ({"regions": [{"reference_phrase": "face", "size": 1}]}, "args[1].regions[0].size"),
])
def test_api_errors_name_the_dict_and_key(second, field):
    with pytest.raises(ParamError) as err:
        Params.from_args([_dict(subject="girl"), _dict(**{"subject": "knight", **second})])
    assert err.value.field == field and f"Character-Adapter: {field}:" in str(err.value)


def test_api_shared_settings_may_repeat_with_the_same_value():
    params = Params.from_args([_dict(subject="a", fusion="hard", timestep=500),
                               _dict(subject="b", fusion="HARD", timestep=500.0)])
    assert params.fusion == "hard" and params.timestep == 500
    with pytest.raises(ParamError, match=r"args\[2\]: a dict after positional values"):
        Params.from_args([_dict(subject="a"), True, _dict(subject="b")])
    with pytest.raises(ParamError, match="at most 8 characters"):
        Params.from_args([_dict(subject=str(i)) for i in range(9)])


def test_infotext_per_character_round_trip():
    params = Params(enabled=True, fusion="hard", characters=(
        Character(image="x", model="a.safetensors", subject="girl", regions=(Region("face", "her face", 0.5),)),
        Character(image="y", model="b.safetensors", encoder="clip_h.pth", weight=1.3, start=0.2, subject="old knight",
                  regions=(), unit=3),
    ))
    info = {k: str(v) for k, v in params.to_infotext(["hash1", "hash3"]).items()}
    assert info["Character-Adapter reference"] == "hash1" and info["Character-Adapter 3 reference"] == "hash3"
    assert info["Character-Adapter 3 subject"] == "old knight" and info["Character-Adapter 3 regions"] == "[]"
    assert info["Character-Adapter 3 window"] == "0.2-1.0" and "Character-Adapter 2 model" not in info
    back = Params.from_infotext(info)
    assert back == Params(**{**params.__dict__, "characters": tuple(
        Character(**{**c.__dict__, "image": None}) for c in params.characters)})


def test_one_character_infotext_is_todays():
    params = Params.single(enabled=True, image="x", model="m", weight=0.5)
    assert list(params.to_infotext(["h"])) == [
        "Character-Adapter", "Character-Adapter reference", "Character-Adapter model", "Character-Adapter encoder",
        "Character-Adapter weight", "Character-Adapter window", "Character-Adapter fusion",
        "Character-Adapter temperature", "Character-Adapter background", "Character-Adapter timestep",
        "Character-Adapter crop", "Character-Adapter regions"]


def test_xyz_overrides_reach_character_1_and_each_characters_weight():
    image = Image.new("RGB", (40, 40))
    params = Params(enabled=True, characters=(
        Character(image=image, model="a", subject="girl"), Character(image=image, model="b", subject="knight", unit=2)))
    cell = params.with_overrides({"weight": 0.3, "character2_weight": 1.5, "fusion": "hard",
                                  "region_weights": (0.5, 1.0, 0.0)})
    assert [c.weight for c in cell.characters] == [0.3, 1.5] and cell.fusion == "hard"
    assert [r.weight for r in cell.characters[0].regions] == [0.5, 1.0, 0.0]
    assert cell.characters[1].regions == params.characters[1].regions
    with pytest.raises(ParamError, match="Character 3: weight"):
        params.with_overrides({"character3_weight": 1.0})
    with pytest.raises(ParamError, match="Character 2: weight: must be between"):
        params.with_overrides({"character2_weight": 2.5})


# ---------------------------------------------------------------- the sampling loop's channels-last form


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_character_logits_give_the_layout(seed, mode):
    """fused_logits' columns [background, regions, subjects] -> character_logits -> softmax / one-hot
    is character_layout's masks (the sampling loop's form of the same formula)."""
    counts, tau, beta = [3, 2, 0], 0.1, 0.4
    gen = torch.Generator().manual_seed(seed)
    maps = torch.rand(2, 5 + 3, N, generator=gen)  # (I, regions + subjects, N)
    reference = character_layout(maps[:, 5:], maps[:, :5], counts, mode, tau, beta)  # (I, P+1, N)
    _assert_loop_layout(maps, counts, [6, 7, 8], mode, tau, beta, reference)


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_character_logits_without_a_subject_phrase(mode):
    """A character whose config has no subject phrase gets no map column: its figure logit is 0,
    as character_layout's all-zero subject map gives it."""
    counts, tau, beta = [2, 0, 3], 0.1, 0.4
    gen = torch.Generator().manual_seed(7)
    maps = torch.rand(2, 5 + 2, N, generator=gen)  # (I, regions + subjects of characters 1 and 3, N)
    subject_maps = torch.stack([maps[:, 5], torch.zeros(2, N), maps[:, 6]], dim=1)  # (I, K, N)
    reference = character_layout(subject_maps, maps[:, :5], counts, mode, tau, beta)  # (I, P+1, N)
    _assert_loop_layout(maps, counts, [6, None, 7], mode, tau, beta, reference)


def _assert_loop_layout(maps, counts, subject_columns, mode, tau, beta, reference):
    """The sampling loop's channels-last layout (fused_logits, character_logits, softmax or
    one-hot) of maps (I, M, N) equals `reference` (I, P+1, N) from character_layout."""
    from charadapter.masks import MAP_FLOOR, character_logits, fused_logits, one_hot_last

    images, columns, _ = maps.shape
    channels_last = torch.cat([torch.zeros(images, N, 1), maps.transpose(1, 2)], dim=-1) + MAP_FLOOR  # (I, N, 1+M)
    bias = torch.zeros(1 + columns)
    bias[0] = beta / tau
    logits = character_logits(fused_logits(channels_last, bias, tau)[0], counts, subject_columns, mode, tau)
    got = torch.softmax(logits, dim=-1) if mode == "soft" else one_hot_last(logits, torch.float32)
    assert got.shape == (images, N, reference.shape[1])
    if mode == "soft":
        assert torch.allclose(got.transpose(1, 2), reference, atol=1e-5)
    else:
        assert torch.equal(got.transpose(1, 2), reference)
