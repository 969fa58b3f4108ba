"""One generation in the WebUI: prepare the region tokens, run the fusion hooks, clean up.

The only code besides ui.py/models.py that talks to the host. Host facts it relies on are in
docs/HOST_NOTES.md; `modules` is imported lazily so this file can be imported without the WebUI.
"""

import logging
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from ..adapter import RegionEncoder, RegionTokens
from ..cache import BoundedCache
from ..checkpoint import IPAdapterWeights, load_ip_adapter
from ..clip_vision import load_clip_vision
from ..errors import CharacterAdapterError
from ..fusion import FusionConfig, FusionSession, RowPlan
from ..hooks import HookSession, clear_stale
from ..images import image_hash, load_image
from ..layers import check_adapter_layers, find_attn2_layers
from ..params import Params
from ..reference import fit_for_encoding, noise_latent, segment_reference, segmentation_prompt
from ..segmentation import SegmentationResult, mask_overlay, region_crops
from ..tokens import phrase_positions

log = logging.getLogger("character_adapter")

# short side the reference is encoded at: the resolution each model family was trained at
REFERENCE_SIDE = {"sd15": 512, "sdxl": 1024}

ADAPTER_CACHE = BoundedCache(2)  # path -> IPAdapterWeights
ENCODER_CACHE = BoundedCache(1)  # path -> CLIP vision model
SEGMENTATION_CACHE = BoundedCache(16)  # reference + settings + model -> Reference


@dataclass
class Reference:
    """What one reference gives, for one model and one set of region settings."""

    tokens: RegionTokens
    segmentation: Optional[SegmentationResult]
    boxes: Optional[List[Tuple[int, int, int, int]]]  # region crops in reference pixels
    empty_regions: Tuple[str, ...]


class Generation:
    """Per-generation state of one script instance (one tab): never stored on `p` or modules."""

    def __init__(self, params: Params, weights: IPAdapterWeights, reference: Reference, image_hash: str,
                 image: Image.Image):
        self.params = params
        self.image = image
        self.weights = weights
        self.reference = reference
        self.image_hash = image_hash
        self.fusion: Optional[FusionSession] = None
        self.p: Any = None
        self.hires = False
        self.prompt_groups: Dict[str, Tuple[Tuple[int, ...], ...]] = {}
        self.missing_phrases: set = set()


