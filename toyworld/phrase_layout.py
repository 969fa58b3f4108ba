"""Layout quality when the prompt does not name the regions (issue 14): `python -m toyworld.phrase_layout`.

Teacher-forced and host-free: each held-out character's true image is noised to timestep t and
passed once through the toy UNet while a FusionSession gathers the text maps (the window starts
after this step, so no image term is added: maps only); the layout the next step would use
(soft masks, tau 0.1, background 0.4, the toy's 16x16 maps) is compared with the true region masks.

Conditions (the toy's maps find regions by their colour words, README "Toy world", so every
phrase carries its colour: "pale face", "red jacket", "blue trousers"):
  prompt       the prompt names the regions ("a figure with a pale face , a red jacket and blue
               trousers in a white room"); groups = their tokens in the prompt (before issue 14)
  phrase       a prompt that names no region ("a figure in a white room"); each region located
               from its own phrase (phrase tokens appended as keys on the map layers)
  both         the naming prompt; groups = the in-prompt tokens plus the phrase's own tokens
  phrase-only  the naming prompt, each region located from its own phrase alone
  mixed        a prompt that names the jacket only ("a figure with a red jacket in a white room"):
               the jacket from its tokens in the prompt, face and trousers from their phrases
  nouns        the prompt that names no region, phrases "face" / "jacket" / "trousers"
  none         the prompt that names no region and no phrase tokens: no maps, so the fusion keeps
               its even split (what users got before; argmax = the first region everywhere)
and the position prior (mean training mask). IoU per reference = mean over the three regions of
hard IoU (argmax of [background, regions] vs the true mask) or soft IoU (sum min / sum max);
95 % intervals: percentile bootstrap over references, and for the paired difference from "prompt".
"""

import argparse
import json
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from charadapter.fusion import FusionConfig, FusionSession, RowPlan
from charadapter.layers import find_attn2_layers
from charadapter.masks import uniform_masks
from charadapter.phrases import PhraseBank
from charadapter.tokens import phrase_positions

from . import data
from .evaluate import MAP_LEVELS, prior_iou
from .model import WEIGHTS, load_sd

CONDITIONS = ("prompt", "phrase", "both", "phrase-only", "mixed", "nouns", "none")
TIMESTEPS = (100, 300, 500, 700, 900)
NOISE_SEED = 4321


class PhraseWorld:
    """The toy text-to-image model and the pieces of the extension this measurement drives."""

    def __init__(self, weights: str = WEIGHTS, map_levels: Sequence[int] = MAP_LEVELS):
        self.model = load_sd(weights)
        self.unet = self.model.model.diffusion_model
        self.layers = find_attn2_layers(self.unet)
        self.tokenizer = self.model.cond_stage_model.tokenizer
        self.alphas = self.model.alphas_cumprod.float()
        self.map_levels = tuple(map_levels)
        context = self.model.cond_stage_model.proj.out_features
        # the image term never runs (maps only): zero adapter weights keep this host-free of the adapter file
        self.ip = [(torch.zeros(l.inner_dim, context), torch.zeros(l.inner_dim, context)) for l in self.layers]
        self.tokens = torch.zeros(len(data.REGIONS), 1, context)
        self.negative = torch.zeros(1, context)

    @torch.no_grad()
    def cond(self, texts: Sequence[str]) -> torch.Tensor:
        return self.model.get_learned_conditioning(list(texts))

    def positions(self, text: str, phrases: Sequence[str]) -> List[Tuple[int, ...]]:
        chunks = [self.tokenizer.chunk(text)]
        return [tuple(phrase_positions(chunks, self.tokenizer.encode_words(p))) for p in phrases]

    def bank(self, phrases: Sequence[str]) -> PhraseBank:
        """Each phrase encoded alone, its own token rows (after BOS, before EOS)."""
        rows = []
        for phrase, enc in zip(phrases, self.cond(phrases)):
            rows.append(enc[1:1 + len(self.tokenizer.encode_words(phrase))])
        return PhraseBank.stack(rows)

    @torch.no_grad()
    def layout(self, x_t: torch.Tensor, t: int, text: str, groups, bank: Optional[PhraseBank]) -> torch.Tensor:
        """Soft layout (R+1, N) the fusion would use after one UNet call on x_t (1, 3, H, W)."""
        if not any(groups):  # no group has a token: no maps, the fusion keeps its even split
            return uniform_masks(1, len(data.REGIONS), x_t.shape[-2] * x_t.shape[-1])[0]
        config = FusionConfig(weight=1.0, region_weights=(1.0,) * len(data.REGIONS), start=0.99, end=1.0,
                              map_levels=self.map_levels)
        plan = RowPlan(is_cond=(True,), image=(0,), token_groups=(tuple(tuple(g) for g in groups),))
        fusion = FusionSession(self.unet, self.layers, self.ip, self.tokens, self.negative, config,
                               phrase_bank=None if bank is None else bank.embeddings)
        with fusion:
            fusion.begin_pass(tuple(x_t.shape[-2:]), 100)
            fusion.begin_step(0, plan)  # before the window: maps only, the UNet's output is untouched
            self.model.apply_model(x_t, torch.full((1,), float(t)), self.cond([text]))
            fusion.begin_step(1, plan)  # folds the maps into the layout
            return fusion.masks[0]


