"""The benchmark runs (--quick: a UNet with SD1.5's structure at width 32) and reports what it promises.

No timing is asserted: only that every number is there, that no q/k projection was computed
twice, and that the bench imports nothing a bare GPU box may lack (transformers, diffusers) and
nothing of the WebUI.
"""

import json
import os
import subprocess
import sys

import pytest

from charadapter import bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

KEYS = ("plain_ms", "one_region_ratio", "three_region_soft_ratio", "three_region_hard_ratio",
        "three_vs_one_region_soft", "three_vs_one_region_hard", "two_characters_ratio",
        "two_characters_vs_three_regions", "in_step_ratios", "hook_ms", "projections_recomputed",
        "peak_mem_ratio", "segmentation_ms", "segmentation_cache_hit_ms", "cache_hit_vs_step", "aten_ops_per_step",
        "gflop_per_step", "device", "dtype", "sizes", "goals_met")


@pytest.fixture(scope="module")
def report():
    """`python -m charadapter.bench --quick`, as CI would run it: (output lines, the last line's JSON)."""
    command = [sys.executable, "-m", "charadapter.bench", "--quick", "--repeats", "1", "--device", "cpu"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    return lines, json.loads(lines[-1])


def test_last_line_is_the_report(report):
    lines, result = report
    assert lines[-1].startswith("{") and lines[-1].endswith("}")
    for key in KEYS:
        assert key in result, key
    assert result["device"] == "cpu" and result["dtype"] == "fp32"
    assert set(result["sizes"]) == {"8x8", "16x16"} and result["headline_size"] == "16x16"
    for size in result["sizes"].values():
        assert size["repeats"] == 1
        assert size["plain_ms"] > 0 and size["three_region_soft_ms"] > 0 and size["two_characters_ms"] > 0


def test_no_projection_computed_twice(report):
    _, result = report
    assert result["projections_recomputed"] == 0
    for size in result["sizes"].values():
        calls = size["projection_calls"]
        assert calls["plain"] == 64  # to_q and to_k of 16 attn1 and 16 attn2 layers
        assert set(calls.values()) == {64}


def test_numbers_are_sane(report):
    _, result = report
    assert result["plain_ms"] > 0 and result["segmentation_ms"] > 0
    assert 0 < result["segmentation_cache_hit_ms"] < result["plain_ms"]
    assert result["peak_mem_soft_mb"] > 0 and result["peak_mem_plain_mb"] > 0
    ops, flops = result["aten_ops_per_step"], result["gflop_per_step"]
    assert ops["plain"] < ops["one_region"] < ops["three_region_soft"]
    assert flops["plain"] < flops["one_region"] < flops["three_region_soft"] < flops["two_characters"]
    assert "in_step_two_characters_vs_three_regions" in result["goals_met"]
    assert all(isinstance(v, bool) for v in result["goals_met"].values())
    assert all(v >= 1.0 for v in result["in_step_ratios"].values())  # a step with our hooks, over itself without
    assert result["goals_met"]["projections_recomputed"] is True


def test_imports_nothing_a_bare_gpu_box_lacks():
    code = ("import sys, charadapter.bench\n"
            "bad = [m for m in ('transformers', 'diffusers', 'modules', 'gradio') if m in sys.modules]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, cwd=ROOT)


def test_flags_are_checked():
    with pytest.raises(SystemExit):
        bench.parse_args(["--sizes", "12"])  # not a multiple of 8
    with pytest.raises(SystemExit):
        bench.parse_args(["--repeats", "0"])
    args = bench.parse_args(["--quick"])
    assert args.sizes == [8, 16] and args.threads == 1 and args.device in ("cpu", "cuda")