class Controller:
    """What the Script delegates to; one per script instance."""

    def __init__(self, resolve_model):
        self.resolve_model = resolve_model  # (kind, name) -> path, or raise CharacterAdapterError
        self.generation: Optional[Generation] = None
        self.error: Optional[str] = None
        self._error_hooks: Optional[HookSession] = None

    # ---- run start -----------------------------------------------------------------------

    def process(self, p, args: Sequence[Any]) -> None:
        """Run start: clear leftovers, validate settings, prepare tokens (or remember the error)."""
        self.end()
        unet = _unet(p.sd_model)
        if unet is not None:
            clear_stale(unet)  # a crashed run skips postprocess
        try:
            params = Params.from_args(args)
        except CharacterAdapterError as err:
            self.error = str(err)
            return self._report(p)
        if not params.enabled:
            return None
        try:
            self.generation = self._prepare(p, params)
        except CharacterAdapterError as err:
            self.error = str(err)
            return self._report(p)
        gen = self.generation
        p.extra_generation_params.update(params.to_infotext(gen.image_hash))
        for name in gen.reference.empty_regions:
            p.comment(f"Character-Adapter: region '{name}' was not found in the reference; "
                      f"its crop is the whole image.")
        return None

    def _report(self, p) -> None:
        log.error("%s", self.error)
        p.comment(self.error)

    def _prepare(self, p, params: Params) -> Generation:
        from modules import shared

        if params.image is None:
            raise CharacterAdapterError("Character-Adapter: no reference image: drop one in the accordion")
        image = load_image(params.image)
        if not params.model:
            raise CharacterAdapterError("Character-Adapter: choose an IP-Adapter model (none is selected)")
        adapter_path = self.resolve_model("adapter", params.model)
        weights = ADAPTER_CACHE.get_or_create(adapter_path, lambda: load_ip_adapter(adapter_path))
        _check_architecture(p.sd_model, weights)
        encoder_path = self.resolve_model("encoder", params.encoder or ("auto:" + weights.spec.encoder))
        reference_hash = image_hash(image)  # reads every pixel: once
        key = (reference_hash, params.regions, params.timestep, params.crop, getattr(p.sd_model, "sd_model_hash", None),
               id(_unet(p.sd_model)), adapter_path, encoder_path)
        shared.state.textinfo = "Character-Adapter: segmenting the reference"
        reference = SEGMENTATION_CACHE.get_or_create(
            key, lambda: self._reference(p.sd_model, image, params, weights, encoder_path))
        return Generation(params, weights, reference, reference_hash, image)

    def _reference(self, sd_model, image: Image.Image, params: Params, weights: IPAdapterWeights,
                   encoder_path: str) -> Reference:
        from modules import shared

        clip = ENCODER_CACHE.get_or_create(encoder_path, lambda: load_clip_vision(encoder_path))
        segmentation = boxes = None
        empty: List[str] = []
        if params.regions:
            segmentation = _segment(sd_model, image, params)
            boxes = segmentation.boxes(image.size, params.crop)
            crops = region_crops(image, boxes)
            empty = [r.reference_phrase for r, e in zip(params.regions, segmentation.empty) if e]
        else:
            crops = [image]
        try:
            clip.to(_device())
            tokens = RegionEncoder(weights, clip).encode(crops)
        finally:
            if getattr(shared.cmd_opts, "lowvram", False) or getattr(shared.cmd_opts, "medvram", False):
                clip.to("cpu")
        return Reference(tokens, segmentation, boxes, tuple(empty))

    # ---- sampling ------------------------------------------------------------------------

    def before_sampling(self, p, x: torch.Tensor) -> None:
        """Each sampling start (hires too): (re)install the fusion hooks for this pass."""
        unet = _unet(p.sd_model)
        if self.error is not None:
            return self._stop_generation(unet)
        gen = self.generation
        if gen is None or unet is None:
            return None
        _check_architecture(p.sd_model, gen.weights)
        layers = find_attn2_layers(unet)
        check_adapter_layers(layers, gen.weights.layers, gen.weights.source)
        previous = gen.fusion
        if previous is not None and previous.unet is not unet:
            previous.remove()  # hires checkpoint: a different UNet
            previous = None
        if previous is None:
            params = gen.params
            config = FusionConfig(
                weight=params.weight, region_weights=tuple(r.weight for r in params.regions),
                start=params.start, end=params.end, mode=params.fusion,
                temperature=params.temperature, background=params.background,
            )
            ip = [(k.float(), v.float()) for k, v in gen.weights.layers]
            gen.fusion = FusionSession(unet, layers, ip, gen.reference.tokens.cond,
                                       gen.reference.tokens.negative, config)
            gen.fusion.install()
        gen.p = p
        gen.hires = bool(getattr(p, "is_hr_pass", False))
        steps = int(getattr(p, "hr_second_pass_steps", 0) or p.steps) if gen.hires else int(p.steps)
        gen.fusion.begin_pass(tuple(x.shape[-2:]), steps)
        return None

    def _stop_generation(self, unet) -> None:
        """Generation must not go on silently without the adapter: raise inside the UNet."""
        message = self.error

        def refuse(module, args):
            raise CharacterAdapterError(message)

        if unet is None or self._error_hooks is not None:
            return
        session = HookSession(root=unet)
        session.add_forward_pre_hook(unet, refuse, label="charadapter.error")
        self._error_hooks = session.install()

    def on_cfg_denoiser(self, params) -> None:
        """Before each denoiser call: the step and which rows are cond / uncond, per image."""
        gen = self.generation
        if gen is None or gen.fusion is None or not gen.fusion.installed:
            return
        denoiser = getattr(params, "denoiser", None)
        step = getattr(denoiser, "step", None)
        total = getattr(denoiser, "total_steps", None)
        if step is None or not total:
            step, total = params.sampling_step, params.total_sampling_steps
        gen.fusion.total_steps = max(int(total), 1)
        gen.fusion.begin_step(int(step), self._row_plan(gen, params, int(step)))

    def _row_plan(self, gen: Generation, params, step: int) -> RowPlan:
        text_cond = params.text_cond
        cond_rows = int((text_cond["crossattn"] if isinstance(text_cond, dict) else text_cond).shape[0])
        rows = int(params.x.shape[0])
        images = max(rows - cond_rows, 1)
        prompts = _prompts(gen.p, gen.hires, images)
        is_cond, image, groups = [], [], []
        for i in range(images):
            subprompts = _subprompts(prompts[i] if i < len(prompts) else "")
            per_image = cond_rows // images if cond_rows % images == 0 else 1
            for j in range(per_image):
                is_cond.append(True)
                image.append(i)
                text = _scheduled(subprompts[j] if j < len(subprompts) else subprompts[-1], step, gen.p)
                groups.append(self._groups(gen, text))
        while len(is_cond) < cond_rows:  # uneven AND counts: extra rows go to the last image
            is_cond.append(True)
            image.append(images - 1)
            groups.append(groups[-1] if groups else None)
        for i in range(rows - cond_rows):
            is_cond.append(False)
            image.append(i)
            groups.append(None)
        return RowPlan(tuple(is_cond), tuple(image), tuple(groups))

    def _groups(self, gen: Generation, text: str) -> Tuple[Tuple[int, ...], ...]:
        """Token positions of each region's generation phrase in `text` (host tokenizer)."""
        found = gen.prompt_groups.get(text)
        if found is None:
            model = gen.p.sd_model
            chunks = _prompt_chunks(model, text)
            found = tuple(tuple(phrase_positions(chunks, _phrase_ids(model, r.phrase)))
                          for r in gen.params.regions)
            for region, positions in zip(gen.params.regions, found):
                if not positions and region.phrase not in gen.missing_phrases:
                    gen.missing_phrases.add(region.phrase)
                    gen.p.comment(
                        f"Character-Adapter: '{region.phrase}' is not in the prompt, so that region "
                        f"cannot be located in the image and gets almost no weight; add the phrase "
                        f"to the prompt or change the region's generation phrase.")
            gen.prompt_groups[text] = found
        return found

    # ---- run end -------------------------------------------------------------------------

    def postprocess(self, p, processed) -> None:
        """Run end: masks to the gallery when asked, then remove every hook."""
        gen = self.generation
        try:
            if gen is not None and gen.params.show_masks:
                self._show_masks(gen, processed)
        finally:
            self.end()

    def end(self) -> None:
        """Remove every hook of ours and forget the generation (also on errors and unload)."""
        gen, self.generation = self.generation, None
        hooks, self._error_hooks = self._error_hooks, None
        self.error = None
        try:
            if gen is not None and gen.fusion is not None:
                gen.fusion.remove()
        finally:
            if hooks is not None:
                hooks.remove()

    def _show_masks(self, gen: Generation, processed) -> None:
        extra = []
        reference = gen.reference
        if reference.segmentation is not None:  # rendered only when asked for
            extra.append(reference.segmentation.to_overlay(gen.image, boxes=reference.boxes))
        layout = gen.fusion.masks if gen.fusion is not None else None
        if layout is not None and gen.fusion.latent_hw is not None:
            h, w = gen.fusion.latent_hw
            for index, img in enumerate(list(processed.images)[: layout.shape[0]]):
                labels = layout[index].reshape(-1, h, w).argmax(dim=0).numpy() - 1  # background -> -1
                extra.append(mask_overlay(img, labels.astype(np.int64)))
        processed.images.extend(extra)
        processed.infotexts.extend([processed.infotexts[0] if processed.infotexts else ""] * len(extra))