def plain_prompt(sample: data.Sample) -> str:
    return f"a figure in a {sample.layout.background} room"


def naming_prompt(sample: data.Sample, phrases: Sequence[str]) -> str:
    return data.prompt(list(phrases), background=sample.layout.background)


def condition_inputs(world: PhraseWorld, sample: data.Sample, condition: str):
    """(prompt, token groups, bank or None) of one condition."""
    phrases = [data.region_phrase(sample.character, r) for r in data.REGIONS]
    if condition == "nouns":
        bank = world.bank(list(data.REGIONS))
        return plain_prompt(sample), [bank.entries(r) for r in range(3)], bank
    if condition == "none":
        return plain_prompt(sample), [()] * 3, None
    if condition == "phrase":
        bank = world.bank(phrases)
        return plain_prompt(sample), [bank.entries(r) for r in range(3)], bank
    if condition == "mixed":
        text = naming_prompt(sample, phrases[1:2])
        inside = world.positions(text, phrases)
        assert [bool(g) for g in inside] == [False, True, False], text
        bank = world.bank(phrases)
        return text, [g or bank.entries(r) for r, g in enumerate(inside)], bank
    text = naming_prompt(sample, phrases)
    inside = world.positions(text, phrases)
    assert all(inside), f"{text!r} must hold every phrase"
    if condition == "prompt":
        return text, inside, None
    bank = world.bank(phrases)
    if condition == "phrase-only":
        return text, [bank.entries(r) for r in range(3)], bank
    return text, [tuple(g) + bank.entries(r) for r, g in enumerate(inside)], bank  # both


def region_ious(layout: torch.Tensor, masks: np.ndarray) -> Tuple[List[float], List[float]]:
    """(hard IoU, soft IoU) per region of a layout (R+1, N) against true masks (R, H, W)."""
    h, w = masks.shape[1:]
    soft = layout.reshape(-1, h, w).numpy()  # (R+1, H, W)
    winner = soft.argmax(axis=0)
    hard, fuzzy = [], []
    for r in range(masks.shape[0]):
        truth = masks[r]
        pred = winner == r + 1
        union = np.logical_or(pred, truth).sum()
        hard.append(float(np.logical_and(pred, truth).sum() / union) if union else 1.0)
        m = soft[r + 1]
        fuzzy.append(float(np.minimum(m, truth).sum() / np.maximum(m, truth).sum()))
    return hard, fuzzy


