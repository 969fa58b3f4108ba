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
import torch

from charadapter import bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

KEYS = ("plain_ms", "controlnet_ip_ratio", "one_region_ratio", "three_region_soft_ratio", "three_region_hard_ratio",
        "three_vs_one_region_soft", "three_vs_one_region_hard", "one_region_vs_controlnet_ip",
        "three_region_soft_vs_controlnet_ip", "two_characters_ratio",
        "two_characters_vs_three_regions", "in_step_ratios", "hook_ms", "projections_recomputed",
        "peak_mem_ratio", "segmentation_ms", "segmentation_cache_hit_ms", "cache_hit_vs_step", "aten_ops_per_step",
        "aten_ops_added", "aten_ops_added_per_attn2_layer", "gflop_per_step", "device", "dtype", "sizes", "goals_met")


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
        assert all(size[f"{mode}_ms"] > 0 for mode in bench.MODES)


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
    ops, flops, added = result["aten_ops_per_step"], result["gflop_per_step"], result["aten_ops_added"]
    assert ops["plain"] < ops["one_region"] < ops["three_region_soft"] < ops["controlnet_ip"]
    assert flops["plain"] < flops["one_region"] < flops["three_region_soft"]
    assert flops["three_region_soft"] < flops["two_characters"]
    assert "in_step_two_characters_vs_three_regions" in result["goals_met"]
    # two characters: the same per-layer operators as three regions, plus the layout's second level once per step
    assert added["two_characters"] - added["three_region_soft"] == 12
    assert added["regions_3"] == added["regions_6"] == added["three_region_soft"]
    assert result["aten_ops_added_per_attn2_layer"] <= 4.0 and result["goals_met"]["ops_added_per_attn2_layer"]
    assert result["goals_met"]["ops_do_not_grow_with_regions"] is True
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


# ---- charadapter.bench_pass: the reference pass's cost and what its size loses ------------------


def test_pass_cost_counts_the_area_on_the_meta_device():
    """Twice the area, about twice the working memory and work (VAE encoder and UNet call)."""
    from charadapter import bench_pass

    with torch.device("meta"):
        unet = bench._import_unet()(**bench.TINY)
    unet = unet.eval().requires_grad_(False)
    layers = bench_pass.find_attn2_layers(unet)
    vae = bench_pass.meta_vae()
    with bench_pass.blocked_attention():
        square = bench_pass.pass_cost(unet, layers, vae, (256, 256), bench.TINY["context_dim"])
        tall = bench_pass.pass_cost(unet, layers, vae, (256, 512), bench.TINY["context_dim"])
    for key, most in (("vae_gib", 2.3), ("vae_gflop", 2.3), ("unet_gib", 2.3), ("unet_gflop", 3.0)):
        # self-attention grows with the square of the area: at width 32 it is much of the UNet's work
        assert square[key] > 0 and 1.7 <= tall[key] / square[key] <= most, (key, square, tall)


def test_pass_grid_loss_grows_as_the_pass_shrinks():
    from charadapter import bench_pass

    truth = bench_pass.synthetic_figure((512, 1024))
    assert truth.shape == (3, 1024, 512) and not (truth[0] & truth[1]).any() and truth.any(axis=(1, 2)).all()
    native = bench_pass.grid_loss((1024, 2048), 1024 * 1024 // 2)
    tiny = bench_pass.grid_loss((1024, 2048), 1024 * 1024 // 64)
    assert native["pass"] == "512x1024" and native["iou"] > tiny["iou"] + 0.1
    assert native["edge_pct"] < 1.0 < tiny["edge_pct"]
    assert bench_pass.former_size((256, 512), 1024) == (1024, 2048)  # what a 1:2 reference got on SDXL
