"""Prompt-guided segmentation of the reference with the loaded UNet (host-free part).

The host VAE-encodes the reference and runs its UNet once; this module noises the latent,
captures the text cross-attention maps of the region phrases through forward hooks on the
map layers, and turns them into masks and crops (charadapter.segmentation).
"""

import math
from typing import Callable, List, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from .errors import CharacterAdapterError
from .geometry import Size, resize_maps
from .hooks import HookSession, RegionState, plan_region_hooks
from .layers import DEFAULT_MAP_LEVELS, AttnLayer, map_layers
from .segmentation import SegmentationResult, masks_from_maps

SEGMENTATION_SEED = 650  # fixed: the same reference gives the same masks every time


def segmentation_prompt(phrases: Sequence[str]) -> str:
    """The prompt of the segmentation pass: the region phrases, comma-separated."""
    return ", ".join(phrases)


def noise_latent(latent: torch.Tensor, alphas_cumprod: torch.Tensor, timestep: int,
                 seed: int = SEGMENTATION_SEED) -> torch.Tensor:
    """q(x_t | x_0) with the model's own schedule and a fixed seed: sqrt(a) x0 + sqrt(1-a) eps."""
    if not 0 <= timestep < alphas_cumprod.shape[0]:
        raise CharacterAdapterError(
            f"segmentation timestep {timestep} is outside the model's schedule 0..{alphas_cumprod.shape[0] - 1}"
        )
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    noise = torch.randn(latent.shape, generator=generator, dtype=torch.float32).to(latent.device)
    alpha = alphas_cumprod[timestep].to(device=latent.device, dtype=torch.float32)
    return (alpha.sqrt() * latent.float() + (1.0 - alpha).sqrt() * noise).to(latent.dtype)


def capture_region_maps(
    unet: torch.nn.Module,
    layers: Sequence[AttnLayer],
    chosen: Sequence[AttnLayer],
    run_unet: Callable[[], object],
    token_groups: Sequence[Sequence[int]],
    row: int = 0,
) -> List[Tuple[Size, torch.Tensor, int]]:
    """Run the UNet once with the region hooks recording maps on `chosen`; no image term is added.

    Returns (grid, maps (R, N), layers) per grid of the chosen layers, for batch row `row`: text
    attention of each region's tokens, mean over heads and tokens, summed over the grid's layers,
    from the q and k the host computed itself.
    """
    if not token_groups or any(len(group) == 0 for group in token_groups):
        raise CharacterAdapterError(f"every region phrase needs at least one token, got {list(token_groups)}")
    recorded: List[Tuple[Size, torch.Tensor, int]] = []
    regions = len(token_groups)

    def keep_maps(state: RegionState) -> None:
        for hw, maps in sorted(state.grid_maps.items()):  # maps (B, h, w, R+1): background column first
            grid = maps[row, ..., 1:].reshape(hw[0] * hw[1], regions).t()  # (R, N)
            recorded.append((hw, grid.float().cpu(), state.grid_layers[hw]))

    # maps only (add_term False); plan_region_hooks wants one (k, v) per layer: a zero token each
    kv = [(torch.zeros(1, 1, 1, layer.inner_dim), torch.zeros(1, 1, 1, layer.inner_dim)) for layer in layers]
    state = RegionState(kv=kv, weights=torch.zeros(1), map_layers=frozenset(l.index for l in chosen),
                        token_groups=[list(g) for g in token_groups], after_call=keep_maps, add_term=False)
    session = HookSession(root=unet)
    plan_region_hooks(session, unet, layers, state)
    try:
        with session, torch.no_grad():
            run_unet()
    finally:
        state.clear_call()  # the maps on the device: what is needed was copied out
    if sum(count for _, _, count in recorded) != len(chosen):
        raise CharacterAdapterError(
            f"the segmentation pass recorded maps on {sum(c for _, _, c in recorded)} of {len(chosen)} "
            f"attention layers"
        )
    return recorded


def segment_reference(
    unet: torch.nn.Module,
    layers: Sequence[AttnLayer],
    run_unet: Callable[[], object],
    latent_hw: Size,
    token_groups: Sequence[Sequence[int]],
    levels: Sequence[int] = DEFAULT_MAP_LEVELS,
    threshold: float = 0.5,
) -> Tuple[SegmentationResult, torch.Tensor]:
    """Masks of the reference's regions and the aggregated maps (R, h, w) they came from."""
    chosen = map_layers(layers, levels)
    if not chosen:
        raise CharacterAdapterError("the UNet has no cross-attention layers to segment with")
    grids = capture_region_maps(unet, layers, chosen, run_unet, token_groups)
    # the mean over layers on the latent grid; resizing is linear, so each grid's sum is resized once
    total = sum(resize_maps(maps, hw, latent_hw) for hw, maps, _ in grids) / len(chosen)  # (R, h*w)
    maps = total.reshape(len(token_groups), latent_hw[0], latent_hw[1])  # (R, h, w)
    return masks_from_maps(maps, threshold=threshold), maps


# pixels of the reference pass per model family: SD1.5 at its native 512x512; SDXL at half its
# native 1024x1024, where the map grid loses next to nothing and the pass needs half the memory
# (README "Reference pass"; python -m charadapter.bench_pass, python -m toyworld.pass_size)
PASS_AREA = {"sd15": 512 * 512, "sdxl": 1024 * 1024 // 2}
PASS_MULTIPLE = 64  # pixels: a latent side divisible by 8, as the UNet's three halvings need
MAX_PASS_ASPECT = 4.0  # long side / short side of the pass; a thinner reference is squeezed to it


def pass_size(size: Tuple[int, int], area: int, multiple: int = PASS_MULTIPLE,
              max_aspect: float = MAX_PASS_ASPECT) -> Tuple[int, int]:
    """(W, H) of the reference pass: at most `area` pixels, sides multiples of `multiple`, the
    image's aspect clamped to 1:max_aspect .. max_aspect:1; among the sizes that fit, the one
    closest in aspect, then in area (an aspect error counts twice an area shortfall)."""
    width, height = size
    if width <= 0 or height <= 0 or area < multiple * multiple:
        raise CharacterAdapterError(f"cannot size a {width}x{height} reference pass to {area} pixels")
    aspect = min(max(width / height, 1.0 / max_aspect), max_aspect)
    longest = int(math.sqrt(area * max_aspect)) // multiple * multiple  # a side of the thinnest pass
    sides = range(multiple, max(longest, multiple) + 1, multiple)
    best, best_cost = (multiple, multiple), math.inf
    for w in sides:
        for h in sides:
            if w * h > area:
                break
            cost = abs(math.log(w / h / aspect)) + 0.5 * math.log(area / (w * h))
            if cost < best_cost:
                best, best_cost = (w, h), cost
    return best


def pass_pixels(image: Image.Image, area: int) -> torch.Tensor:
    """The reference as the VAE takes it: (1, 3, H, W) in [-1, 1] at pass_size's size."""
    width, height = pass_size(image.size, area)
    pixels = np.asarray(image.resize((width, height), Image.LANCZOS), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(pixels).permute(2, 0, 1)[None]  # (H, W, 3) -> (1, 3, H, W)
