"""Teacher-forced evaluation of region fusion: `python -m toyworld.evaluate --teacher-forced`.

A likelihood-style measurement that needs no good sampler. For held-out characters, targets are
drawn of the SAME character at another position, size and background (true region masks known),
noised at timesteps over the schedule with several noise seeds; each setting runs the UNet on the
noisy targets through the extension's own objects (segment_reference, strip crops, RegionEncoder,
FusionSession driven with RowPlans), and the epsilon-prediction error is measured on each true
region (face, jacket, trousers, background).

The layout. In sampling, step i fuses with the layout folded from step i-1's text maps. Here the
"previous step" is a maps call on the SAME noisy input with the same session (step 0: the
even-split prior, the adapter term applied, maps gathered), then the measured call (step 1) uses
the layout folded from it: the layout of a sampler with many small steps, where x_{t+dt} ~ x_t, and
the one the session really computes (nothing is injected). The diagnostic `layout_dt` takes the
maps call at t + dt instead (a lagging layout).

- Fidelity: per region, 1 - error / the no-adapter error (mean over timesteps of the per-timestep
  ratio of mean errors), with 95 % intervals from a paired two-stage bootstrap (references with
  replacement, then each reference's target x seed units).
- Concept confusion, causally: the reference re-drawn with exactly one region changed (another skin
  tone or garment colour); bleed = the rise in the OTHER figure regions' error it causes, as a
  fraction of their no-adapter error; "own" = the rise in the changed region (that the adapter
  transfers the region at all). Each region is changed in turn.

Scenes are lists of figures (toyworld.data.render_scene) and settings are a table, so a
two-figure scene with per-character settings can be added without changing the measurement.
"""

import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from charadapter.fusion import FusionConfig, FusionSession, RowPlan
from charadapter.masks import uniform_masks
from charadapter.segmentation import region_crops

from . import data
from .world import MAP_LEVELS, World, iou

TIMESTEPS = (100, 300, 500, 700, 900)
FIGURE_REGIONS = data.REGIONS
REGION_NAMES = FIGURE_REGIONS + ("background",)  # error columns, background last
SEG_T = 150  # the reference segmentation timestep of the toy (README "Toy world")
NOUNS = tuple(data.REGIONS)  # the region nouns of the prompt, which names no colour


# --------------------------------------------------------------------------- scenes


@dataclass
class Scene:
    """A target: figures on one background, their true masks, and the prompts that describe it."""

    image: np.ndarray  # (H, W, 3) uint8
    masks: np.ndarray  # (F, 3, H, W) bool, figure by figure in REGIONS order
    figures: Tuple[Tuple[data.Character, data.Layout], ...]
    prompt: str  # names no colour: identity must come from the reference
    colour_prompt: str  # names every region's colour (the text baseline and the grounded-layout diagnostic)
    phrases: Tuple[str, ...]  # the region phrases of `prompt`, in region order
    colour_phrases: Tuple[str, ...]

    def region_masks(self) -> np.ndarray:
        """(F*3 + 1, H, W) bool: every figure's regions, then the background."""
        figures = self.masks.reshape(-1, *self.masks.shape[2:])  # (F*3, H, W)
        return np.concatenate([figures, ~figures.any(axis=0, keepdims=True)])

    def layout(self) -> torch.Tensor:
        """The true masks as a fusion layout (R+1, N): background channel first, one-hot."""
        masks = self.region_masks()
        ordered = np.concatenate([masks[-1:], masks[:-1]]).astype(np.float32)  # background first
        return torch.from_numpy(ordered.reshape(ordered.shape[0], -1))  # (R+1, N)


def one_figure_scene(character: data.Character, layout: data.Layout, rng: np.random.Generator) -> Scene:
    """One character in `layout`; the prompts ask for its background, position and size."""
    image, masks = data.render_scene([(character, layout)], layout.background, rng)
    colours = tuple(data.region_phrase(character, r) for r in data.REGIONS)
    return Scene(image, masks, ((character, layout),),
                 data.prompt(list(NOUNS), layout.background, layout.size, layout.position),
                 data.prompt(list(colours), layout.background, layout.size, layout.position),
                 NOUNS, colours)


