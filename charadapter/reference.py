"""Prompt-guided segmentation of the reference with the loaded UNet (host-free part).

The host VAE-encodes the reference and runs its UNet once; this module noises the latent,
captures the text cross-attention maps of the region phrases through forward hooks on the
map layers, and turns them into masks and crops (charadapter.segmentation).
"""

from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from .errors import CharacterAdapterError
from .geometry import Size
from .hooks import HookSession, RegionState, plan_region_hooks
from .layers import DEFAULT_MAP_LEVELS, AttnLayer, map_layers
from .segmentation import SegmentationResult, aggregate_maps, masks_from_maps

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
) -> List[Tuple[Size, torch.Tensor]]:
    """Run the UNet once with the region hooks recording maps on `chosen`; no image term is added.

    Returns (grid, maps (R, N)) per chosen layer for batch row `row`: text attention of each
    region's tokens, mean over heads and tokens, from the q and k the host computed itself.
    """
    if not token_groups or any(len(group) == 0 for group in token_groups):
        raise CharacterAdapterError(f"every region phrase needs at least one token, got {list(token_groups)}")
    recorded: List[Tuple[Size, torch.Tensor]] = []

    def keep_maps(state: RegionState) -> None:
        recorded.extend((hw, maps[row].float().cpu()) for _, (hw, maps) in sorted(state.maps.items()))

    # maps only (add_term False); plan_region_hooks wants one (k, v) per layer: a zero token each
    kv = [(torch.zeros(1, 1, 1, layer.inner_dim), torch.zeros(1, 1, 1, layer.inner_dim)) for layer in layers]
    state = RegionState(kv=kv, weights=torch.zeros(1), map_layers=frozenset(l.index for l in chosen),
                        token_groups=[list(g) for g in token_groups], after_call=keep_maps, add_term=False)
    session = HookSession(root=unet)
    plan_region_hooks(session, unet, layers, state)
    with session, torch.no_grad():
        run_unet()
    if len(recorded) != len(chosen):
        raise CharacterAdapterError(
            f"the segmentation pass recorded maps on {len(recorded)} of {len(chosen)} attention layers"
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
    layer_maps = capture_region_maps(unet, layers, chosen, run_unet, token_groups)
    maps = aggregate_maps([m for _, m in layer_maps], latent_hw)  # (R, h, w)
    return masks_from_maps(maps, threshold=threshold), maps


def fit_for_encoding(size: Tuple[int, int], short_side: int, multiple: int = 64,
                     max_long_side: Optional[int] = None) -> Tuple[int, int]:
    """(W, H) to encode an image at: short side ~ `short_side`, aspect kept, multiples of 64."""
    width, height = size
    scale = short_side / min(width, height)
    long_cap = max_long_side or short_side * 2
    scale = min(scale, long_cap / max(width, height))

    def snap(v: float) -> int:
        return max(multiple, int(round(v / multiple)) * multiple)

    return snap(width * scale), snap(height * scale)


def encoding_pixels(image: Image.Image, short_side: int) -> torch.Tensor:
    """The reference as the VAE takes it: (1, 3, H, W) in [-1, 1] at fit_for_encoding's size."""
    width, height = fit_for_encoding(image.size, short_side)
    pixels = np.asarray(image.resize((width, height), Image.LANCZOS), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(pixels).permute(2, 0, 1)[None]  # (H, W, 3) -> (1, 3, H, W)
