"""The toy world: the generator's ground truth, the trained files' formats, and a reduced ablation
whose thresholds come from measured numbers (README "Toy world"), so that a regression in
segmentation or fusion turns CI red."""

import os
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from toyworld import data  # noqa: E402
from toyworld.text import WordTokenizer  # noqa: E402

# ---------------------------------------------------------------------------- generator


def test_samples_are_a_function_of_the_seed():
    a, b, c = data.make_sample(7), data.make_sample(7), data.make_sample(8)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.masks, b.masks) and a.caption == b.caption
    assert not np.array_equal(a.image, c.image)
    assert a.image.shape == (data.SIZE, data.SIZE, 3) and a.image.dtype == np.uint8
    assert a.masks.shape == (3, data.SIZE, data.SIZE) and a.masks.dtype == bool


@pytest.mark.parametrize("seed", range(40))
def test_masks_are_disjoint_nonempty_and_ordered_top_to_bottom(seed):
    s = data.make_sample(seed)
    assert (s.masks.sum(axis=0) <= 1).all()
    centres = []
    for region, mask in zip(data.REGIONS, s.masks):
        assert mask.sum() >= 8, f"{region} has {mask.sum()} pixels"
        centres.append(np.nonzero(mask)[0].mean())
    assert centres[0] < centres[1] < centres[2]  # face above jacket above trousers


@pytest.mark.parametrize("seed", range(20))
def test_mask_pixels_have_their_regions_colour(seed):
    s = data.make_sample(seed)
    img = s.image.astype(np.float64)
    for region, mask in zip(data.REGIONS, s.masks):
        want = np.array(s.character.colour(region), dtype=np.float64)
        shades = [want * f for f in np.linspace(0.35, 1.0, 14)]  # plain, stripes, zip and their blends
        dist = np.min([np.linalg.norm(img[mask] - sh, axis=-1) for sh in shades], axis=0)
        # jitter (+-0.05) and anti-aliased edges: most pixels near a shade of the region's colour
        assert np.median(dist) < 40, region  # small squatting figures are mostly edge pixels
    background = ~s.masks.any(axis=0)
    bg = np.array(data.BACKGROUNDS[s.layout.background], dtype=np.float64)
    assert np.median(np.linalg.norm(img[background] - bg, axis=-1)) < 30


def test_captions_name_what_is_drawn_and_sometimes_omit_or_share_colours():
    samples = [data.make_sample(s) for s in range(300)]
    tok = WordTokenizer()
    omitted = shared = bare = 0
    for s in samples:
        words = tok.words_of(s.caption)
        assert all(w in tok.ids for w in words), s.caption
        for region in data.REGIONS:
            assert region in words
        c = s.character
        omitted += not (c.jacket in words and c.trousers in words and c.skin in words)
        shared += c.jacket == c.trousers
        bare += not s.caption.startswith("a ")
        if s.layout.background in words and c.jacket != s.layout.background:
            assert s.caption.endswith(f"in a {s.layout.background} room")
    assert 0.25 < omitted / len(samples) < 0.75
    assert 0.05 < shared / len(samples) < 0.3
    assert 0.1 < bare / len(samples) < 0.3


def test_held_out_references_stand_and_differ_from_training_seeds():
    refs = data.held_out(6)
    assert all(r.layout.pose == "stand" for r in refs)
    assert len({r.image.tobytes() for r in refs}) == 6
    assert np.array_equal(refs[0].image, data.held_out(1)[0].image)


def test_region_phrases_are_found_in_prompts_at_the_same_positions():
    from charadapter.tokens import phrase_positions

    tok = WordTokenizer()
    prompts = [data.prompt(["face", "jacket", "trousers"], bg, size, pos)
               for bg in data.BACKGROUNDS for size in data.SIZES for pos in data.POSITIONS]
    groups = {tuple(tuple(phrase_positions([tok.chunk(p)], tok.encode_words(w))) for w in ("face", "jacket", "trousers"))
              for p in prompts}
    assert len(groups) == 1 and all(len(g) == 1 for g in next(iter(groups)))