@dataclass
class Reference:
    """A reference picture of one character (standing) and the seed of its colour jitter."""

    character: data.Character
    layout: data.Layout
    seed: int
    image: np.ndarray = field(init=False)

    def __post_init__(self):
        self.image, _ = data.render(self.character, self.layout, np.random.default_rng(self.seed))

    def changed(self, region: str) -> "Reference":
        """The same picture (layout, jitter) of a character that differs in `region` alone."""
        other = data.with_other(self.character, region, np.random.default_rng([self.seed, data.REGIONS.index(region)]))
        return Reference(other, self.layout, self.seed)

    def phrases(self) -> List[str]:
        """The reference phrases: the user describes the reference by its colours."""
        return [data.region_phrase(self.character, r) for r in data.REGIONS]


def references(count: int, offset: int = 0) -> List[Reference]:
    """Held-out characters and reference layouts (toyworld.data.held_out), jitter seeded per index."""
    return [Reference(s.character, s.layout, 900_000 + offset + i) for i, s in enumerate(data.held_out(count, offset))]


def targets_for(reference: Reference, count: int) -> List[Scene]:
    """`count` scenes of the reference's character at other layouts (another background each)."""
    rng = np.random.default_rng([reference.seed, 99])
    return [one_figure_scene(reference.character, data.other_layout(rng, reference.layout), rng) for _ in range(count)]


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Setting:
    """One row of the table: how the UNet call is conditioned and where the layout comes from."""

    name: str
    adapter: str  # "none" | "global" (plain IP-Adapter) | "regions" (Character-Adapter)
    mode: str = "soft"
    temperature: float = 0.1
    background: float = 0.4
    layout: str = "dynamic"  # "dynamic" (the image's own maps) | "prior" (even split, frozen) | "true" (target masks)
    colour_prompt: bool = False  # the measured call's prompt names the colours (a text-only baseline)
    # where the layout's maps come from: "reference" = the generation phrases are the reference phrases
    # (the runtime's default), located from their own tokens since the prompt lacks them (phrase
    # bank); "nouns" = the prompt's bare nouns; "colours" = the maps call's prompt names the target's
    # colours (a diagnostic: no user prompt does that here)
    layout_phrases: str = "reference"
    layout_dt: int = 0  # the maps call sees the target noised at t + layout_dt (same noise)
    map_levels: Tuple[int, ...] = MAP_LEVELS
    weight: float = 1.0

    @property
    def two_calls(self) -> bool:
        return self.adapter == "regions" and self.layout == "dynamic"


BASELINE = "no adapter"
PLAIN = "IP-Adapter (global)"
SETTINGS = (
    Setting(BASELINE, "none"),
    Setting("no adapter, colours in prompt", "none", colour_prompt=True),
    Setting(PLAIN, "global"),
    Setting("CA hard", "regions", mode="hard"),
    Setting("CA soft t0.03", "regions", temperature=0.03),
    Setting("CA soft t0.1", "regions"),
    Setting("CA soft t0.3", "regions", temperature=0.3),
    Setting("CA soft, prior frozen", "regions", layout="prior"),
    Setting("CA soft, true masks", "regions", layout="true"),
)
DIAGNOSTICS = (  # item 7: why soft does (not) win
    Setting("CA soft, layout from the prompt's nouns", "regions", layout_phrases="nouns"),
    Setting("CA hard, layout from the prompt's nouns", "regions", mode="hard", layout_phrases="nouns"),
    Setting("CA soft, layout from a colour prompt", "regions", layout_phrases="colours"),
    Setting("CA soft bg0.2", "regions", background=0.2),
    Setting("CA soft bg0.6", "regions", background=0.6),
    Setting("CA soft t1.0", "regions", temperature=1.0),
    Setting("CA soft, map levels 1+2", "regions", map_levels=(1, 2)),
    Setting("CA soft, layout from t+200", "regions", layout_dt=200),
)
SOFT = "CA soft t0.1"  # the extension's defaults (tau 0.1, background 0.4)
QUICK = (BASELINE, PLAIN, "CA hard", "CA soft t0.1", "CA soft, prior frozen", "CA soft, true masks")


