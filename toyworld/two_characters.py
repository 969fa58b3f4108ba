"""Cross-character bleed, teacher-forced: `python -m toyworld.evaluate --teacher-forced --two-characters`.

Issue 12 item 5. Targets show two held-out characters A and B side by side on one background (true
masks per figure and region); the prompt names no colour and calls them "figure on the left" /
"figure on the right" (the subject phrases). Each setting runs the UNet on the noisy targets
through the extension's own FusionSession with two characters, as the runtime drives it (the
layout folded from a maps call on the same noisy input, teacher.run_setting's "previous step").

Cross-bleed = the rise of A's error (on A's true regions) when B's reference is replaced by another
character (every region changed, same picture otherwise), in % of A's no-adapter error; "B own" =
the rise on B's regions (that B's reference reaches B at all). Intervals: teacher.py's paired
two-stage bootstrap over reference pairs, then each pair's target x seed units.
"""

import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from charadapter.fusion import CharacterTokens, FusionConfig, FusionSession, RowPlan

from . import data
from .teacher import (
    NOUNS, Batch, Reference, Scene, Tokens, encode_reference, gather, gain, interval, layout_iou, make_batch,
    make_units, references, region_errors, rise,
)
from .world import MAP_LEVELS, World

TIMESTEPS = (300, 500, 700)
SIDES = ("left", "right")
SUBJECTS = tuple(f"figure {data.POSITIONS[s]}" for s in SIDES)  # "figure on the left", "figure on the right"
A, B = (0, 1, 2), (3, 4, 5)  # error columns of figure A's and figure B's regions (background is column 6)


@dataclass(frozen=True)
class TwoSetting:
    """How the two characters condition the UNet call."""

    name: str
    adapter: str  # "none" | "global" (one whole-reference region each) | "regions" (three regions each)
    subject: bool = True  # each character confined by its subject phrase's map
    layout: str = "dynamic"  # "dynamic" (the image's own maps) | "true" (the target's masks, the ceiling)
    alone: bool = False  # A's adapter only (B has none): what B's right reference does to A, by difference


BASELINE = "no adapter"
SETTINGS = (
    TwoSetting(BASELINE, "none"),
    TwoSetting("per-character CA soft", "regions"),
    TwoSetting("per-character CA soft, true masks", "regions", layout="true"),
    TwoSetting("two global adapters, subjects", "global"),
    # no subject maps: character_logits gives each global character an even 1/2 share everywhere,
    # so both references' tokens are added at every position (the unconfined mix)
    TwoSetting("two global adapters, unconfined", "global", subject=False),
    TwoSetting("A's adapter alone, true masks", "regions", layout="true", alone=True),  # a diagnostic
)


def two_figure_scene(a: data.Character, b: data.Character, a_side: str, rng: np.random.Generator) -> Scene:
    """A and B side by side (A on `a_side`), small, standing, on a random background; A is figure 0."""
    background = list(data.BACKGROUNDS)[rng.integers(len(data.BACKGROUNDS))]
    b_side = SIDES[1 - SIDES.index(a_side)]
    la = data.layout_for(rng, background, a_side, "small")
    lb = data.layout_for(rng, background, b_side, "small")
    image, masks = data.render_scene([(a, la), (b, lb)], background, rng)  # masks (2, 3, H, W)
    # the toy encoder reads 30 words: "a figure on the left with a face , jacket and trousers and a
    # figure on the right with a face , jacket and trousers in a cyan room" (29)
    body = "with a face , jacket and trousers"
    text = f"a figure {data.POSITIONS['left']} {body} and a figure {data.POSITIONS['right']} {body} in a {background} room"
    return Scene(image, masks, ((a, la), (b, lb)), text, text, NOUNS, NOUNS)


def changed_everywhere(reference: Reference) -> Reference:
    """The same picture (layout, jitter) of another character: every region changed in turn."""
    character = reference.character
    for index, region in enumerate(data.REGIONS):
        character = data.with_other(character, region, np.random.default_rng([reference.seed, 7, index]))
    return Reference(character, reference.layout, reference.seed)


