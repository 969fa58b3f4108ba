"""The toy-world ablation: `python -m toyworld.evaluate` prints a table, then one JSON line.

Everything the extension does runs through its own code on the trained toy models:
segmentation (charadapter.reference.segment_reference + charadapter.segmentation), region crops
(strips padded to squares), region tokens (charadapter.adapter.RegionEncoder on the adapter and
encoder loaded by charadapter.checkpoint / charadapter.clip_vision), and attention dynamic
fusion (charadapter.fusion.FusionSession driven with RowPlans the way the WebUI runtime does),
with an ancestral DDIM sampler (eta 1) and classifier-free guidance standing in for the WebUI's sampler.

Metrics (ground truth from toyworld.data):
- segmentation IoU per region of the reference masks vs the true masks, per timestep T; also
  with noun-only phrases, on references whose jacket and trousers share a colour, and the
  caption-swap control (jacket and trousers colour words exchanged);
- generation, on prompts that ask for another background, position and size than the
  reference's and name no colour: per region, whether the generated region's colour (majority
  of its pixels' nearest palette colour, in the region's band of the generated figure) is the
  reference's, and the mean RGB error; bleed (pixels of one garment's band that take the other
  garment's colour); stripes kept; background and position obtained (text alignment).
"""

import argparse
import json
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from charadapter.fusion import FusionConfig, FusionSession, RowPlan
from charadapter.layers import DEFAULT_MAP_LEVELS
from charadapter.segmentation import region_crops

from . import data, teacher
from .model import WEIGHTS
from .world import MAP_LEVELS, TextWorld, World, iou

SEG_TIMESTEPS = (50, 150, 250, 450, 650, 850)
GEN_PHRASES = ("face", "jacket", "trousers")


@dataclass(frozen=True)
class Setting:
    name: str
    kind: str  # "text" | "text+colours" | "global" | "regions"
    mode: str = "soft"
    temperature: float = 0.1
    background: float = 0.4
    seg_t: Optional[int] = None  # None: the run's segmentation timestep


def settings(seg_t: int) -> List[Setting]:
    return [
        Setting("no adapter", "text"),
        Setting("no adapter, colours in prompt", "text+colours"),
        Setting("IP-Adapter (global)", "global"),
        Setting("CA hard", "regions", mode="hard"),
        Setting("CA soft t0.1 bg0.4", "regions"),
        Setting("CA soft t0.03 bg0.4", "regions", temperature=0.03),
        Setting("CA soft t0.3 bg0.4", "regions", temperature=0.3),
        Setting("CA soft t0.1 bg0.2", "regions", background=0.2),
        Setting("CA soft t0.1 bg0.6", "regions", background=0.6),
        Setting("CA soft, T=650 (paper)", "regions", seg_t=650),
    ]


QUICK = ("no adapter", "IP-Adapter (global)", "CA hard", "CA soft t0.1 bg0.4")


# --------------------------------------------------------------------------- segmentation


def prior_iou(samples: Sequence[data.Sample], n_train: int = 400) -> Dict[str, float]:
    """Baseline: the mean training mask per region, argmax + 0.5 threshold, same for every image."""
    mean = np.mean([data.make_sample(s).masks for s in range(n_train)], axis=0)  # (3, H, W)
    norm = mean / mean.max(axis=(1, 2), keepdims=True)
    best = norm.argmax(axis=0)
    keep = norm.max(axis=0) >= 0.5
    masks = np.stack([(best == r) & keep for r in range(3)])
    return region_means([[iou(masks[r], s.masks[r]) for r in range(3)] for s in samples])


def region_means(rows: Sequence[Sequence[float]]) -> Dict[str, float]:
    arr = np.asarray(rows, dtype=np.float64).reshape(-1, 3)
    out = {r: round(float(arr[:, i].mean()), 3) for i, r in enumerate(data.REGIONS)}
    out["mean"] = round(float(arr.mean()), 3)
    return out