# ---- host helpers ----------------------------------------------------------------------------


def _device() -> torch.device:
    from modules import devices

    return devices.device


def _unet(sd_model) -> Optional[torch.nn.Module]:
    model = getattr(sd_model, "model", None)
    return getattr(model, "diffusion_model", None)


def _check_architecture(sd_model, weights: IPAdapterWeights) -> None:
    """An SDXL adapter on an SD1.5 model (or the reverse) stops with a clear message."""
    model_arch = "sdxl" if getattr(sd_model, "is_sdxl", False) else "sd15"
    if getattr(sd_model, "is_sd2", False):
        model_arch = "sd2"
    if model_arch != weights.spec.arch:
        raise CharacterAdapterError(
            f"Character-Adapter: {weights.source} is an {weights.spec.arch.upper()} adapter but the loaded "
            f"checkpoint is {model_arch.upper()}: choose a matching IP-Adapter model"
        )


def _prompts(p, hires: bool, images: int) -> List[str]:
    prompts = list(getattr(p, "hr_prompts", None) or []) if hires else []
    return prompts or list(getattr(p, "prompts", None) or [getattr(p, "prompt", "")] * images)


def _subprompts(prompt: str) -> List[str]:
    """The AND sub-prompts of a prompt, as the WebUI splits them."""
    from modules import prompt_parser

    _, flat, _ = prompt_parser.get_multicond_prompt_list([prompt])
    return list(flat) or [prompt]


