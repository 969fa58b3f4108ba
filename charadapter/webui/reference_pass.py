"""The reference side of a generation, per character: load its adapter and image encoder, segment
its reference with the loaded UNet (VAE encode, noise to T, one pass with the region phrases), crop
it per region and encode the crops; each step is cached (caches.py), so a reference is segmented
and encoded once, however many generations, X/Y/Z cells or characters use it.

`modules` is imported inside the functions that need it, so importing this file needs no WebUI.
"""

from dataclasses import dataclass
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple

import torch
from PIL import Image

from ..adapter import RegionEncoder, RegionTokens
from ..checkpoint import IPAdapterWeights, load_ip_adapter
from ..clip_vision import load_clip_vision
from ..errors import InputError
from ..images import MIN_REFERENCE_SIDE, image_hash, load_image
from ..layers import find_attn2_layers
from ..params import Character, Params
from ..reference import PASS_AREA, noise_latent, pass_pixels, segment_reference, segmentation_prompt
from ..segmentation import SegmentationResult, region_crops
from ..tokens import unplaced_phrase
from .caches import ADAPTER_CACHE, ENCODER_CACHE, REFERENCE_CACHE, SEGMENTATION_CACHE
from .host import check_architecture, device, low_vram, progress, unet_of
from .prompts import phrase_groups, phrase_ids
from .settings import apply_cache_settings

ResolveModel = Callable[[str, str], str]  # (kind, listed name) -> path, or raise InputError


@dataclass
class Reference:
    """What one reference gives, for one model and one set of region settings."""

    tokens: RegionTokens
    segmentation: Optional[SegmentationResult]
    boxes: Optional[List[Tuple[int, int, int, int]]]  # region crops in reference pixels
    empty_regions: Tuple[str, ...]


class Prepared(NamedTuple):
    """One character's reference, ready for sampling."""

    image: Image.Image
    image_hash: str
    weights: IPAdapterWeights
    reference: Reference


def prepare(p, params: Params, character: Character, resolve_model: ResolveModel) -> Prepared:
    """Check and load what `character` names, then its reference's region tokens (cached)."""
    if character.image is None:
        raise InputError("Character-Adapter: no reference image: drop one in the accordion")
    image = load_image(character.image, min_side=MIN_REFERENCE_SIDE)
    if not character.model:
        raise InputError("Character-Adapter: choose an IP-Adapter model (none is selected)")
    apply_cache_settings()
    adapter_path = resolve_model("adapter", character.model)
    weights = ADAPTER_CACHE.get_or_create(adapter_path, lambda: load_ip_adapter(adapter_path))
    check_architecture(p.sd_model, weights)
    encoder_path = resolve_model("encoder", character.encoder or ("auto:" + weights.spec.encoder))
    reference_hash = image_hash(image)  # reads every pixel: once
    # masks depend on the model and the reference phrases only: an adapter sweep segments once
    phrases = tuple(r.reference_phrase for r in character.regions)
    masks_key = (reference_hash, phrases, params.timestep, params.crop,
                 getattr(p.sd_model, "sd_model_hash", None), id(unet_of(p.sd_model)))
    reference = REFERENCE_CACHE.get_or_create(
        masks_key + (adapter_path, encoder_path),
        lambda: encode_reference(p.sd_model, image, phrases, params.timestep, params.crop, weights,
                                 encoder_path, masks_key))
    return Prepared(image, reference_hash, weights, reference)


def encode_reference(sd_model, image: Image.Image, phrases: Sequence[str], timestep: int, crop: str,
                     weights: IPAdapterWeights, encoder_path: str, masks_key: tuple) -> Reference:
    """Segment the reference (cached under `masks_key`), crop it and encode one token set per region.

    The UNet pass runs before the image encoder is loaded, so the two never share memory on a
    first run; an encoder already loaded is checked against the adapter before the pass."""
    clip = ENCODER_CACHE.get(encoder_path)
    encoder = None if clip is None else RegionEncoder(weights, clip)  # a mismatched pair stops before the pass
    segmentation = boxes = None
    empty: List[str] = []
    if phrases:
        segmentation = SEGMENTATION_CACHE.get_or_create(masks_key, lambda: segment_with_progress(
            sd_model, image, phrases, timestep))
        boxes = segmentation.boxes(image.size, crop)
        crops = region_crops(image, boxes)
        empty = [phrase for phrase, e in zip(phrases, segmentation.empty) if e]
    else:
        crops = [image]
    if encoder is None:
        with progress("Character-Adapter: loading the image encoder"):
            clip = ENCODER_CACHE.get_or_create(encoder_path, lambda: load_clip_vision(encoder_path))
            encoder = RegionEncoder(weights, clip)
    with progress("Character-Adapter: encoding the reference"):
        tokens = encode_on_device(sd_model, encoder, crops)
    return Reference(tokens, segmentation, boxes, tuple(empty))