def segmentation_iou(world: TextWorld, samples: Sequence[data.Sample], timestep: int,
                     levels: Optional[Sequence[int]] = None) -> Dict[str, float]:
    """Mean IoU per region of the masks from '<colour> face/jacket/trousers' phrases."""
    rows = []
    for s in samples:
        res = world.segment(s.image, [data.region_phrase(s.character, r) for r in data.REGIONS], timestep,
                            levels=levels)
        rows.append([iou(res.masks[r], s.masks[r]) for r in range(3)])
    return region_means(rows)


def evaluate_segmentation(world: TextWorld, samples: Sequence[data.Sample], timesteps: Sequence[int],
                          control_t: int) -> Dict:
    out: Dict = {"iou": {}}
    for t in timesteps:
        out["iou"][str(t)] = segmentation_iou(world, samples, t)
    # which UNet levels' maps localise (level 1 = 16x16, 2 = 8x8, 3 = 4x4), and the extension's default
    out["iou_by_levels"] = {
        ",".join(map(str, lv)): out["iou"][str(control_t)] if lv == world.map_levels and control_t in timesteps
        else segmentation_iou(world, samples, control_t, lv)
        for lv in ((1,), (2,), (3,), tuple(DEFAULT_MAP_LEVELS))}
    nouns, same, swap_true, swap_other = [], [], [], []
    for s in samples:
        res = world.segment(s.image, list(data.REGIONS), control_t)
        nouns.append([iou(res.masks[r], s.masks[r]) for r in range(3)])
        c = s.character
        if c.jacket == c.trousers:
            res = world.segment(s.image, [data.region_phrase(c, r) for r in data.REGIONS], control_t)
            same.append([iou(res.masks[r], s.masks[r]) for r in range(3)])
        else:
            swapped = data.Character(c.skin, c.trousers, c.jacket, c.striped)
            res = world.segment(s.image, [data.region_phrase(swapped, r) for r in data.REGIONS], control_t)
            # the "jacket" phrase (now with the trousers' colour): where does its mask land?
            swap_true.append([iou(res.masks[1], s.masks[1]), iou(res.masks[2], s.masks[2])])
            swap_other.append([iou(res.masks[1], s.masks[2]), iou(res.masks[2], s.masks[1])])
    out["noun_only"] = region_means(nouns)
    out["same_colour"] = region_means(same) if same else None
    out["same_colour_n"] = len(same)
    out["swap"] = {
        "n": len(swap_true),
        "garment_iou_with_true_region": round(float(np.mean(swap_true)), 3),
        "garment_iou_with_other_garment": round(float(np.mean(swap_other)), 3),
    }
    out["prior"] = prior_iou(samples)
    out["control_t"] = control_t
    return out


# --------------------------------------------------------------------------- generation


def gen_prompts(sample: data.Sample, rng: np.random.Generator, count: int,
                phrases: Sequence[str] = GEN_PHRASES) -> List[Tuple[str, str, str, str]]:
    """(prompt, background, position, size): another background than the reference's, and
    positions / sizes cycling; same token positions for every prompt (one RowPlan)."""
    backgrounds = [b for b in data.BACKGROUNDS if b != sample.layout.background]
    out = []
    for i in range(count):
        bg = backgrounds[(i + int(rng.integers(3))) % len(backgrounds)]
        position = list(data.POSITIONS)[(i + int(rng.integers(3))) % 3]
        size = data.SIZES[i % 2]
        out.append((data.prompt(list(phrases), bg, size, position), bg, position, size))
    return out