def test_a_scene_places_several_figures_and_a_later_one_hides_an_earlier_one():
    c1, c2 = data.Character("pale", "red", "blue"), data.Character("dark", "green", "yellow", True)
    l1 = data.Layout("white", 0.4, 0.95, 0.8)
    l2 = data.Layout("white", 0.55, 0.9, 0.7)
    image, masks = data.render_scene([(c1, l1), (c2, l2)], "white")
    assert masks.shape == (2, 3, data.SIZE, data.SIZE)
    assert (masks.reshape(6, data.SIZE, data.SIZE).sum(axis=0) <= 1).all()  # one label per pixel
    alone, _ = data.render(c1, l1)
    _, first_alone = data.render_scene([(c1, l1)], "white")
    hidden = first_alone[0].any(axis=0) & masks[1].any(axis=0)
    assert hidden.sum() > 20 and not (masks[0].any(axis=0) & hidden).any()  # the overlap is figure 2's
    assert np.array_equal(alone, data.render_scene([(c1, l1)], "white")[0])
    for f, c in enumerate((c1, c2)):
        for r, region in enumerate(data.REGIONS):
            assert masks[f, r].sum() >= 8, (f, region)


def test_a_changed_reference_differs_in_its_one_region_only():
    from toyworld.teacher import references

    for ref in references(4):
        _, masks = data.render(ref.character, ref.layout)
        for r, region in enumerate(data.REGIONS):
            other = ref.changed(region)
            changed = [k for k in data.REGIONS if other.character.colour(k) != ref.character.colour(k)]
            assert changed == [region] and other.character.jacket != other.character.trousers
            assert other.layout == ref.layout
            diff = (ref.image != other.image).any(axis=-1)
            near = np.zeros_like(masks[r])  # the region and its anti-aliased rim
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    near |= np.roll(np.roll(masks[r], dy, axis=0), dx, axis=1)
            assert diff.sum() >= 0.8 * masks[r].sum() and not (diff & ~near).any(), region


def test_teacher_forced_targets_and_their_layout():
    from toyworld.teacher import make_batch, references, targets_for

    ref = references(1)[0]
    scenes = targets_for(ref, 2)
    for scene in scenes:
        (character, layout), = scene.figures
        assert character == ref.character and layout.background != ref.layout.background
        assert "face" in scene.prompt and ref.character.jacket not in scene.prompt.split()
        assert scene.colour_prompt.split().count(ref.character.jacket) >= 1
        lay = scene.layout()  # (R+1, N): background first, one-hot
        assert lay.shape == (4, data.SIZE ** 2) and torch.equal(lay.sum(dim=0), torch.ones(data.SIZE ** 2))
        assert torch.equal(lay[1:].reshape(3, data.SIZE, data.SIZE).bool(), torch.from_numpy(scene.masks[0]))
    batch = make_batch(scenes, [5, 6], [100, 500, 900])
    assert batch.x0.shape == (12, 3, data.SIZE, data.SIZE) and batch.masks.shape == (12, 4, data.SIZE, data.SIZE)
    assert sorted(set(batch.unit.tolist())) == [0, 1, 2, 3] and batch.t.tolist()[:3] == [100, 500, 900]
    assert torch.equal(batch.noise[0], batch.noise[2]) and not torch.equal(batch.noise[0], batch.noise[3])


def test_teacher_forced_statistics_on_known_numbers():
    """Gains are per-timestep ratios of mean errors averaged over timesteps; the bootstrap resamples
    references, then units within them, and reproduces the point value when nothing varies."""
    from toyworld.teacher import bootstrap_rows, gain, interval, rise

    step = np.array([0, 0, 1, 1])
    base = np.array([[1.0, 2.0], [3.0, 2.0], [0.5, 1.0], [0.5, 1.0]])  # (rows, regions)
    half = base * np.array([0.5, 1.0])
    assert np.allclose(gain(half, base, step), [0.5, 0.0])
    assert np.allclose(gain(base, base, step), [0.0, 0.0])
    worse = base + np.array([[0.4, 0.0], [0.4, 0.0], [0.1, 0.0], [0.1, 0.0]])
    assert np.allclose(rise(worse, base, base, step), [0.5 * (0.4 / 2 + 0.1 / 0.5), 0.0])
    units = np.tile([0, 0, 1, 1], (3, 1))  # 3 references, 2 units of 2 rows each
    picks = bootstrap_rows(3, units, np.random.default_rng(0))
    assert len(picks) == 6 and all(0 <= r < 3 and len(rows) == 2 for r, rows in picks)
    lo, hi = interval(lambda p: np.array([len(p)]), 3, units, 20)
    assert lo[0] == hi[0] == 6


