"""Re-measure the toy world's CI pins (tests/test_toyworld.py) on the weights in toyworld/weights,
after a retraining: each reduced run at noise seeds 0..4, printing the seed-0 value (the pin) and
3 standard deviations of the spread (the tolerance).

    python tools/toy_pins.py [quick] [teacher] [two] [phrase]     (default: all; about 75 s)
"""

import json
import os
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

from test_toyworld import PHRASE_QUICK, QUICK, TEACHER_QUICK, TWO_QUICK, colour_err  # noqa: E402  (the tests' own)

from toyworld.world import World  # noqa: E402

SEEDS = range(5)


def spread(name: str, values) -> None:
    values = [float(v) for v in values]
    print(f"{name}: seed 0 {values[0]:.4f}, 3 sd {3 * np.std(values, ddof=1):.4f}, "
          f"seeds {[round(v, 4) for v in values]}", flush=True)


def quick() -> None:
    from toyworld.evaluate import run

    result = run(**QUICK)
    seg, gen = result["segmentation"], result["generation"]
    print(json.dumps({
        "iou": {t: seg["iou"][t]["mean"] for t in ("50", "150")}, "prior": seg["prior"]["mean"],
        "levels": {k: v["mean"] for k, v in seg["iou_by_levels"].items()}, "swap": seg["swap"],
        "noun_only": seg["noun_only"]["mean"], "change": {k: v["change"] for k, v in gen.items()},
        "colour_err": {k: float(colour_err(v)) for k, v in gen.items()},
    }), flush=True)


def teacher() -> None:
    from toyworld.teacher import evaluate

    runs = [evaluate(World(), log=lambda *a: None, noise_seed=seed, **TEACHER_QUICK) for seed in SEEDS]
    for name in runs[0]["fidelity"]:
        spread(f"figure gain, {name}", [r["fidelity"][name]["figure"] for r in runs])
    for name in runs[0]["layout_iou"]:
        spread(f"layout IoU, {name}", [np.mean(r["layout_iou"][name][:3]) for r in runs])
    for name in runs[0]["bleed"]:
        spread(f"jacket bleed, {name}", [r["bleed"][name]["jacket"]["bleed"] for r in runs])
        spread(f"jacket own, {name}", [r["bleed"][name]["jacket"]["own"] for r in runs])


def two() -> None:
    from toyworld.two_characters import evaluate

    runs = [evaluate(World(), noise_seed=seed, log=lambda *a: None, **TWO_QUICK) for seed in SEEDS]
    for name in ("per-character CA soft", "per-character CA soft, true masks"):
        spread(f"B own, {name}", [r["settings"][name]["b_own"]["value"] for r in runs])


def phrase() -> None:
    from toyworld.phrase_layout import run

    result = run(**PHRASE_QUICK)["hard"]
    print("phrase layout:", {c: result[c]["100"]["mean"] for c in PHRASE_QUICK["conditions"]})


def main(argv) -> None:
    torch.set_num_threads(1)
    for part in argv or ["quick", "teacher", "two", "phrase"]:
        {"quick": quick, "teacher": teacher, "two": two, "phrase": phrase}[part]()


if __name__ == "__main__":
    main(sys.argv[1:])