def setting_table(names: Optional[Sequence[str]] = None, diagnostics: bool = False) -> List[Setting]:
    """The settings by name (None: all of SETTINGS, plus DIAGNOSTICS when asked); baseline first."""
    pool = list(SETTINGS) + list(DIAGNOSTICS)
    chosen = [s for s in pool if s.name in names] if names else list(SETTINGS) + (list(DIAGNOSTICS) if diagnostics else [])
    if not chosen or chosen[0].name != BASELINE:
        raise ValueError(f"the settings must start with {BASELINE!r}: the gains are measured from it")
    return chosen


# --------------------------------------------------------------------------- one reference's batch


@dataclass
class Batch:
    """Every (scene, seed, timestep) of one reference as the rows of one UNet call."""

    x0: torch.Tensor  # (B, 3, H, W) in [-1, 1]
    noise: torch.Tensor  # (B, 3, H, W)
    t: torch.Tensor  # (B,) long
    masks: np.ndarray  # (B, R+1, H, W) bool: figure regions, then background
    layouts: torch.Tensor  # (B, R+1, N): the true masks, background first
    prompts: List[str]
    colour_prompts: List[str]
    phrases: Tuple[str, ...]
    colour_phrases: Tuple[str, ...]
    unit: np.ndarray  # (B,) index of the (scene, seed) unit a row belongs to: the bootstrap's inner level
    step: np.ndarray  # (B,) index into the timesteps

    def noised(self, model, dt: int = 0) -> torch.Tensor:
        """x_t (or x_{t+dt}, same noise) of every row."""
        return model.q_sample(self.x0, (self.t + dt).clamp(max=model.num_timesteps - 1), self.noise)


def make_batch(scenes: Sequence[Scene], seeds: Sequence[int], timesteps: Sequence[int]) -> Batch:
    rows = [(i, j, k) for i in range(len(scenes)) for j in range(len(seeds)) for k in range(len(timesteps))]
    x0 = torch.from_numpy(data.to_x0([scenes[i].image for i, _, _ in rows]))  # (B, 3, H, W)
    noise = torch.cat([torch.randn((1,) + tuple(x0.shape[1:]), generator=torch.Generator().manual_seed(int(seeds[j])))
                       for _, j, _ in rows])  # (B, 3, H, W): one noise per seed, shared over timesteps
    phrases = {s.phrases for s in scenes}
    colour_phrases = {s.colour_phrases for s in scenes}
    if len(phrases) != 1 or len(colour_phrases) != 1:
        raise ValueError("one batch holds scenes of one character (one set of phrases)")
    return Batch(
        x0=x0, noise=noise, t=torch.tensor([int(timesteps[k]) for _, _, k in rows]),
        masks=np.stack([scenes[i].region_masks() for i, _, _ in rows]),
        layouts=torch.stack([scenes[i].layout() for i, _, _ in rows]),
        prompts=[scenes[i].prompt for i, _, _ in rows], colour_prompts=[scenes[i].colour_prompt for i, _, _ in rows],
        phrases=phrases.pop(), colour_phrases=colour_phrases.pop(),
        unit=np.array([i * len(seeds) + j for i, j, _ in rows]), step=np.array([k for _, _, k in rows]))


def region_errors(eps: torch.Tensor, batch: Batch) -> np.ndarray:
    """(B, R+1) mean squared epsilon error on each true region of each row (NaN where empty)."""
    se = ((eps.float() - batch.noise) ** 2).mean(dim=1).numpy()  # (B, H, W)
    masks = batch.masks
    counts = masks.sum(axis=(2, 3))  # (B, R+1)
    sums = (se[:, None] * masks).sum(axis=(2, 3))  # (B, R+1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


# --------------------------------------------------------------------------- running a setting


@dataclass
class Tokens:
    """A reference's tokens as the runtime's reference pass gives them."""

    whole: object  # RegionTokens of the whole picture (R = 1)
    regions: object  # RegionTokens of the strip crops (R = 3)
    seg_masks: np.ndarray  # (3, H, W) the reference masks segmentation found
    phrases: Tuple[str, ...]  # the reference phrases, also the generation phrases (the runtime's default)


def encode_reference(world: World, reference: Reference, seg_t: int = SEG_T) -> Tokens:
    """Segmentation with the reference phrases, strip crops, RegionEncoder: the runtime's path."""
    image = data.to_pil(reference.image)
    seg = world.segment(reference.image, reference.phrases(), seg_t)
    crops = region_crops(image, seg.boxes(image.size, "strip"))
    return Tokens(world.encoder.encode([image]), world.encoder.encode(crops), np.asarray(seg.masks),
                  tuple(reference.phrases()))