def test_adapter_loss_weighs_the_figures_regions_alike():
    """train.region_balance: each of face, jacket and trousers gets a third of the figure's area
    share of the loss, the background its own; the mean weight stays 1."""
    import torch as _torch

    from toyworld.train import region_balance

    masks = np.stack([data.make_sample(i).masks for i in range(6)])  # (6, 3, H, W)
    w = region_balance(masks)
    m = _torch.from_numpy(masks).float()
    per_region = (w[:, None] * m).sum(dim=(2, 3))  # (6, 3)
    figure = m.sum(dim=(1, 2, 3))
    assert _torch.allclose(per_region, (figure / 3)[:, None].expand(-1, 3), rtol=1e-5)
    background = ~masks.any(axis=1)
    assert _torch.equal(w[_torch.from_numpy(background)], _torch.ones(int(background.sum())))
    assert _torch.allclose(w.mean(dim=(1, 2)), _torch.ones(6))


def test_teacher_forced_figure_interval_resamples_the_mean():
    """The figure's interval is the bootstrap of the regions' mean gain, not the mean of their
    bounds: regions whose gains move against each other over references leave the figure steady."""
    from toyworld.teacher import BASELINE, PLAIN, setting_table, summarise

    refs, rows = 8, 4
    base = np.ones((refs, rows, 4))
    spread = np.linspace(-0.2, 0.2, refs)[:, None]  # face better where jacket is worse, by as much
    plain = np.ones((refs, rows, 4)) * 0.8
    plain[..., 0] -= spread
    plain[..., 1] += spread
    out = summarise(setting_table([BASELINE, PLAIN]), {BASELINE: list(base), PLAIN: list(plain)}, {}, {},
                    np.tile(np.arange(rows), (refs, 1)), np.zeros(rows, dtype=int), 200, [[0.5, 0.5, 0.5]],
                    config={}, seconds=0.0)["fidelity"][PLAIN]
    assert out["figure"] == pytest.approx(0.2)
    assert out["figure_lo"] == pytest.approx(0.2) and out["figure_hi"] == pytest.approx(0.2)
    assert out["lo"][0] < 0.15 and out["hi"][0] > 0.25  # each region alone does vary
    assert len(out["gain"]) == len(out["lo"]) == 4


def test_teacher_forced_bleed_is_paired_against_the_plain_adapter():
    """H3's comparison: each region setting's mean bleed minus the plain adapter's, resampled
    together, so the shared spread of the references cancels."""
    from toyworld.teacher import BASELINE, PLAIN, setting_table, summarise

    refs, rows = 8, 4
    base = np.ones((refs, rows, 4))
    level = np.linspace(0.6, 1.0, refs)[:, None, None]  # references differ a lot; the settings' difference does not
    err = {BASELINE: list(base), PLAIN: list(base * 0.8), "CA hard": list(base * 0.8)}
    changed = {}
    for name, bleed in ((PLAIN, 0.1), ("CA hard", 0.0)):
        wrong = base * 0.8
        wrong[..., [0, 2]] += bleed * level  # the other figure regions
        wrong[..., 1:2] += 0.3 * level  # the jacket itself
        changed[(name, "jacket")] = list(wrong)
    out = summarise(setting_table([BASELINE, PLAIN, "CA hard"]), err, {}, changed,
                    np.tile(np.arange(rows), (refs, 1)), np.zeros(rows, dtype=int), 200, [[0.5, 0.5, 0.5]],
                    config={}, seconds=0.0)
    plain = out["bleed"][PLAIN]["mean"]
    assert plain["bleed"] == pytest.approx(0.1 * level.mean(), abs=1e-4) and plain["bleed_hi"] - plain["bleed_lo"] > 0.01
    paired = out["bleed_paired"][f"CA hard - {PLAIN}"]
    assert paired["bleed"] == pytest.approx(-0.1 * level.mean(), abs=1e-4)
    assert paired["bleed_hi"] < 0 and paired["own"] == pytest.approx(0.0, abs=1e-4)
    assert list(out["bleed_paired"]) == [f"CA hard - {PLAIN}"]


# ---------------------------------------------------------------------------- trained files

weights_needed = pytest.mark.skipif(
    not __import__("toyworld.model", fromlist=["weights_present"]).weights_present(),
    reason="toyworld/weights not trained (python -m toyworld.train)")