def bootstrap(values: np.ndarray, resamples: int = 2000, seed: int = 0) -> Tuple[float, float, float]:
    """(mean, low, high): percentile 95 % interval of the mean over the first axis."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(values), size=(resamples, len(values)))
    means = values[picks].mean(axis=1)
    return float(values.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def run(refs: int = 48, timesteps: Sequence[int] = TIMESTEPS, conditions: Sequence[str] = CONDITIONS,
        weights: str = WEIGHTS, threads: int = 2) -> Dict:
    torch.set_num_threads(threads)
    start = time.time()
    world = PhraseWorld(weights)
    samples = data.held_out(refs)
    # per condition, timestep: (refs, 3) hard and soft IoUs
    hard = {c: {t: [] for t in timesteps} for c in conditions}
    soft = {c: {t: [] for t in timesteps} for c in conditions}
    for index, sample in enumerate(samples):
        x0 = torch.from_numpy(data.to_x0([sample.image]))  # (1, 3, H, W)
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(NOISE_SEED + index))
        inputs = {c: condition_inputs(world, sample, c) for c in conditions}
        for t in timesteps:
            a = world.alphas[t]
            x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise  # the same noise for every condition
            for c in conditions:
                text, groups, bank = inputs[c]
                h, s = region_ious(world.layout(x_t, t, text, groups, bank), sample.masks)
                hard[c][t].append(h)
                soft[c][t].append(s)
    prior = prior_iou(samples)
    out: Dict = {"config": {"refs": refs, "timesteps": list(timesteps), "map_levels": list(world.map_levels),
                            "temperature": 0.1, "background": 0.4, "resamples": 2000},
                 "prior_hard": prior, "hard": {}, "soft": {}, "hard_per_region": {}}
    for name, table in (("hard", hard), ("soft", soft)):
        for c in conditions:
            rows = {str(t): np.asarray(table[c][t]) for t in timesteps}  # (refs, 3)
            rows["mean"] = np.mean([rows[str(t)] for t in timesteps], axis=0)
            entry = {}
            for key, arr in rows.items():
                per_ref = arr.mean(axis=1)
                mean, low, high = bootstrap(per_ref)
                cell = {"mean": round(mean, 3), "ci": [round(low, 3), round(high, 3)]}
                if c != "prompt" and "prompt" in conditions:
                    base = (np.asarray(table["prompt"][int(key)]) if key != "mean" else
                            np.mean([np.asarray(table["prompt"][t]) for t in timesteps], axis=0)).mean(axis=1)
                    d, dl, dh = bootstrap(per_ref - base)
                    cell["diff_vs_prompt"] = {"mean": round(d, 3), "ci": [round(dl, 3), round(dh, 3)]}
                entry[key] = cell
                if name == "hard" and key == "mean":
                    out["hard_per_region"][c] = {r: round(float(arr[:, i].mean()), 3) for i, r in enumerate(data.REGIONS)}
            out[name][c] = entry
    out["seconds"] = round(time.time() - start, 1)
    return out


def table(result: Dict) -> str:
    ts = [str(t) for t in result["config"]["timesteps"]] + ["mean"]
    lines = []
    for name in ("hard", "soft"):
        lines += [f"{name} IoU (mean over regions; 95 % bootstrap interval over {result['config']['refs']} references)",
                  "| condition | " + " | ".join(f"t={t}" if t != "mean" else "mean over t" for t in ts) + " |",
                  "|---" * (len(ts) + 1) + "|"]
        for c, entry in result[name].items():
            cells = [f"{entry[t]['mean']:.3f} [{entry[t]['ci'][0]:.3f}, {entry[t]['ci'][1]:.3f}]" for t in ts]
            lines.append(f"| {c} | " + " | ".join(cells) + " |")
        lines.append("")
        lines.append(f"{name} IoU difference from 'prompt' (paired, 95 % interval)")
        lines.append("| condition | " + " | ".join(ts) + " |")
        lines.append("|---" * (len(ts) + 1) + "|")
        for c, entry in result[name].items():
            if "diff_vs_prompt" in entry[ts[0]]:
                cells = [f"{entry[t]['diff_vs_prompt']['mean']:+.3f} [{entry[t]['diff_vs_prompt']['ci'][0]:+.3f}, "
                         f"{entry[t]['diff_vs_prompt']['ci'][1]:+.3f}]" for t in ts]
                lines.append(f"| {c} | " + " | ".join(cells) + " |")
        lines.append("")
    p = result["prior_hard"]
    lines.append(f"position prior (mean training mask, hard): {p['mean']:.3f} "
                 f"(face {p['face']:.2f}, jacket {p['jacket']:.2f}, trousers {p['trousers']:.2f})")
    lines.append("hard IoU per region, mean over t: " + "; ".join(
        f"{c}: " + "/".join(f"{v:.2f}" for v in r.values()) for c, r in result["hard_per_region"].items()))
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Toy-world layout IoU: regions in the prompt vs from the phrase")
    parser.add_argument("--refs", type=int, default=48)
    parser.add_argument("--timesteps", default=",".join(map(str, TIMESTEPS)))
    parser.add_argument("--conditions", default=",".join(CONDITIONS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--weights", default=WEIGHTS)
    args = parser.parse_args(argv)
    result = run(args.refs, tuple(int(t) for t in args.timesteps.split(",")), tuple(args.conditions.split(",")),
                 args.weights, args.threads)
    print(table(result))
    print(f"({result['seconds']} s)")
    print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
    main()
