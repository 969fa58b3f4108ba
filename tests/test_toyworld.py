"""The toy world: the generator's ground truth, the trained files' formats, and a reduced ablation
whose thresholds come from measured numbers (README "Toy world"), so that a regression in
segmentation or fusion turns CI red."""

import os
import sys

import numpy as np
import pytest

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


# Measured on the committed weights with QUICK (README "Toy world"). The trained model is weak
# (its maps do not localise and its samples are not figures), so these pin its present numbers
# rather than prove the method: a change in segmentation (empty, shifted or transposed masks,
# wrong phrase tokens) moves the IoUs out of their band, and fusion that stops adding the region
# term (or adds it nowhere) loses the colour shift towards the reference that it has now.
QUICK = dict(refs=4, prompts_per_ref=4, steps=15, seg_t=150, timesteps=(50, 150), quick=True, seg_refs=16)
MEASURED_IOU = {"50": 0.104, "150": 0.116}  # mean over regions; jacket 0.237 / 0.229
MEASURED_COLOUR_ERR = {"no adapter": 0.686, "IP-Adapter (global)": 0.618, "CA soft t0.1 bg0.4": 0.617,
                       "CA hard": 0.682}  # mean over face/jacket/trousers, RGB distance in 0..1 units


@pytest.fixture(scope="module")
def quick_run():
    from toyworld.evaluate import run

    return run(**QUICK)


def colour_err(row):
    return np.mean([row[f"{r}_err"] for r in data.REGIONS])


@weights_needed
def test_segmentation_numbers_stay_where_they_were_measured(quick_run):
    seg = quick_run["segmentation"]
    for t, measured in MEASURED_IOU.items():
        assert abs(seg["iou"][t]["mean"] - measured) <= 0.05, (t, seg["iou"][t])
        assert seg["iou"][t]["jacket"] >= 0.15
    assert seg["prior"]["mean"] == pytest.approx(0.281, abs=0.01)  # the generator did not change
    assert seg["swap"]["n"] == 15


@weights_needed
def test_region_fusion_moves_colours_towards_the_reference(quick_run):
    gen = quick_run["generation"]
    err = {name: colour_err(row) for name, row in gen.items()}
    for name, measured in MEASURED_COLOUR_ERR.items():
        assert abs(err[name] - measured) <= 0.06, (name, err[name])
    assert err["IP-Adapter (global)"] <= err["no adapter"] - 0.04
    assert err["CA soft t0.1 bg0.4"] <= err["no adapter"] - 0.04
    assert all(row["n"] == 16 for row in gen.values())

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