@weights_needed
def test_trained_files_load_through_the_extensions_loaders_and_are_small():
    from toyworld.model import WEIGHTS, load_image_side

    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(WEIGHTS) for f in fs)
    assert total <= 10_000_000
    adapter, clip = load_image_side()
    assert adapter.spec.variant == "sd15" and adapter.spec.num_layers == 16 and adapter.spec.num_tokens == 2
    assert clip.config.projection_dim == 1024
    from safetensors import safe_open

    with safe_open(os.path.join(WEIGHTS, "toy_sd.safetensors"), "pt") as f:
        schedule = f.get_tensor("alphas_cumprod")  # fp16 would round 1 - 1e-4 to 1.0
    assert schedule.dtype == torch.float32 and schedule[0] < 1.0


# Measured on the committed weights with QUICK (README "Toy world"). Segmentation is a real
# claim: the maps beat the position prior by far, from the 16x16 layers, and follow colour
# words (the caption-swap control). Generation pins what the weak sampler gives: a fusion that
# stops adding the region term (or adds it nowhere) has no "change" from the plain image.
QUICK = dict(refs=4, prompts_per_ref=4, steps=20, seg_t=150, timesteps=(50, 150), quick=True, seg_refs=16)
MEASURED_IOU = {"50": 0.542, "150": 0.585}  # mean over regions
# re-measured on the retrained weights of issue 12 (base 6000 steps; encoder 1600 and adapter 2000 steps,
# the figure's regions balanced in the loss), the layout from the reference phrases: the adapter changes
# the picture 1.4x more than the previous adapter (0.064), 2.2x more than issue 6's (0.042)
MEASURED_CHANGE = {"IP-Adapter (global)": 0.091, "CA hard": 0.073, "CA soft t0.1 bg0.4": 0.072}  # mean |dpixel|
MEASURED_COLOUR_ERR = {"no adapter": 0.718, "IP-Adapter (global)": 0.462, "CA soft t0.1 bg0.4": 0.467,
                       "CA hard": 0.452}  # mean over face/jacket/trousers, RGB distance in 0..1 units


@pytest.fixture(scope="module")
def quick_run():
    from toyworld.evaluate import run

    return run(**QUICK)


def colour_err(row):
    return np.mean([row[f"{r}_err"] for r in data.REGIONS])


@weights_needed
def test_segmentation_finds_the_regions_from_the_16x16_maps(quick_run):
    seg = quick_run["segmentation"]
    for t, measured in MEASURED_IOU.items():
        assert abs(seg["iou"][t]["mean"] - measured) <= 0.05, (t, seg["iou"][t])
    assert seg["prior"]["mean"] == pytest.approx(0.281, abs=0.01)  # the generator did not change
    assert seg["iou"]["150"]["mean"] >= seg["prior"]["mean"] + 0.15
    assert min(seg["iou"]["150"][r] for r in data.REGIONS) >= 0.3
    levels = seg["iou_by_levels"]
    assert levels["1"]["mean"] >= levels["2"]["mean"] + 0.25  # the 8x8 maps are near chance


@weights_needed
def test_segmentation_follows_colour_words_not_garment_nouns(quick_run):
    """The colour confound, pinned: swapping the garments' colour words swaps their masks, and
    bare nouns find almost nothing. A model that grounds nouns would fail this (then re-measure).
    Measured on these 15: 0.44 with the other garment, 0.10 with the true one."""
    seg = quick_run["segmentation"]
    assert seg["swap"]["n"] == 15
    assert seg["swap"]["garment_iou_with_other_garment"] >= 0.35
    assert seg["swap"]["garment_iou_with_true_region"] <= 0.2
    assert seg["noun_only"]["mean"] <= 0.15


@weights_needed
def test_region_fusion_changes_the_picture_by_the_measured_amount(quick_run):
    gen = quick_run["generation"]
    assert all(row["n"] == 16 for row in gen.values())
    assert gen["no adapter"]["change"] == 0.0
    for name, measured in MEASURED_CHANGE.items():
        assert abs(gen[name]["change"] - measured) <= 0.004, (name, gen[name]["change"])
    for name, measured in MEASURED_COLOUR_ERR.items():
        assert abs(colour_err(gen[name]) - measured) <= 0.06, (name, colour_err(gen[name]))