@torch.no_grad()
def run_setting(world: World, setting: Setting, tokens: Optional[Tokens], batch: Batch,
                cache: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(eps (B, 3, H, W) of the measured call, the layout it fused with (B, R+1, N) or None)."""
    model = world.model
    x = batch.noised(model)
    t = batch.t.float()
    n = x.shape[0]

    def cond(colours: bool) -> torch.Tensor:
        key = "colours" if colours else "prompt"
        if key not in cache:
            cache[key] = world.cond(batch.colour_prompts if colours else batch.prompts)
        return cache[key]

    if setting.adapter == "none":
        return model.apply_model(x, t, cond(setting.colour_prompt)), None
    regions = () if setting.adapter == "global" else (1.0,) * len(data.REGIONS)
    config = FusionConfig(weight=setting.weight, region_weights=regions, mode=setting.mode,
                          temperature=setting.temperature, background=setting.background,
                          map_levels=setting.map_levels)
    chosen = tokens.whole if setting.adapter == "global" else tokens.regions
    measured = cond(setting.colour_prompt)

    bank = None
    if setting.adapter == "global":
        groups = None
    elif setting.layout_phrases == "reference":
        groups, bank = world.located(batch.prompts[0], tokens.phrases)
    elif setting.layout_phrases == "nouns":
        groups = world.groups(batch.prompts[0], batch.phrases)
    else:
        groups = world.groups(batch.colour_prompts[0], batch.colour_phrases)

    def plan() -> RowPlan:
        return RowPlan(is_cond=(True,) * n, image=tuple(range(n)), token_groups=(groups,) * n)

    with FusionSession(world.unet, world.layers, world.ip, chosen.cond, chosen.negative, config,
                       phrase_bank=None if bank is None else bank.embeddings) as fusion:
        fusion.begin_pass(tuple(x.shape[-2:]), 2)
        if setting.adapter == "regions" and setting.layout != "dynamic":
            layout = batch.layouts if setting.layout == "true" else uniform_masks(n, len(regions), x.shape[-2] * x.shape[-1])
            fusion.fix_layout(layout)
        if setting.two_calls:  # the "previous step": maps of the noisy target under the prior
            colours = setting.layout_phrases == "colours"
            fusion.begin_step(0, plan())
            t_maps = (batch.t + setting.layout_dt).clamp(max=model.num_timesteps - 1)
            model.apply_model(batch.noised(model, setting.layout_dt), t_maps.float(), cond(colours))
        fusion.begin_step(1 if setting.two_calls else 0, plan())
        eps = model.apply_model(x, t, measured)
        layout = fusion.masks if setting.adapter == "regions" else None
    return eps, layout


def layout_iou(layout: torch.Tensor, batch: Batch) -> np.ndarray:
    """(B, R+1) IoU of the layout's argmax (background first in the layout) with the true regions."""
    h, w = batch.masks.shape[-2:]
    winner = layout.argmax(dim=1).reshape(-1, h, w).numpy()  # (B, H, W): 0 background, r+1 region r
    out = np.zeros(batch.masks.shape[:2])
    for b in range(winner.shape[0]):
        for r in range(batch.masks.shape[1]):
            label = 0 if r == batch.masks.shape[1] - 1 else r + 1
            out[b, r] = iou(winner[b] == label, batch.masks[b, r])
    return out


# --------------------------------------------------------------------------- statistics


def gain(errors: np.ndarray, base: np.ndarray, step: np.ndarray) -> np.ndarray:
    """1 - mean error / mean baseline error per timestep, then the mean over timesteps: (..., R+1)
    from rows (N, R+1)."""
    steps = np.unique(step)
    return np.mean([1.0 - np.nanmean(errors[step == k], axis=0) / np.nanmean(base[step == k], axis=0)
                    for k in steps], axis=0)


def rise(errors: np.ndarray, right: np.ndarray, base: np.ndarray, step: np.ndarray) -> np.ndarray:
    """(mean error - mean error with the right reference) / mean baseline error, per timestep, then
    the mean over timesteps: (R+1,)."""
    steps = np.unique(step)
    return np.mean([(np.nanmean(errors[step == k], axis=0) - np.nanmean(right[step == k], axis=0))
                    / np.nanmean(base[step == k], axis=0) for k in steps], axis=0)


def bootstrap_rows(refs: int, units: np.ndarray, rng: np.random.Generator) -> List[np.ndarray]:
    """Row indices of one two-stage resample: references with replacement, then within each chosen
    reference its (scene, seed) units with replacement. `units` (refs, B) are the rows' unit ids."""
    picks = []
    for r in rng.integers(refs, size=refs):
        ids = np.unique(units[r])
        for u in rng.choice(ids, size=len(ids)):
            picks.append((r, np.flatnonzero(units[r] == u)))
    return picks


def interval(statistic, refs: int, units: np.ndarray, resamples: int, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """95 % percentile interval of statistic(picks) over two-stage bootstrap resamples."""
    rng = np.random.default_rng(seed)
    values = np.stack([statistic(bootstrap_rows(refs, units, rng)) for _ in range(resamples)])
    return np.nanpercentile(values, 2.5, axis=0), np.nanpercentile(values, 97.5, axis=0)


def gather(arrays: np.ndarray, picks: List[Tuple[int, np.ndarray]]) -> np.ndarray:
    """Rows of (refs, B, ...) arrays at the picks, stacked: (N, ...)."""
    return np.concatenate([arrays[r][rows] for r, rows in picks])


# --------------------------------------------------------------------------- the evaluation


def evaluate(world: World, refs: int = 24, targets: int = 2, seeds: int = 2, timesteps: Sequence[int] = TIMESTEPS,
             names: Optional[Sequence[str]] = None, diagnostics: bool = False,
             confusion: Sequence[str] = FIGURE_REGIONS, resamples: int = 1000, noise_seed: int = 0, log=print) -> Dict:
    """Errors of every setting on every reference's batch, then gains, bleed and their intervals;
    `confusion`: the regions changed in turn for the bleed measurement (() = none); `noise_seed`
    shifts every noise seed (the spread of a reduced run, for CI's tolerances)."""
    start = time.time()
    chosen = setting_table(names, diagnostics)
    confusion_settings = [s for s in chosen if s.adapter != "none" and s in SETTINGS]
    all_refs = references(refs)
    errors: Dict[str, List[np.ndarray]] = {s.name: [] for s in chosen}  # name -> per ref (B, R+1)
    layout_ious: Dict[str, List[np.ndarray]] = {s.name: [] for s in chosen if s.two_calls}  # dynamic layouts
    changed: Dict[Tuple[str, str], List[np.ndarray]] = {(s.name, r): [] for s in confusion_settings
                                                       for r in confusion}
    seg_iou = []
    batch = None
    for index, reference in enumerate(all_refs):
        batch = make_batch(targets_for(reference, targets), [noise_seed + 1000 * index + j for j in range(seeds)], timesteps)
        tokens = encode_reference(world, reference)
        seg_iou.append([iou(tokens.seg_masks[r], m) for r, m in
                        enumerate(data.render(reference.character, reference.layout)[1])])
        cache: Dict[str, torch.Tensor] = {}
        for setting in chosen:
            eps, layout = run_setting(world, setting, tokens, batch, cache)
            errors[setting.name].append(region_errors(eps, batch))
            if setting.name in layout_ious:
                layout_ious[setting.name].append(layout_iou(layout, batch))
        for region in confusion:
            wrong = encode_reference(world, reference.changed(region))
            for setting in confusion_settings:
                eps, _ = run_setting(world, setting, wrong, batch, cache)
                changed[(setting.name, region)].append(region_errors(eps, batch))
        log(f"reference {index + 1}/{refs} done ({time.time() - start:.0f} s)")
    if batch is None:
        raise ValueError("no references to evaluate")
    return summarise(chosen, errors, layout_ious, changed, make_units(batch, len(all_refs)), batch.step,
                     resamples, seg_iou,
                     config=dict(refs=refs, targets=targets, seeds=seeds, timesteps=list(timesteps),
                                 seg_t=SEG_T, map_levels=list(MAP_LEVELS), resamples=resamples, noise_seed=noise_seed,
                                 confusion=list(confusion)),
                     seconds=time.time() - start)


def make_units(batch: Batch, refs: int) -> np.ndarray:
    """(refs, B) unit ids: every reference's batch has the same row structure."""
    return np.tile(batch.unit, (refs, 1))


def summarise(chosen: Sequence[Setting], errors, layout_ious, changed, units: np.ndarray, step: np.ndarray,
              resamples: int, seg_iou, config: Dict, seconds: float) -> Dict:
    refs = units.shape[0]
    err = {k: np.stack(v) for k, v in errors.items()}  # (refs, B, R+1)
    base = err[BASELINE]
    steps = np.tile(step, (refs, 1))  # (refs, B)

    def stat_gain(name):
        def f(picks):  # per-region gains, then the figure's (the mean of its regions'), resampled together
            g = gain(gather(err[name], picks), gather(base, picks), gather(steps, picks))
            return np.append(g, g[:3].mean())
        return f

    out: Dict = {"config": config, "regions": list(REGION_NAMES), "fidelity": {}, "error": {},
                 "reference_seg_iou": [round(float(v), 3) for v in np.mean(seg_iou, axis=0)]}
    everything = [(r, np.arange(units.shape[1])) for r in range(refs)]
    for s in chosen:
        out["error"][s.name] = rounded(np.nanmean(err[s.name], axis=(0, 1)), 5)
        if s.name == BASELINE:
            continue
        point = stat_gain(s.name)(everything)
        lo, hi = interval(stat_gain(s.name), refs, units, resamples)
        out["fidelity"][s.name] = {"gain": rounded(point[:-1]), "lo": rounded(lo[:-1]), "hi": rounded(hi[:-1]),
                                   "figure": round(float(point[-1]), 4),
                                   "figure_lo": round(float(lo[-1]), 4), "figure_hi": round(float(hi[-1]), 4)}
    # per-timestep gains of the figure, to see where the adapter helps
    out["figure_gain_by_t"] = {
        s.name: [round(float(np.mean(1 - np.nanmean(err[s.name][steps == k], axis=0)[:3]
                                     / np.nanmean(base[steps == k], axis=0)[:3])), 4) for k in np.unique(step)]
        for s in chosen if s.name != BASELINE}
    # soft vs plain and hard, paired: differences of gains within each resample
    out["paired"] = {}
    names = [s.name for s in chosen]
    pairs = [(a, b) for a in names for b in (PLAIN, "CA hard") if a.startswith("CA soft") and b in names and a != b]
    pairs += [(a, b) for a, b in ((SOFT, "CA soft, prior frozen"), ("CA soft, true masks", SOFT))  # H4
              if a in names and b in names]
    pairs += [(s.name, SOFT) for s in chosen if s in DIAGNOSTICS and s.name.startswith("CA soft") and SOFT in names]
    for a, b in pairs:
        def diff(picks, a=a, b=b):
            return stat_gain(a)(picks) - stat_gain(b)(picks)
        point = diff(everything)
        lo, hi = interval(diff, refs, units, resamples)
        out["paired"][f"{a} - {b}"] = {"diff": rounded(point[:-1]), "lo": rounded(lo[:-1]), "hi": rounded(hi[:-1]),
                                       "figure": round(float(point[-1]), 4),
                                       "figure_lo": round(float(lo[-1]), 4), "figure_hi": round(float(hi[-1]), 4)}
    out["layout_iou"] = {k: rounded(np.mean(np.stack(v), axis=(0, 1)), 3) for k, v in layout_ious.items() if v}
    out["layout_iou_by_t"] = {k: [rounded(np.stack(v)[steps == i].mean(axis=0), 3) for i in np.unique(step)]
                              for k, v in layout_ious.items() if v}
    def bleed_cell(point, lo, hi):
        return {"bleed": round(float(point[0]), 4), "bleed_lo": round(float(lo[0]), 4),
                "bleed_hi": round(float(hi[0]), 4), "own": round(float(point[1]), 4),
                "own_lo": round(float(lo[1]), 4), "own_hi": round(float(hi[1]), 4)}

    out["bleed"] = {}
    for (name, region), rows in changed.items():
        if not rows:
            continue
        wrong = np.stack(rows)  # (refs, B, R+1)
        r = FIGURE_REGIONS.index(region)
        others = [o for o in range(len(FIGURE_REGIONS)) if o != r]

        def stat(picks, name=name, wrong=wrong):
            v = rise(gather(wrong, picks), gather(err[name], picks), gather(base, picks), gather(steps, picks))
            return np.array([v[others].mean(), v[r], v[-1]])  # bleed, own, background

        point = stat(everything)
        lo, hi = interval(stat, refs, units, resamples)
        cell = {**bleed_cell(point, lo, hi), "background": round(float(point[2]), 4)}
        out["bleed"].setdefault(name, {})[region] = cell

    def stat_all(name):
        """(mean bleed, mean own) over the changed regions, on a resample."""
        rows = {r: np.stack(changed[(name, r)]) for r in FIGURE_REGIONS if r in out["bleed"][name]}

        def f(picks):
            vals = []
            for region, wrong in rows.items():
                r = FIGURE_REGIONS.index(region)
                v = rise(gather(wrong, picks), gather(err[name], picks), gather(base, picks), gather(steps, picks))
                vals.append([np.mean([v[o] for o in range(3) if o != r]), v[r]])
            return np.mean(vals, axis=0)
        return f

    for name, per in out["bleed"].items():  # the mean over the changed regions, with its own interval
        per["mean"] = bleed_cell(stat_all(name)(everything), *interval(stat_all(name), refs, units, resamples))
    # H3 paired: each region setting's mean bleed against the plain adapter's, within each resample
    out["bleed_paired"] = {}
    for name in out["bleed"]:
        if name == PLAIN or PLAIN not in out["bleed"]:
            continue

        def bleed_diff(picks, a=stat_all(name), b=stat_all(PLAIN)):
            return a(picks) - b(picks)

        out["bleed_paired"][f"{name} - {PLAIN}"] = bleed_cell(bleed_diff(everything),
                                                              *interval(bleed_diff, refs, units, resamples))
    out["seconds"] = round(seconds, 1)
    return out


def rounded(values, digits: int = 4) -> List[float]:
    return [round(float(v), digits) for v in np.asarray(values).ravel()]


# --------------------------------------------------------------------------- report


def pct(v: float) -> str:
    return f"{100 * v:+.1f}"


def table(result: Dict) -> str:
    """Markdown tables: fidelity gains with intervals, paired differences, bleed, layout IoU."""
    regions = result["regions"]
    lines = ["Fidelity: error reduction vs no adapter, % (95 % interval); mean over timesteps "
             + ", ".join(map(str, result["config"]["timesteps"])),
             "| setting | " + " | ".join(regions) + " | figure |", "|---|" + "---|" * (len(regions) + 1)]
    for name, v in result["fidelity"].items():
        cells = [f"{pct(g)} ({pct(lo)}, {pct(hi)})" for g, lo, hi in zip(v["gain"], v["lo"], v["hi"])]
        cells.append(f"{pct(v['figure'])} ({pct(v['figure_lo'])}, {pct(v['figure_hi'])})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if result.get("paired"):
        lines += ["", "Paired differences of gains, percentage points (95 % interval)",
                  "| comparison | " + " | ".join(regions) + " | figure |", "|---|" + "---|" * (len(regions) + 1)]
        for name, v in result["paired"].items():
            cells = [f"{pct(g)} ({pct(lo)}, {pct(hi)})" for g, lo, hi in zip(v["diff"], v["lo"], v["hi"])]
            cells.append(f"{pct(v['figure'])} ({pct(v['figure_lo'])}, {pct(v['figure_hi'])})")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Figure gain by timestep, %", "| setting | " + " | ".join(map(str, result["config"]["timesteps"])) + " |",
              "|---|" + "---|" * len(result["config"]["timesteps"])]
    for name, v in result["figure_gain_by_t"].items():
        lines.append(f"| {name} | " + " | ".join(pct(g) for g in v) + " |")
    if result.get("bleed"):
        changed = [r for r in FIGURE_REGIONS if any(r in v for v in result["bleed"].values())]
        lines += ["", "Concept confusion: a reference wrong in one region. Bleed = error rise in the other figure "
                  "regions, own = in the changed region; % of the no-adapter error (95 % interval)",
                  "| setting | " + " | ".join(f"{r} changed: bleed / own" for r in changed) + " | mean bleed | mean own |",
                  "|---|" + "---|" * (len(changed) + 2)]
        for name, per in result["bleed"].items():
            cells = [f"{pct(per[r]['bleed'])} ({pct(per[r]['bleed_lo'])}, {pct(per[r]['bleed_hi'])}) / {pct(per[r]['own'])}"
                     for r in changed]
            m = per["mean"]
            cells += [f"{pct(m['bleed'])} ({pct(m['bleed_lo'])}, {pct(m['bleed_hi'])})",
                      f"{pct(m['own'])} ({pct(m['own_lo'])}, {pct(m['own_hi'])})"]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if result.get("bleed_paired"):
        lines += ["", "Bleed, paired against the plain adapter, percentage points (95 % interval)",
                  "| comparison | mean bleed | mean own |", "|---|---|---|"]
        for name, m in result["bleed_paired"].items():
            lines.append(f"| {name} | {pct(m['bleed'])} ({pct(m['bleed_lo'])}, {pct(m['bleed_hi'])}) | "
                         f"{pct(m['own'])} ({pct(m['own_lo'])}, {pct(m['own_hi'])}) |")
    if result.get("layout_iou"):
        lines += ["", "Layout the measured call fused with: IoU of its argmax with the true regions",
                  "| setting | " + " | ".join(regions) + " |", "|---|" + "---|" * len(regions)]
        for name, v in result["layout_iou"].items():
            lines.append(f"| {name} | " + " | ".join(f"{x:.2f}" for x in v) + " |")
    seg = result["reference_seg_iou"]
    lines.append(f"\nReference segmentation IoU (T={result['config']['seg_t']}): "
                 + " / ".join(f"{v:.2f}" for v in seg))
    return "\n".join(lines)


def compact(result: Dict) -> Dict:
    """The JSON line: fidelity gain per setting and region, bleed per setting, their intervals."""
    return {
        "teacher_forced": True,
        "config": result["config"],
        "regions": result["regions"],
        "fidelity": {k: {"gain": v["gain"], "lo": v["lo"], "hi": v["hi"], "figure": v["figure"],
                         "figure_lo": v["figure_lo"], "figure_hi": v["figure_hi"]}
                     for k, v in result["fidelity"].items()},
        "paired": result.get("paired", {}),
        "bleed": result.get("bleed", {}),
        "bleed_paired": result.get("bleed_paired", {}),
        "layout_iou": result.get("layout_iou", {}),
        "seconds": result["seconds"],
    }


def main(argv=None) -> None:
    import argparse
    import json

    import torch as _torch

    from .model import WEIGHTS

    parser = argparse.ArgumentParser(prog="python -m toyworld.evaluate --teacher-forced",
                                     description="Teacher-forced fidelity and concept confusion of region fusion")
    parser.add_argument("--refs", type=int, default=24, help="held-out reference characters")
    parser.add_argument("--targets", type=int, default=2, help="target scenes per reference (other layouts)")
    parser.add_argument("--seeds", type=int, default=2, help="noise seeds per target")
    parser.add_argument("--timesteps", default=",".join(map(str, TIMESTEPS)))
    parser.add_argument("--settings", help="setting names separated by ';' (names hold commas; default: the "
                                           "table); 'quick' = QUICK")
    parser.add_argument("--diagnostics", action="store_true", help="also the diagnostic settings (item 7)")
    parser.add_argument("--no-confusion", action="store_true", help="skip the one-region-changed references")
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples")
    parser.add_argument("--noise-seed", type=int, default=0, help="shifts every noise seed")
    parser.add_argument("--weights", default=WEIGHTS)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    _torch.set_num_threads(args.threads)
    names = None
    if args.settings:
        names = QUICK if args.settings == "quick" else [n.strip() for n in args.settings.split(";")]
    result = evaluate(World(args.weights), refs=args.refs, targets=args.targets, seeds=args.seeds,
                      timesteps=[int(v) for v in args.timesteps.split(",")], names=names,
                      diagnostics=args.diagnostics, confusion=() if args.no_confusion else FIGURE_REGIONS,
                      resamples=args.resamples, noise_seed=args.noise_seed)
    print(table(result))
    print(f"({result['seconds']} s)")
    print(json.dumps(compact(result), sort_keys=True))