@torch.no_grad()
def sample_images(world: World, prompts: Sequence[str], noise: torch.Tensor, steps: int, scale: float,
                  fusion: Optional[FusionSession] = None, groups=None, eta: float = 1.0,
                  seed: int = 0, layouts: Optional[List[Optional[torch.Tensor]]] = None) -> np.ndarray:
    """DDIM with CFG; eta 1 (ancestral, fresh noise from `seed` each step) by default: the toy
    model's deterministic (eta 0) trajectories keep visible noise, its ancestral ones give clean
    figures. The fusion session gets the WebUI's events: pass start, each step's rows; `layouts`
    collects the layout each step fused with (None: the even-split prior)."""
    n = len(prompts)
    cond = torch.cat([world.cond(prompts), world.cond([""] * n)])  # cond rows first, then uncond
    timesteps = np.linspace(world.model.num_timesteps - 1, 0, steps).round().astype(int)
    plan = RowPlan(is_cond=(True,) * n + (False,) * n, image=tuple(range(n)) * 2,
                   token_groups=(groups,) * n + (None,) * n)
    gen = torch.Generator().manual_seed(seed)
    x = noise.clone()
    if fusion is not None:
        fusion.begin_pass(tuple(x.shape[-2:]), steps)
    for i, t in enumerate(timesteps):
        if fusion is not None:
            fusion.begin_step(i, plan)
            if layouts is not None:
                layouts.append(fusion.masks)
        eps = world.model.apply_model(torch.cat([x, x]), torch.full((2 * n,), float(t)), cond)
        e_cond, e_uncond = eps.chunk(2)
        e = e_uncond + scale * (e_cond - e_uncond)
        a_t = float(world.alphas[t])
        a_prev = float(world.alphas[timesteps[i + 1]]) if i + 1 < steps else 1.0
        x0 = ((x - (1 - a_t) ** 0.5 * e) / a_t ** 0.5).clamp(-1, 1)
        sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5 if a_t < 1 else 0.0
        x = a_prev ** 0.5 * x0 + max(0.0, 1 - a_prev - sigma ** 2) ** 0.5 * e
        if sigma > 0:
            x = x + sigma * torch.randn(x.shape, generator=gen)
    return ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


def region_tokens(world: World, sample: data.Sample, setting: Setting, seg_t: int):
    """(tokens (R, T, C), negative (T, C)) the runtime's _reference would give."""
    image = data.to_pil(sample.image)
    if setting.kind == "global":
        tokens = world.encoder.encode([image])
        return tokens, None
    phrases = [data.region_phrase(sample.character, r) for r in data.REGIONS]
    seg = world.segment(sample.image, phrases, setting.seg_t or seg_t)
    crops = region_crops(image, seg.boxes(image.size, "strip"))
    return world.encoder.encode(crops), seg


# palette for judging generated pixels: garment colours with their stripe and zip shades
_LABELS = list(data.SKIN_TONES) + list(data.GARMENT_COLOURS)
_SHADES = (1.0, data.STRIPE_SHADE, 0.35)


def _palette() -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    cols, labels, shades = [], [], []
    for name in _LABELS:
        rgb = np.array(data.SKIN_TONES.get(name) or data.GARMENT_COLOURS[name], dtype=np.float64)
        for k, f in enumerate(_SHADES if name in data.GARMENT_COLOURS else (1.0,)):
            cols.append(rgb * f)
            labels.append(_LABELS.index(name))
            shades.append(k)
    return np.array(cols) / 255.0, np.array(labels), np.array(shades)


PALETTE, PALETTE_LABEL, PALETTE_SHADE = _palette()
BANDS = {"face": (0.04, 0.26), "jacket": (0.36, 0.60), "trousers": (0.72, 0.96)}  # of the figure's height