def test_the_generation_judge_scores_true_renders_high_and_other_characters_low():
    """The metric itself, on renders with known answers: the reference's character drawn in the
    prompt's layout scores ~1, another character ~chance."""
    from toyworld.evaluate import gen_prompts, judge, summarise

    same, other = [], []
    refs = data.held_out(12)
    for i, s in enumerate(refs):
        rng = np.random.default_rng(i)
        for _, bg, pos, size in gen_prompts(s, rng, 3):
            img, _ = data.render(s.character, data.layout_for(rng, bg, pos, size), rng)
            same.append(judge(img, s, bg, pos))
            other.append(judge(img, refs[(i + 1) % len(refs)], bg, pos))
    same, other = summarise(same), summarise(other)
    assert same["regions_ok"] >= 0.9 and same["background"] == 1.0 and same["position"] == 1.0
    assert same["bleed"] <= 0.05
    assert other["regions_ok"] <= 0.5


@weights_needed
def test_a_smaller_reference_pass_loses_what_its_grid_explains():
    """toyworld.pass_size (README "Reference pass"): at about half of the toy's native area (24 px)
    the masks lose about what ideal maps on the same grid lose (48 references, T 150: -0.108 vs
    -0.087), at a quarter (16 px) more than that (-0.317 vs -0.219), so a pass may shrink as far
    as its grid allows and no further. These 8 references: 24 px -0.128 vs -0.080, 16 px -0.361
    vs -0.195."""
    from toyworld import pass_size
    from toyworld.evaluate import MAP_LEVELS, TextWorld
    from toyworld.model import WEIGHTS, load_sd

    world = TextWorld(load_sd(WEIGHTS), MAP_LEVELS)
    samples = data.held_out(8)
    native, _ = pass_size.per_reference(world, samples, data.SIZE, 150)
    grid_native = pass_size.oracle(samples, data.SIZE).mean()
    drops = {}
    for side in (24, 16):
        small, _ = pass_size.per_reference(world, samples, side, 150)
        drops[side] = (small.mean() - native.mean(), pass_size.oracle(samples, side).mean() - grid_native)
    drop, grid_drop = drops[24]
    assert drop < -0.05 and grid_drop < -0.05
    assert abs(drop - grid_drop) < 0.1, drops
    drop, grid_drop = drops[16]
    assert grid_drop < -0.1 and drop <= grid_drop + 0.02, drops


PHRASE_QUICK = dict(refs=6, timesteps=(100,), conditions=("prompt", "phrase", "none"), threads=1)


@weights_needed
def test_a_prompt_naming_no_region_locates_the_regions_from_their_phrases():
    """Issue 14 on the committed weights (README "Toy world"): with a prompt that names no region,
    the layout from the phrases alone is as good as with the phrases in the prompt, and far
    better than the even split it had before. Measured on 48 references: -0.009 (-0.036, +0.020)
    vs prompt at t=100, +0.011 over all t; these 6 references at t=100 gave prompt 0.670, from the
    phrase 0.697, none 0.017."""
    from toyworld.phrase_layout import run

    result = run(**PHRASE_QUICK)["hard"]
    prompt, phrase, none = (result[c]["100"]["mean"] for c in ("prompt", "phrase", "none"))
    assert prompt > 0.45 and phrase > prompt - 0.05 and none < 0.05


# Teacher-forced, reduced (issue 12, README "Toy world"): 3 references x 1 target x 1 noise seed x
# t 300 / 500 / 700, the jacket changed for the bleed. Pinned at noise seed 0 on the committed
# weights; each tolerance is 3 x the standard deviation of the value over noise seeds 0..4
# (figure gain: mean over face / jacket / trousers; layout: IoU of the fused layout's argmax).
TEACHER_QUICK = dict(refs=3, targets=1, seeds=1, timesteps=(300, 500, 700), confusion=("jacket",), resamples=50,
                     names=("no adapter", "IP-Adapter (global)", "CA soft t0.1", "CA soft, true masks",
                            "CA soft, layout from the prompt's nouns"))
MEASURED_TF_FIGURE = {"IP-Adapter (global)": (0.1886, 0.163), "CA soft t0.1": (0.1473, 0.119),
                      "CA soft, true masks": (0.1516, 0.141), "CA soft, layout from the prompt's nouns": (0.1028, 0.067)}
MEASURED_TF_LAYOUT = {"CA soft t0.1": (0.634, 0.130), "CA soft, layout from the prompt's nouns": (0.082, 0.026)}
MEASURED_TF_BLEED = {"IP-Adapter (global)": (0.0637, 0.070), "CA soft t0.1": (-0.0008, 0.059),
                     "CA soft, true masks": (0.0019, 0.076)}