@torch.no_grad()
def run_two(world: World, setting: TwoSetting, first: Tokens, second: Tokens, a_side: str, batch: Batch,
            cache: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(eps (B, 3, H, W) of the measured call, the layout it fused with (B, P+1, N) or None);
    `first` is A's tokens, `second` B's; A stands on `a_side`."""
    model = world.model
    x = batch.noised(model)
    t = batch.t.float()
    n = x.shape[0]
    if "prompt" not in cache:
        cache["prompt"] = world.cond(batch.prompts)
    cond = cache["prompt"]
    if setting.adapter == "none":
        return model.apply_model(x, t, cond), None
    regions = setting.adapter == "regions"
    if setting.alone:
        return run_alone(world, first, batch, x, t, cond), None
    config = FusionConfig(weight=1.0, region_weights=(1.0,) * len(data.REGIONS) if regions else (),
                          mode="soft", temperature=0.1, background=0.4, map_levels=MAP_LEVELS,
                          subject=setting.subject)
    chosen = [tokens.regions if regions else tokens.whole for tokens in (first, second)]  # each (R, T, C)
    # map columns: every character's region phrases (the reference phrases, as the runtime's default
    # generation phrases), then the subjects; A's subject names A's side
    phrases = (list(first.phrases) + list(second.phrases)) if regions else []
    if setting.subject:
        phrases += [SUBJECTS[SIDES.index(a_side)], SUBJECTS[1 - SIDES.index(a_side)]]
    groups, bank = world.located(batch.prompts[0], phrases) if phrases else ((), None)
    plan = RowPlan(is_cond=(True,) * n, image=tuple(range(n)), token_groups=(groups,) * n)
    other = CharacterTokens(world.ip, chosen[1].cond, chosen[1].negative, config)
    with FusionSession(world.unet, world.layers, world.ip, chosen[0].cond, chosen[0].negative, config,
                       others=(other,), phrase_bank=None if bank is None else bank.embeddings) as fusion:
        fusion.begin_pass(tuple(x.shape[-2:]), 2)
        if setting.layout == "true":
            fusion.fix_layout(batch.layouts)  # (B, 7, N): background, A's regions, B's regions
            fusion.begin_step(0, plan)
        else:  # the "previous step": maps of the noisy target under the prior
            fusion.begin_step(0, plan)
            model.apply_model(x, t, cond)
            fusion.begin_step(1, plan)
        eps = model.apply_model(x, t, cond)
        layout = fusion.masks if regions else None
    return eps, layout


def figure_accuracy(layout: torch.Tensor, batch: Batch) -> np.ndarray:
    """(B, 2) share of figure A's (B's) true pixels where the layout's argmax is one of A's (B's)
    pairs: whether the subject maps tell the two figures apart."""
    h, w = batch.masks.shape[-2:]
    winner = layout.argmax(dim=1).reshape(-1, h, w).numpy()  # (B, H, W): 0 background, 1-3 A, 4-6 B
    out = np.zeros((winner.shape[0], 2))
    for f, (lo, hi) in enumerate(((1, 3), (4, 6))):
        figure = batch.masks[:, list(A if f == 0 else B)].any(axis=1)  # (B, H, W)
        hit = (winner >= lo) & (winner <= hi) & figure
        out[:, f] = hit.sum(axis=(1, 2)) / np.maximum(figure.sum(axis=(1, 2)), 1)
    return out


def run_alone(world: World, first: Tokens, batch: Batch, x: torch.Tensor, t: torch.Tensor,
              cond: torch.Tensor) -> torch.Tensor:
    """eps with A's three region tokens on A's true masks only; B's figure counts as background."""
    config = FusionConfig(weight=1.0, region_weights=(1.0,) * len(data.REGIONS), mode="soft", temperature=0.1,
                          background=0.4, map_levels=MAP_LEVELS)
    true = batch.layouts  # (B, 7, N): background, A's regions, B's regions
    layout = torch.cat([true[:, :1] + true[:, 4:].sum(dim=1, keepdim=True), true[:, 1:4]], dim=1)  # (B, 4, N)
    n = x.shape[0]
    plan = RowPlan(is_cond=(True,) * n, image=tuple(range(n)), token_groups=((),) * n)
    with FusionSession(world.unet, world.layers, world.ip, first.regions.cond, first.regions.negative,
                       config) as fusion:
        fusion.begin_pass(tuple(x.shape[-2:]), 2)
        fusion.fix_layout(layout)
        fusion.begin_step(0, plan)
        return world.model.apply_model(x, t, cond)


def evaluate(world: World, pairs: int = 10, targets: int = 1, seeds: int = 2, timesteps: Sequence[int] = TIMESTEPS,
             settings: Sequence[TwoSetting] = SETTINGS, resamples: int = 1000, noise_seed: int = 0,
             replacement: str = "changed", log=print) -> Dict:
    """Errors of every setting with B's right and B's changed reference, then gains, bleed and intervals;
    `replacement`: B's wrong reference is B's picture with every region changed ("changed") or
    another held-out character's reference ("other", a diagnostic: may share colours with B or A)."""
    start = time.time()
    if settings[0].name != BASELINE:
        raise ValueError(f"the settings must start with {BASELINE!r}: the gains are measured from it")
    chosen = [s for s in settings if s.adapter != "none"]
    if replacement not in ("changed", "other"):
        raise ValueError(f"replacement: 'changed' or 'other', got {replacement!r}")
    refs = references(2 * pairs, offset=50_000)  # A_i = refs[2i], B_i = refs[2i + 1]
    others = references(pairs, offset=70_000) if replacement == "other" else None
    errors: Dict[str, List[np.ndarray]] = {s.name: [] for s in settings}  # per pair (rows, 7)
    wrong: Dict[str, List[np.ndarray]] = {s.name: [] for s in chosen}
    ious: Dict[str, List[np.ndarray]] = {s.name: [] for s in chosen if s.adapter == "regions" and s.layout == "dynamic"}
    figures: Dict[str, List[np.ndarray]] = {name: [] for name in ious}
    batch = None
    for index in range(pairs):
        ref_a, ref_b = refs[2 * index], refs[2 * index + 1]
        a_side = SIDES[index % 2]  # alternate sides: no left/right bias
        rng = np.random.default_rng([ref_a.seed, ref_b.seed, 98])
        scenes = [two_figure_scene(ref_a.character, ref_b.character, a_side, rng) for _ in range(targets)]
        batch = make_batch(scenes, [noise_seed + 1000 * index + j for j in range(seeds)], timesteps)
        tok_a, tok_b = encode_reference(world, ref_a), encode_reference(world, ref_b)
        tok_b_wrong = encode_reference(world, changed_everywhere(ref_b) if others is None else others[index])
        cache: Dict[str, torch.Tensor] = {}
        for setting in settings:
            eps, layout = run_two(world, setting, tok_a, tok_b, a_side, batch, cache)
            errors[setting.name].append(region_errors(eps, batch))
            if setting.name in ious:
                ious[setting.name].append(layout_iou(layout, batch))
                figures[setting.name].append(figure_accuracy(layout, batch))
            if setting.alone:  # B has no adapter: its reference changes nothing
                wrong[setting.name].append(errors[setting.name][-1])
            elif setting.adapter != "none":
                eps, _ = run_two(world, setting, tok_a, tok_b_wrong, a_side, batch, cache)
                wrong[setting.name].append(region_errors(eps, batch))
        log(f"pair {index + 1}/{pairs} done ({time.time() - start:.0f} s)")
    if batch is None:
        raise ValueError("no pairs to evaluate")
    return summarise(settings, errors, wrong, ious, figures, make_units(batch, pairs), batch.step, resamples,
                     config=dict(pairs=pairs, targets=targets, seeds=seeds, timesteps=list(timesteps),
                                 resamples=resamples, noise_seed=noise_seed, map_levels=list(MAP_LEVELS),
                                 replacement=replacement),
                     seconds=time.time() - start)


def summarise(settings, errors, wrong, ious, figures, units: np.ndarray, step: np.ndarray, resamples: int, config: Dict,
              seconds: float) -> Dict:
    pairs = units.shape[0]
    err = {k: np.stack(v) for k, v in errors.items()}  # (pairs, rows, 7)
    bad = {k: np.stack(v) for k, v in wrong.items()}  # (pairs, rows, 7)
    base = err[BASELINE]
    steps = np.tile(step, (pairs, 1))  # (pairs, rows)
    everything = [(r, np.arange(units.shape[1])) for r in range(pairs)]

    def stat(name):
        def f(picks):
            e, b, s = gather(err[name], picks), gather(base, picks), gather(steps, picks)
            g = gain(e, b, s)  # (7,)
            v = rise(gather(bad[name], picks), e, b, s)  # (7,)
            return np.array([g[list(A)].mean(), g[list(B)].mean(), v[list(A)].mean(), v[list(B)].mean()])
        return f

    keys = ("gain_a", "gain_b", "bleed", "b_own")
    out: Dict = {"config": config, "settings": {}}
    for s in settings:
        if s.adapter == "none":
            continue
        point = stat(s.name)(everything)
        lo, hi = interval(stat(s.name), pairs, units, resamples)
        out["settings"][s.name] = {k: {"value": round(float(p), 4), "lo": round(float(l), 4), "hi": round(float(h), 4)}
                                   for k, p, l, h in zip(keys, point, lo, hi)}
    # paired: per-character fusion's bleed minus the unconfined global adapters'
    names = [s.name for s in settings]
    out["paired"] = {}
    for a, b in (("per-character CA soft", "two global adapters, unconfined"),
                 ("per-character CA soft", "two global adapters, subjects"),
                 ("per-character CA soft, true masks", "A's adapter alone, true masks")):
        if a in names and b in names:
            def diff(picks, a=a, b=b):
                return stat(a)(picks) - stat(b)(picks)
            point = diff(everything)
            lo, hi = interval(diff, pairs, units, resamples)
            out["paired"][f"{a} - {b}"] = {k: {"value": round(float(p), 4), "lo": round(float(l), 4),
                                               "hi": round(float(h), 4)} for k, p, l, h in zip(keys, point, lo, hi)}
    out["layout_iou"] = {k: [round(float(v), 3) for v in np.mean(np.stack(v), axis=(0, 1))] for k, v in ious.items()}
    out["figure_accuracy"] = {k: [round(float(v), 3) for v in np.mean(np.stack(v), axis=(0, 1))]
                              for k, v in figures.items()}
    out["seconds"] = round(seconds, 1)
    return out


def pct(cell: Dict) -> str:
    return f"{100 * cell['value']:+.1f} ({100 * cell['lo']:+.1f}, {100 * cell['hi']:+.1f})"


def table(result: Dict) -> str:
    """Markdown: per setting A's gain, B's gain, the cross-bleed into A, B's own rise; % with 95 % intervals."""
    head = "| setting | A gain | B gain | cross-bleed into A | B own |"
    lines = ["Two characters: gains vs no adapter and cross-bleed (B's reference changed), % of the no-adapter "
             "error (95 % interval)", head, "|---|---|---|---|---|"]
    for name, v in result["settings"].items():
        lines.append(f"| {name} | {pct(v['gain_a'])} | {pct(v['gain_b'])} | {pct(v['bleed'])} | {pct(v['b_own'])} |")
    for name, v in result["paired"].items():
        lines.append(f"| {name} (paired) | {pct(v['gain_a'])} | {pct(v['gain_b'])} | {pct(v['bleed'])} | {pct(v['b_own'])} |")
    for name, v in result["layout_iou"].items():
        lines.append(f"\nLayout IoU ({name}; bg, A face/jacket/trousers, B face/jacket/trousers): "
                     + " / ".join(f"{x:.2f}" for x in [v[-1]] + v[:-1]))
    for name, v in result["figure_accuracy"].items():
        lines.append(f"Figure pixels given to their own character's regions ({name}): A {v[0]:.2f}, B {v[1]:.2f}")
    return "\n".join(lines)


def main(argv=None) -> None:
    import argparse
    import json

    from .model import WEIGHTS

    parser = argparse.ArgumentParser(prog="python -m toyworld.evaluate --teacher-forced --two-characters",
                                     description="Teacher-forced cross-character bleed of per-character fusion")
    parser.add_argument("--pairs", type=int, default=48, help="reference pairs (A, B) of held-out characters")
    parser.add_argument("--targets", type=int, default=2, help="two-figure target scenes per pair")
    parser.add_argument("--seeds", type=int, default=2, help="noise seeds per target")
    parser.add_argument("--timesteps", default=",".join(map(str, TIMESTEPS)))
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples")
    parser.add_argument("--noise-seed", type=int, default=0, help="shifts every noise seed")
    parser.add_argument("--replacement", choices=("changed", "other"), default="changed",
                        help="B's wrong reference: every region changed, or another held-out character")
    parser.add_argument("--weights", default=WEIGHTS)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = evaluate(World(args.weights), pairs=args.pairs, targets=args.targets, seeds=args.seeds,
                      timesteps=[int(v) for v in args.timesteps.split(",")], resamples=args.resamples,
                      noise_seed=args.noise_seed, replacement=args.replacement)
    print(table(result))
    print(f"({result['seconds']} s)")
    print(json.dumps({"two_characters": True, **result}, sort_keys=True))
