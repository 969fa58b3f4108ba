"""What the reference pass costs and what its size loses: ``python -m charadapter.bench_pass``.

Cost (``--cost``, the default): at SD1.5's and SDXL's real dimensions, counted on the meta device
(shapes only: nothing is allocated or computed, so the numbers do not depend on the machine or
its load), for references of aspect 1:1, 1:2 and 1:4:
- the pass at `pass_size` (the area the extension uses) and at the former size (short side 512 /
  1024, long side up to twice that);
- per pass: the VAE encoder's and the UNet call's working memory (peak bytes of the tensors they
  create, charadapter.memprobe: weights and op-internal scratch are not counted) and GFLOP;
- next to one sampling step at the native size (a CFG call at batch 2 with three regions) and to
  the VAE decode that ends every generation at the native size.
The VAE encoder is ldm's (SD's VAE layout, shared by SDXL) with its mid-block attention computed
in query blocks, as the WebUI's attention optimisations and SDPA's flash kernels do (its
plain form materialises an (h*w)^2 matrix, 1 GiB at 1024^2); the UNet's attention the same way.
SDXL's UNet is ldm's UNetModel with SDXL's layout (levels 1-2 attention, depths 2/10, 10 mid).

Size (``--grid``): how much the pass's grid alone costs the masks. A synthetic figure (face,
upper body, lower body) on a reference of each aspect; for each pass area, each region's map on
the map levels' grids is the region's area-averaged indicator blurred by one cell (attention is
smooth at its cell size); the extension's aggregate_maps / masks_from_maps / region_boxes turn
them into masks and strips, compared with the true regions: mask IoU and the strip edges' error
in % of the reference height. This measures quantisation only, not how a model's attention
changes away from its native size (the toy world measures that: toyworld.pass_size).

The last line of the output is one JSON object.
"""

import argparse
import contextlib
import copy
import json
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from .bench import GROUPS, SD15, TEXT_TOKENS, Adapter, Runner, _import_unet, sdp_forward
from .geometry import downsampled_hw
from .hooks import HookSession, RegionState, plan_region_hooks
from .layers import DEFAULT_MAP_LEVELS, find_attn2_layers, map_layers
from .memprobe import LiveTensorBytes
from .reference import PASS_AREA, pass_size
from .segmentation import aggregate_maps, masks_from_maps, region_boxes

NATIVE_SIDE = {"sd15": 512, "sdxl": 1024}
SDXL = dict(  # ldm's UNetModel with SDXL's level layout (sgm's unet_config), deepened below
    image_size=32, in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2],
    num_res_blocks=2, channel_mult=[1, 2, 4], num_head_channels=64, use_spatial_transformer=True,
    transformer_depth=1, context_dim=2048, use_checkpoint=False, legacy=False, use_linear_in_transformer=True,
)
SDXL_DEPTHS = {1: 2, 2: 10}  # transformer depth per level; the middle block has 10
VAE = dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128, ch_mult=[1, 2, 4, 4],
           num_res_blocks=2, attn_resolutions=[], dropout=0.0)  # SD's and SDXL's VAE encoder
ASPECTS = ((1, 1), (1, 2), (1, 4))  # width : height of the reference
QUERY_BLOCK = 1024  # query rows per attention block
GIB = 2 ** 30


# ---- models on the meta device --------------------------------------------------------------