@pytest.fixture(scope="module")
def teacher_run():
    from toyworld.teacher import evaluate
    from toyworld.world import World

    return evaluate(World(), log=lambda *a: None, **TEACHER_QUICK)


@weights_needed
def test_teacher_forced_fidelity_layout_and_bleed_stay_where_measured(teacher_run):
    """Region fusion, teacher-forced: the plain adapter lowers the figure's error (every seed 0..4:
    +8.1 to +20.9 %); soft fusion with the layout from the reference phrases lowers it more than with
    the layout from the prompt's bare nouns (every seed: by +3.3 to +13.6 points); its layout finds
    the regions where the nouns do not (0.58..0.70 vs 0.06..0.08); and a reference wrong in the
    jacket raises the jacket's error (the region term reaches its region; at seed 0). A fusion that
    adds nothing, or adds it in the wrong places, fails these. Not pinned: soft against the plain
    adapter (the full evaluation: -0.4 points, -1.4 .. +0.6) and soft below the true masks (the full
    evaluation: +1.5, +0.9 .. +2.1, but one seed of five has it the other way on 3 references)."""
    fidelity = teacher_run["fidelity"]
    for name, (measured, tolerance) in MEASURED_TF_FIGURE.items():
        assert abs(fidelity[name]["figure"] - measured) <= tolerance, (name, fidelity[name]["figure"])
    assert fidelity["IP-Adapter (global)"]["figure"] > 0.03
    assert fidelity["CA soft, layout from the prompt's nouns"]["figure"] < fidelity["CA soft t0.1"]["figure"]
    layout = {name: float(np.mean(v[:3])) for name, v in teacher_run["layout_iou"].items()}
    for name, (measured, tolerance) in MEASURED_TF_LAYOUT.items():
        assert abs(layout[name] - measured) <= tolerance, (name, layout[name])
    assert layout["CA soft t0.1"] >= layout["CA soft, layout from the prompt's nouns"] + 0.25
    bleed = teacher_run["bleed"]
    for name, (measured, tolerance) in MEASURED_TF_BLEED.items():
        assert abs(bleed[name]["jacket"]["bleed"] - measured) <= tolerance, (name, bleed[name]["jacket"])
    assert bleed["CA soft t0.1"]["jacket"]["own"] > 0.005


# Two characters (issue 12 item 5): two pairs, one target, one seed, t 300 / 500 / 700. B's own rise
# under per-character soft fusion (the runtime's layout) over noise seeds 0..4: 0.092 / 0.071 / 0.067 /
# 0.079 / 0.068 (sd 0.010), pinned at seed 0 with 3 sd; under the true masks 0.22 / 0.07 / 0.22 / 0.12 /
# 0.10, above 0 at every seed (one pair alone gave both signs).
TWO_QUICK = dict(pairs=2, targets=1, seeds=1, resamples=20)
MEASURED_TWO_B_OWN_SOFT = (0.0915, 0.031)


@weights_needed
def test_two_characters_runs_on_two_pairs_with_finite_numbers():
    """The two-character evaluation runs through FusionSession with two characters and returns every
    setting's gains, cross-bleed and B's own rise with intervals; B's reference reaches B (its own
    rise under soft fusion stays where measured, and is above 0 under the true masks too): a second
    character whose tokens went nowhere fails this."""
    import math

    from toyworld.two_characters import SETTINGS, evaluate, table
    from toyworld.world import World

    result = evaluate(World(), log=lambda *a: None, **TWO_QUICK)
    assert set(result["settings"]) == {s.name for s in SETTINGS if s.adapter != "none"}
    for name, cells in result["settings"].items():
        assert set(cells) == {"gain_a", "gain_b", "bleed", "b_own"}
        for key, cell in cells.items():
            assert all(math.isfinite(cell[k]) for k in ("value", "lo", "hi")), (name, key, cell)
            assert cell["lo"] <= cell["hi"]
    assert len(result["paired"]) == 3
    assert all(0.0 <= v <= 1.0 for v in result["figure_accuracy"]["per-character CA soft"])
    assert len(result["layout_iou"]["per-character CA soft"]) == 7  # A's three, B's three, background
    measured, tolerance = MEASURED_TWO_B_OWN_SOFT
    own = result["settings"]["per-character CA soft"]["b_own"]["value"]
    assert own > 0 and abs(own - measured) <= tolerance, own
    assert result["settings"]["per-character CA soft, true masks"]["b_own"]["value"] > 0
    assert "cross-bleed into A" in table(result)