def encode_on_device(sd_model, encoder: RegionEncoder, crops: List[Image.Image]) -> RegionTokens:
    """The crops' tokens, the encoder on the WebUI's device. With --medvram / --lowvram it gets
    the device to itself and goes back to the CPU after, as the WebUI's interrogator does
    (modules/interrogate.py): send_everything_to_cpu first, torch_gc after."""
    from modules import devices, lowvram

    offload = low_vram(sd_model)
    if offload:
        lowvram.send_everything_to_cpu()
    try:
        encoder.clip_model.to(device())
        return encoder.encode(crops)
    finally:
        if offload:
            encoder.clip_model.to("cpu")
            devices.torch_gc()


def segment_with_progress(sd_model, image: Image.Image, phrases: Sequence[str], timestep: int) -> SegmentationResult:
    with progress("Character-Adapter: segmenting the reference"):
        return segment(sd_model, image, phrases, timestep)


def segment(sd_model, image: Image.Image, phrases: Sequence[str], timestep: int) -> SegmentationResult:
    """Encode the reference, noise it to T, one UNet pass with the region phrases, masks.

    The VAE and the UNet are called through the model (encode_first_stage, apply_model), so the
    WebUI's --medvram / --lowvram hooks move them to the device as for its own passes. Everything
    the pass made is dropped and the device cache emptied before sampling starts."""
    from modules import devices

    unet = unet_of(sd_model)
    pixels = pass_pixels(image, PASS_AREA["sdxl" if getattr(sd_model, "is_sdxl", False) else "sd15"])
    phrases = list(phrases)
    prompt = segmentation_prompt(phrases)
    groups = phrase_groups(sd_model, prompt, phrases)
    for phrase, group in zip(phrases, groups):
        if not group:
            raise InputError(
                f"Character-Adapter: {unplaced_phrase(phrase, len(phrase_ids(sd_model, phrase)))}")
    try:
        with torch.no_grad():
            vae_dtype = getattr(devices, "dtype_vae", torch.float32)
            pixels = pixels.to(devices.device, vae_dtype)
            latent = vae_latent(sd_model, pixels)
            cond = sd_model.get_learned_conditioning([prompt])
            noisy = noise_latent(latent, sd_model.alphas_cumprod.float().cpu(), timestep)
            t = torch.tensor([float(timestep)], device=noisy.device)
            cond = with_concat(sd_model, cond, noisy, pixels)
            del latent, pixels

            def run_unet():
                # the host's apply_model casts to dtype_unet under autocast (sd_hijack_unet.apply_model);
                # autocast here too, for hosts that only autocast around sampling (processing.py)
                with devices.autocast():
                    sd_model.apply_model(noisy, t, cond)  # the output is not needed: only the maps

            result, _ = segment_reference(unet, find_attn2_layers(unet), run_unet, tuple(noisy.shape[-2:]), groups)
        return result
    finally:
        devices.torch_gc()


def vae_latent(sd_model, pixels: torch.Tensor) -> torch.Tensor:
    """The VAE latent of `pixels` in [-1, 1]: the posterior's mode, so the same reference always
    gives the same masks (ldm's get_first_stage_encoding would sample it with the global RNG)."""
    posterior = sd_model.encode_first_stage(pixels)
    if not isinstance(posterior, torch.Tensor) and hasattr(posterior, "mode"):  # sgm returns the latent
        posterior = posterior.mode()
    return sd_model.get_first_stage_encoding(posterior)


def with_concat(sd_model, cond, latent: torch.Tensor, pixels: torch.Tensor):
    """Inpainting models (conditioning_key "hybrid") also take a mask and a masked image: the
    reference pass gets what the host gives txt2img, everything masked and a grey image
    (processing.py (txt2img_image_conditioning))."""
    model = getattr(sd_model, "model", None)
    if getattr(model, "conditioning_key", None) != "hybrid":
        return cond
    grey = vae_latent(sd_model, torch.zeros_like(pixels))
    mask = torch.ones(latent.shape[0], 1, *latent.shape[-2:], device=latent.device, dtype=latent.dtype)
    concat = torch.cat([mask, grey.to(device=latent.device, dtype=latent.dtype)], dim=1)
    crossattn = cond["crossattn"] if isinstance(cond, dict) else cond
    return {"c_concat": [concat], "c_crossattn": [crossattn]}