def _scheduled(text: str, step: int, p) -> str:
    """The prompt-editing variant of `text` in force at `step`."""
    from modules import prompt_parser

    schedules = prompt_parser.get_learned_conditioning_prompt_schedules([text], max(int(p.steps), 1))[0]
    for end_at, variant in schedules:
        if step <= end_at:
            return variant
    return schedules[-1][1]


def _prompt_chunks(sd_model, text: str) -> List[List[int]]:
    """The 77-token chunks (BOS/EOS included) the host encodes `text` into."""
    batch_chunks, _ = sd_model.cond_stage_model.process_texts([text])
    return [list(chunk.tokens) for chunk in batch_chunks[0]]


def _phrase_ids(sd_model, phrase: str) -> List[int]:
    return list(sd_model.cond_stage_model.tokenize([phrase])[0])


def _segment(sd_model, image: Image.Image, params: Params) -> SegmentationResult:
    """Encode the reference, noise it to T, one UNet pass with the region phrases, masks."""
    from modules import devices

    unet = _unet(sd_model)
    short_side = REFERENCE_SIDE["sdxl" if getattr(sd_model, "is_sdxl", False) else "sd15"]
    width, height = fit_for_encoding(image.size, short_side)
    pixels = np.asarray(image.resize((width, height), Image.LANCZOS), dtype=np.float32) / 127.5 - 1.0
    pixels = torch.from_numpy(pixels).permute(2, 0, 1)[None]  # (1, 3, H, W) in [-1, 1]
    phrases = [r.reference_phrase for r in params.regions]
    prompt = segmentation_prompt(phrases)
    chunks = _prompt_chunks(sd_model, prompt)
    groups = [phrase_positions(chunks, _phrase_ids(sd_model, phrase)) for phrase in phrases]
    for phrase, group in zip(phrases, groups):
        if not group:
            raise CharacterAdapterError(f"Character-Adapter: region phrase {phrase!r} gives no tokens")
    with torch.no_grad():
        vae_dtype = getattr(devices, "dtype_vae", torch.float32)
        latent = sd_model.get_first_stage_encoding(
            sd_model.encode_first_stage(pixels.to(devices.device, vae_dtype)))
        cond = sd_model.get_learned_conditioning([prompt])
        noisy = noise_latent(latent, sd_model.alphas_cumprod.float().cpu(), params.timestep)
        timestep = torch.tensor([float(params.timestep)], device=noisy.device)
        cond = _with_concat(sd_model, cond, noisy)
        result, _ = segment_reference(unet, find_attn2_layers(unet),
                                      lambda: sd_model.apply_model(noisy, timestep, cond),
                                      tuple(noisy.shape[-2:]), groups)
    return result


def _with_concat(sd_model, cond, latent: torch.Tensor):
    """Inpainting models also take a concat input: an all-masked, empty image for this pass."""
    model = getattr(sd_model, "model", None)
    if getattr(model, "conditioning_key", None) != "hybrid":
        return cond
    channels = int(_unet(sd_model).input_blocks[0][0].in_channels) - latent.shape[1]
    concat = torch.zeros(latent.shape[0], channels, *latent.shape[-2:], device=latent.device, dtype=latent.dtype)
    concat[:, :1] = 1.0  # mask channel: everything to be painted
    crossattn = cond["crossattn"] if isinstance(cond, dict) else cond
    return {"c_concat": [concat], "c_crossattn": [crossattn]}