def judge(image: np.ndarray, sample: data.Sample, background: str, position: str) -> Dict[str, float]:
    """Per-image measurements of a generated figure against the reference character."""
    img = image.astype(np.float64) / 255.0  # (H, W, 3)
    H, W, _ = img.shape
    ring = np.concatenate([img[:2].reshape(-1, 3), img[: H // 2, :2].reshape(-1, 3), img[: H // 2, -2:].reshape(-1, 3)])
    bg = np.median(ring, axis=0)
    names = list(data.BACKGROUNDS)
    bg_pred = names[int(np.argmin([np.linalg.norm(bg - np.array(data.BACKGROUNDS[n]) / 255) for n in names]))]
    figure = np.linalg.norm(img - bg, axis=-1) > 0.15  # pale skin on white is 0.2 away
    out = {"background": float(bg_pred == background)}
    rows = np.flatnonzero(figure.sum(axis=1) >= 2)
    if rows.size < 4:
        out.update({f"{r}_ok": 0.0 for r in data.REGIONS})
        out.update({f"{r}_err": float(np.sqrt(3)) for r in data.REGIONS})
        out.update({"position": 0.0, "found": 0.0})
        return out
    top, bottom = rows[0], rows[-1] + 1
    cols = np.flatnonzero(figure[top:bottom].any(axis=0))
    cx = (cols[0] + cols[-1] + 1) / 2 / W
    out["position"] = float(("left" if cx < 0.4 else "right" if cx > 0.6 else "middle") == position)
    out["found"] = 1.0
    dist = np.linalg.norm(img[:, :, None, :] - PALETTE[None, None], axis=-1)  # (H, W, K)
    nearest = dist.argmin(axis=-1)
    label, shade = PALETTE_LABEL[nearest], PALETTE_SHADE[nearest]
    c = sample.character
    band_pixels = {}
    for region, (a, b) in BANDS.items():
        y0, y1 = top + int(round(a * (bottom - top))), top + max(1, int(round(b * (bottom - top))))
        sel = np.zeros_like(figure)
        sel[y0:y1] = figure[y0:y1]
        band_pixels[region] = sel
        want = _LABELS.index(c.skin if region == "face" else c.jacket if region == "jacket" else c.trousers)
        if not sel.any():
            out[f"{region}_ok"], out[f"{region}_err"] = 0.0, float(np.sqrt(3))
            continue
        counts = np.bincount(label[sel], minlength=len(_LABELS))
        out[f"{region}_ok"] = float(counts.argmax() == want)
        ref = sample.image[sample.masks[data.REGIONS.index(region)]].astype(np.float64) / 255.0
        out[f"{region}_err"] = float(np.linalg.norm(np.median(img[sel], axis=0) - np.median(ref, axis=0)))
    if c.jacket != c.trousers:
        j, t = _LABELS.index(c.jacket), _LABELS.index(c.trousers)
        into_trousers = (label[band_pixels["trousers"]] == j).mean() if band_pixels["trousers"].any() else 0.0
        into_jacket = (label[band_pixels["jacket"]] == t).mean() if band_pixels["jacket"].any() else 0.0
        out["bleed"] = float(0.5 * (into_trousers + into_jacket))
    jb = band_pixels["jacket"]
    if jb.any():
        striped = ((shade[jb] == 1) & (label[jb] == _LABELS.index(c.jacket))).mean() > 0.2
        out["stripes"] = float(striped == c.striped)
    return out


def summarise(rows: List[Dict[str, float]]) -> Dict[str, float]:
    keys = sorted({k for r in rows for k in r})
    out = {k: round(float(np.mean([r[k] for r in rows if k in r])), 3) for k in keys}
    out["regions_ok"] = round(float(np.mean([out[f"{r}_ok"] for r in data.REGIONS])), 3)
    out["n"] = len(rows)
    return out


def evaluate_generation(world: World, samples: Sequence[data.Sample], chosen: Sequence[Setting], seg_t: int,
                        prompts_per_ref: int, steps: int, scale: float, weight: float,
                        keep_images: bool = False) -> Tuple[Dict, Dict]:
    assert chosen[0].name == "no adapter", "the baseline comes first: the others' change is measured from it"
    results: Dict[str, List[Dict[str, float]]] = {s.name: [] for s in chosen}
    images: Dict[str, List[np.ndarray]] = {s.name: [] for s in chosen}
    for index, sample in enumerate(samples):
        rng = np.random.default_rng(1000 + index)
        asks = gen_prompts(sample, rng, prompts_per_ref)
        prompts = [a[0] for a in asks]
        # generation phrases = the reference phrases (the runtime's default): the prompts name no
        # colour, so each region is located from its own tokens (phrase bank)
        colours = [data.region_phrase(sample.character, r) for r in data.REGIONS]
        groups, bank = world.located(prompts[0], colours)
        assert all(world.groups(p, colours) == world.groups(prompts[0], colours) for p in prompts), \
            "prompts must share token positions (one RowPlan)"
        noise = torch.randn((len(prompts), 3, data.SIZE, data.SIZE), generator=torch.Generator().manual_seed(index))
        plain_out = None  # "no adapter" comes first: the other settings' change is measured from it
        for setting in chosen:
            if setting.kind.startswith("text"):
                texts = prompts
                if setting.kind == "text+colours":
                    phrases = [data.region_phrase(sample.character, r) for r in data.REGIONS]
                    texts = [data.prompt(phrases, a[1], a[3], a[2]) for a in asks]
                out = sample_images(world, texts, noise, steps, scale, seed=index)
            else:
                tokens, _ = region_tokens(world, sample, setting, seg_t)
                regions = () if setting.kind == "global" else (1.0,) * len(data.REGIONS)
                config = FusionConfig(weight=weight, region_weights=regions, mode=setting.mode,
                                      temperature=setting.temperature, background=setting.background,
                                      map_levels=world.map_levels)
                with FusionSession(world.unet, world.layers, world.ip, tokens.cond, tokens.negative, config,
                                   phrase_bank=None if bank is None else bank.embeddings) as fusion:
                    out = sample_images(world, prompts, noise, steps, scale, fusion, groups, seed=index)
            if setting.name == "no adapter":
                plain_out = out
            for img, base, (_, bg, position, _) in zip(out, plain_out, asks):
                row = judge(img, sample, bg, position)
                # how much the setting changes the picture at all: mean |pixel - no adapter's|, 0..1
                row["change"] = float(np.abs(img.astype(np.float64) - base.astype(np.float64)).mean() / 255.0)
                results[setting.name].append(row)
            if keep_images:
                images[setting.name].extend(out)
    return {k: summarise(v) for k, v in results.items()}, images


# --------------------------------------------------------------------------- report


def table(seg: Dict, gen: Dict) -> str:
    lines = ["Segmentation IoU (reference masks vs truth; phrases '<colour> face/jacket/trousers')",
             "| T | face | jacket | trousers | mean |", "|---|---|---|---|---|"]
    for t, v in seg["iou"].items():
        lines.append(f"| {t} | {v['face']:.2f} | {v['jacket']:.2f} | {v['trousers']:.2f} | {v['mean']:.3f} |")
    ct = seg["control_t"]
    for name, key in ((f"nouns only, T={ct}", "noun_only"), (f"same-colour garments, T={ct}", "same_colour"),
                      ("position prior (mean mask)", "prior")):
        v = seg.get(key)
        if v:
            lines.append(f"| {name} | {v['face']:.2f} | {v['jacket']:.2f} | {v['trousers']:.2f} | {v['mean']:.3f} |")
    for levels, v in seg.get("iou_by_levels", {}).items():
        lines.append(f"| T={ct}, maps of level(s) {levels} | {v['face']:.2f} | {v['jacket']:.2f} | "
                     f"{v['trousers']:.2f} | {v['mean']:.3f} |")
    sw = seg["swap"]
    lines.append(f"Caption-swap control (T={ct}, n={sw['n']}): garment mask IoU with its true region "
                 f"{sw['garment_iou_with_true_region']:.2f}, with the other garment {sw['garment_iou_with_other_garment']:.2f}")
    lines += ["", "Generation (prompts ask another background/position/size, name no colour)",
              "| setting | face ok | jacket ok | trousers ok | regions ok | colour err f/j/t | bleed | stripes | background | position | change |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, v in gen.items():
        lines.append(
            f"| {name} | {v['face_ok']:.2f} | {v['jacket_ok']:.2f} | {v['trousers_ok']:.2f} | {v['regions_ok']:.2f} | "
            f"{v['face_err']:.2f}/{v['jacket_err']:.2f}/{v['trousers_err']:.2f} | {v.get('bleed', float('nan')):.2f} | "
            f"{v.get('stripes', float('nan')):.2f} | {v['background']:.2f} | {v['position']:.2f} | {v['change']:.3f} |")
    return "\n".join(lines)


def save_grid(path: str, samples: Sequence[data.Sample], images: Dict[str, List[np.ndarray]], per_ref: int,
              rows: int = 6, scale: int = 3) -> None:
    """One row per reference: the reference, then each setting's image for the first prompt."""
    from PIL import Image

    grid = []
    for i, sample in enumerate(samples[:rows]):
        cells = [sample.image] + [imgs[i * per_ref] for imgs in images.values()]
        grid.append(np.concatenate([np.pad(c, ((1, 1), (1, 1), (0, 0)), constant_values=255) for c in cells], axis=1))
    picture = Image.fromarray(np.concatenate(grid, axis=0))
    picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST).save(path)


def run(refs: int = 6, prompts_per_ref: int = 4, steps: int = 40, scale: float = 3.0, weight: float = 1.0,
        seg_t: int = 150, timesteps: Sequence[int] = SEG_TIMESTEPS, quick: bool = False,
        weights: str = WEIGHTS, seg_refs: Optional[int] = None, grid: Optional[str] = None,
        map_levels: Sequence[int] = MAP_LEVELS, threads: int = 1) -> Dict:
    torch.set_num_threads(threads)
    start = time.time()
    world = World(weights, map_levels)
    seg_samples = data.held_out(seg_refs or 16)
    seg = evaluate_segmentation(world, seg_samples, timesteps, seg_t)
    chosen = [s for s in settings(seg_t) if not quick or s.name in QUICK]
    samples = data.held_out(refs)
    gen, images = evaluate_generation(world, samples, chosen, seg_t, prompts_per_ref, steps, scale, weight,
                                      keep_images=grid is not None)
    if grid:
        save_grid(grid, samples, images, prompts_per_ref)
    return {"segmentation": seg, "generation": gen,
            "config": {"refs": refs, "seg_refs": len(seg_samples), "prompts_per_ref": prompts_per_ref,
                       "steps": steps, "cfg_scale": scale, "weight": weight, "seg_t": seg_t,
                       "map_levels": list(world.map_levels)},
            "seconds": round(time.time() - start, 1)}


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--teacher-forced" in argv:  # the teacher-forced evaluation has its own options (toyworld.teacher)
        argv.remove("--teacher-forced")
        if "--two-characters" in argv:  # item 5: cross-character bleed (toyworld.two_characters)
            argv.remove("--two-characters")
            from . import two_characters
            two_characters.main(argv)
        else:
            teacher.main(argv)
        return
    parser = argparse.ArgumentParser(description="Toy-world ablation of Character-Adapter "
                                                 "(--teacher-forced: the teacher-forced evaluation, see --teacher-forced -h)")
    parser.add_argument("--refs", type=int, default=6, help="reference characters for generation")
    parser.add_argument("--seg-refs", type=int, default=16, help="references for segmentation IoU")
    parser.add_argument("--prompts", type=int, default=4, help="prompts (layouts/backgrounds) per reference")
    parser.add_argument("--steps", type=int, default=40, help="sampling steps (ancestral DDIM, eta 1)")
    parser.add_argument("--cfg", type=float, default=3.0)
    parser.add_argument("--weight", type=float, default=1.0)
    parser.add_argument("--seg-t", type=int, default=150, help="segmentation timestep for the CA settings")
    parser.add_argument("--map-levels", default=",".join(map(str, MAP_LEVELS)),
                        help="UNet levels whose text maps segment and fuse (1 = 16x16, 2 = 8x8)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="four settings only (CI)")
    parser.add_argument("--weights", default=WEIGHTS)
    parser.add_argument("--grid", help="save a PNG: each reference, then every setting's first image")
    args = parser.parse_args(argv)
    result = run(args.refs, args.prompts, args.steps, args.cfg, args.weight, args.seg_t, quick=args.quick,
                 weights=args.weights, seg_refs=args.seg_refs, grid=args.grid,
                 map_levels=tuple(int(v) for v in args.map_levels.split(",")), threads=args.threads)
    print(table(result["segmentation"], result["generation"]))
    print(f"({result['seconds']} s)")
    print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
    main()