def meta_unet(family: str) -> torch.nn.Module:
    """The family's UNet with its real dimensions on the meta device."""
    unet_class = _import_unet()
    with torch.device("meta"):
        unet = unet_class(**(SD15 if family == "sd15" else SDXL))
    if family == "sdxl":
        def deepen(st, depth):
            st.transformer_blocks = torch.nn.ModuleList(
                [st.transformer_blocks[0]] + [copy.deepcopy(st.transformer_blocks[0]) for _ in range(depth - 1)])
            # ldm 2.1.5's SpatialTransformer indexes one context per block: give each block the same
            st.register_forward_pre_hook(lambda module, args: (args[0], [args[1]] * depth) + tuple(args[2:]))

        for block in list(unet.input_blocks) + list(unet.output_blocks):
            for child in block.children():
                if hasattr(child, "transformer_blocks"):
                    width = child.transformer_blocks[0].attn2.to_q.weight.shape[0]
                    deepen(child, SDXL_DEPTHS[SDXL["channel_mult"].index(width // SDXL["model_channels"])])
        deepen(unet.middle_block[1], 10)
    return unet.eval().requires_grad_(False)


def meta_vae(part: str = "Encoder") -> torch.nn.Module:
    """SD's VAE encoder (or "Decoder") on the meta device."""
    from ldm.modules.diffusionmodules import model

    with torch.device("meta"):
        return getattr(model, part)(**VAE).eval().requires_grad_(False)


def _blocked_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v over (..., N, D), QUERY_BLOCK query rows at a time."""
    return torch.cat([F.scaled_dot_product_attention(q[..., i:i + QUERY_BLOCK, :], k, v)
                      for i in range(0, q.shape[-2], QUERY_BLOCK)], dim=-2)


_cross_attention = sdp_forward(_blocked_sdpa)  # ldm's CrossAttention, queries in blocks


def _vae_attention(self, x):
    h = self.norm(x)
    q, k, v = self.q(h), self.k(h), self.v(h)
    b, c, hh, ww = q.shape
    q, k, v = (t.reshape(b, 1, c, hh * ww).transpose(2, 3) for t in (q, k, v))  # (B, C, h, w) -> (B, 1, N, C)
    out = _blocked_sdpa(q, k, v).transpose(2, 3).reshape(b, c, hh, ww)  # (B, 1, N, C) -> (B, C, h, w)
    return x + self.proj_out(out)


@contextlib.contextmanager
def blocked_attention():
    """ldm's CrossAttention and the VAE's AttnBlock computed in query blocks; restored on exit."""
    from ldm.modules.attention import CrossAttention
    from ldm.modules.diffusionmodules.model import AttnBlock

    saved = [(cls, cls.__dict__["forward"]) for cls in (CrossAttention, AttnBlock)]
    CrossAttention.forward, AttnBlock.forward = _cross_attention, _vae_attention
    try:
        yield
    finally:
        for cls, forward in saved:
            cls.forward = forward


# ---- cost --------------------------------------------------------------------------------------


def former_size(size: Tuple[int, int], short_side: int, multiple: int = 64) -> Tuple[int, int]:
    """The size the pass had before it was sized by area: short side `short_side`, long side at most twice it."""
    width, height = size
    scale = min(short_side / min(width, height), 2 * short_side / max(width, height))
    return tuple(max(multiple, int(round(v * scale / multiple)) * multiple) for v in (width, height))


def _measured(run) -> Tuple[float, float]:
    """(peak GiB of tensors created, GFLOP) of one call of `run`."""
    from torch.utils.flop_counter import FlopCounterMode

    flops = FlopCounterMode(display=False)
    with torch.no_grad(), LiveTensorBytes() as probe, flops:
        run()
    return probe.peak / GIB, flops.get_total_flops() / 1e9


def pass_cost(unet, layers, vae, size: Tuple[int, int], context_dim: int) -> Dict[str, float]:
    """Working memory and GFLOP of the VAE encode and of the segmentation UNet call at `size` (W, H)."""
    width, height = size
    latent_hw = (height // 8, width // 8)
    pixels = torch.empty(1, 3, height, width, device="meta")
    vae_gib, vae_gflop = _measured(lambda: vae(pixels))
    x = torch.empty(1, 4, *latent_hw, device="meta")
    context = torch.empty(1, TEXT_TOKENS, context_dim, device="meta")
    t = torch.empty(1, device="meta")
    groups = [list(g) for g in GROUPS]
    unet_gib, unet_gflop = _measured(lambda: segment_maps_only(unet, layers, lambda: unet(x, timesteps=t, context=context),
                                                                latent_hw, groups))
    return {"size": f"{width}x{height}", "megapixels": round(width * height / 1e6, 3),
            "vae_gib": round(vae_gib, 3), "vae_gflop": round(vae_gflop, 1),
            "unet_gib": round(unet_gib, 3), "unet_gflop": round(unet_gflop, 1)}


def segment_maps_only(unet, layers, run_unet, latent_hw, groups) -> None:
    """The pass's UNet call with the hooks that capture its maps (capture_region_maps' state; on
    the meta device the maps have no values to copy out, so they stay where they are)."""
    kv = [(torch.zeros(1, 1, 1, layer.inner_dim, device="meta"),) * 2 for layer in layers]
    state = RegionState(kv=kv, weights=torch.zeros(1), token_groups=groups, add_term=False,
                        map_layers=frozenset(layer.index for layer in map_layers(layers, DEFAULT_MAP_LEVELS)))
    session = HookSession(root=unet)
    plan_region_hooks(session, unet, layers, state)
    with session:
        run_unet()


def step_cost(unet, layers, family: str) -> Dict[str, float]:
    """One sampling step at the native size: a CFG call at batch 2 with three soft regions."""
    from torch.utils.flop_counter import FlopCounterMode

    context_dim = (SD15 if family == "sd15" else SDXL)["context_dim"]
    latent = NATIVE_SIDE[family] // 8
    runner = Runner(unet, layers, Adapter(layers, context_dim, 4, 0), latent, torch.device("meta"),
                    torch.float32, context_dim, 0)
    try:
        probe = LiveTensorBytes()
        runner.steady_step_in("three_region_soft", probe)
        flops = FlopCounterMode(display=False)
        runner.steady_step_in("three_region_soft", flops)
    finally:
        runner.close()
    return {"size": f"{NATIVE_SIDE[family]}x{NATIVE_SIDE[family]}", "unet_gib": round(probe.peak / GIB, 3),
            "unet_gflop": round(flops.get_total_flops() / 1e9, 1)}


def decode_cost(decoder, side: int) -> Dict[str, float]:
    """The VAE decode every generation of side x side ends with (the plain WebUI's own peak)."""
    latent = torch.empty(1, 4, side // 8, side // 8, device="meta")
    gib, gflop = _measured(lambda: decoder(latent))
    return {"size": f"{side}x{side}", "vae_gib": round(gib, 3), "vae_gflop": round(gflop, 1)}


def cost(families: Sequence[str], area_fraction: Optional[float]) -> Dict:
    out: Dict = {}
    vae, decoder = meta_vae(), meta_vae("Decoder")
    with blocked_attention():
        for family in families:
            unet = meta_unet(family)
            layers = find_attn2_layers(unet)
            native = NATIVE_SIDE[family]
            area = PASS_AREA[family] if area_fraction is None else int(native * native * area_fraction)
            context_dim = (SD15 if family == "sd15" else SDXL)["context_dim"]
            rows = {"step": step_cost(unet, layers, family), "decode": decode_cost(decoder, native)}
            for aw, ah in ASPECTS:
                reference = (512 * aw, 512 * ah)
                rows[f"{aw}:{ah}"] = pass_cost(unet, layers, vae, pass_size(reference, area), context_dim)
                rows[f"{aw}:{ah} former"] = pass_cost(unet, layers, vae, former_size(reference, native), context_dim)
                print(family, f"{aw}:{ah}", rows[f"{aw}:{ah}"], "former", rows[f"{aw}:{ah} former"], flush=True)
            print(family, "step", rows["step"], "decode", rows["decode"], flush=True)
            out[family] = rows
    return out


# ---- size: the grid's quantisation alone --------------------------------------------------------


def synthetic_figure(size: Tuple[int, int]) -> np.ndarray:
    """True masks (3, H, W) bool of a standing figure (face, upper body, lower body) filling the
    reference's height, as wide as a person or as the reference allows."""
    width, height = size
    top, bottom = 0.05 * height, 0.95 * height
    tall = bottom - top
    half = min(0.2 * tall, 0.45 * width)  # half the figure's width (arms out)
    cx = width / 2
    layers = []
    for draw_region in (
        lambda d: d.ellipse([cx - 0.3 * half, top, cx + 0.3 * half, top + 0.14 * tall], fill=1),
        lambda d: d.rectangle([cx - half, top + 0.15 * tall, cx + half, top + 0.5 * tall], fill=1),
        lambda d: (d.rectangle([cx - 0.55 * half, top + 0.5 * tall, cx - 0.05 * half, bottom], fill=1),
                   d.rectangle([cx + 0.05 * half, top + 0.5 * tall, cx + 0.55 * half, bottom], fill=1)),
    ):
        canvas = Image.new("L", (width, height), 0)
        draw_region(ImageDraw.Draw(canvas))
        layers.append(np.asarray(canvas) > 0)
    return np.stack(layers)


def grid_map(mask: np.ndarray, hw: Tuple[int, int]) -> torch.Tensor:
    """A region's map on a grid: its area-averaged indicator, blurred by one cell. (h*w,)"""
    grid = F.interpolate(torch.from_numpy(mask.astype(np.float32))[None, None], size=hw, mode="area")
    kernel = torch.tensor([0.25, 0.5, 0.25])
    grid = F.pad(grid, (1, 1, 1, 1), mode="replicate")
    grid = F.conv2d(grid, (kernel[:, None] * kernel[None, :])[None, None])  # (1, 1, h, w)
    return grid.reshape(-1)  # (1, 1, h, w) -> (h*w,)


def _true_strip(mask: np.ndarray) -> Tuple[int, int]:
    rows = np.flatnonzero(mask.any(axis=1))
    return int(rows[0]), int(rows[-1]) + 1


def grid_loss(reference: Tuple[int, int], area: int, levels: Sequence[int] = DEFAULT_MAP_LEVELS) -> Dict[str, float]:
    """Mask IoU and strip edge error (% of the height) of the synthetic figure through a pass of `area`."""
    truth = synthetic_figure(reference)
    width, height = pass_size(reference, area)
    latent_hw = (height // 8, width // 8)
    layer_maps = []
    for level in levels:
        hw = downsampled_hw(latent_hw, level)
        layer_maps.append(torch.stack([grid_map(m, hw) for m in truth]))  # (R, N_level)
    result = masks_from_maps(aggregate_maps(layer_maps, latent_hw))
    boxes = region_boxes(result.masks, reference, "strip", margin=0.0)
    ious, edges = [], []
    for r, mask in enumerate(result.masks):
        full = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(reference, Image.NEAREST)) > 127
        union = np.logical_or(full, truth[r]).sum()
        ious.append(float(np.logical_and(full, truth[r]).sum() / union))
        top, bottom = _true_strip(truth[r])
        edges += [abs(boxes[r][1] - top), abs(boxes[r][3] - bottom)]
    return {"pass": f"{width}x{height}", "iou": round(float(np.mean(ious)), 3),
            "edge_pct": round(100.0 * float(np.mean(edges)) / reference[1], 2),
            "edge_pct_max": round(100.0 * float(np.max(edges)) / reference[1], 2)}


def grid(families: Sequence[str], fractions: Sequence[float]) -> Dict:
    out: Dict = {}
    for family in families:
        native = NATIVE_SIDE[family]
        rows: Dict[str, Dict] = {}
        for aw, ah in ASPECTS:
            reference = (256 * aw, 256 * ah) if ah <= 2 else (256, 1024)
            reference = (reference[0] * 4, reference[1] * 4)  # 1024 px wide: finer than any pass
            for fraction in fractions:
                row = grid_loss(reference, int(native * native * fraction))
                rows[f"{aw}:{ah} x{fraction}"] = row
                print(family, f"{aw}:{ah}", f"area x{fraction}", row, flush=True)
        out[family] = rows
    return out


def main(argv: Sequence[str] = None) -> Dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", action="store_true", help="the grid's quantisation curve instead of the cost")
    parser.add_argument("--families", default="sd15,sdxl")
    parser.add_argument("--area", type=float, default=None,
                        help="pass area as a fraction of the native area (cost); default: the extension's PASS_AREA")
    parser.add_argument("--fractions", default="1,0.75,0.5,0.35,0.25,0.125,0.0625", help="area fractions (grid)")
    args = parser.parse_args(argv)
    families = [f for f in args.families.split(",") if f]
    if args.grid:
        result = {"grid": grid(families, [float(v) for v in args.fractions.split(",")])}
    else:
        result = {"cost": cost(families, args.area), "area_fraction": args.area}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
