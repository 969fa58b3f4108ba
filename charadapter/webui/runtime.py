"""One generation in the WebUI: prepare the region tokens, run the fusion hooks, clean up.

The only code besides ui.py/models.py that talks to the host. Host facts it relies on are in
docs/HOST_NOTES.md; `modules` is imported lazily so this file can be imported without the WebUI.
"""

import contextlib
import logging
import traceback
import weakref
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
from ..fusion import COND, UNCOND, FusionConfig, FusionSession, RowPlan
from ..hooks import HookSession, MarkedHook, clear_stale
from ..images import MIN_REFERENCE_SIDE, image_hash, load_image
from ..layers import check_adapter_layers, find_attn2_layers
from ..params import Params
from ..reference import fit_for_encoding, noise_latent, segment_reference, segmentation_prompt
from ..segmentation import SegmentationResult, mask_overlay, region_crops
from ..tokens import phrase_positions
from . import models

log = logging.getLogger("character_adapter")

# short side the reference is encoded at: the resolution each model family was trained at
REFERENCE_SIDE = {"sd15": 512, "sdxl": 1024}

ADAPTER_CACHE = BoundedCache(models.DEFAULT_ADAPTERS_LOADED)  # path -> IPAdapterWeights
ENCODER_CACHE = BoundedCache(1)  # path -> CLIP vision model
SEGMENTATION_CACHE = BoundedCache(models.DEFAULT_SEGMENTATION_CACHE)  # reference + phrases + model -> masks
REFERENCE_CACHE = BoundedCache(models.DEFAULT_SEGMENTATION_CACHE)  # the same + adapter + encoder -> Reference
_CACHE_SETTINGS = (
    (models.SETTING_SEGMENTATION_CACHE, SEGMENTATION_CACHE, models.DEFAULT_SEGMENTATION_CACHE),
    (models.SETTING_SEGMENTATION_CACHE, REFERENCE_CACHE, models.DEFAULT_SEGMENTATION_CACHE),
    (models.SETTING_ADAPTERS_LOADED, ADAPTER_CACHE, models.DEFAULT_ADAPTERS_LOADED),
)


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
        self.row_check: Optional[RowCheck] = None
        self.p: Any = None
        self.hires = False
        self.prompt_groups: Dict[str, Tuple[Tuple[int, ...], ...]] = {}
        self.missing_phrases: set = set()

    def remove_hooks(self) -> None:
        """Remove the fusion hooks and the row check; safe to call twice."""
        check, self.row_check = self.row_check, None
        try:
            if self.fusion is not None:
                self.fusion.remove()
        finally:
            if check is not None:
                check.remove()


class RowCheck:
    """Which rows of a UNet call are cond / uncond, from the rows themselves, where the step's
    row plan (matched in call order) cannot know: an extra UNet call another extension makes
    within a step (Self-Attention Guidance runs the uncond rows again after CFG).

    First choice, sd-webui-controlnet's `cond_mark` (B,1,1,1), 1 = cond: its replacement of
    `diffusion_model.forward` assigns a new one on every call, after module pre-hooks ran, and
    never deletes it (HOST_NOTES §15). It is read at the call's first attn2 and trusted only if
    it was assigned during this call (another object than at UNet entry, the call's batch) and
    came from marked text rows (the UNet got one token more than attn2 does; unmarked rows, as in
    the hires pass, give all ones). Else each row's text context is compared with the step's
    cond and uncond rows (on_cfg_denoiser); rows matching both or neither leave the plan alone.
    A call whose rows disagree with the plan gets the token sets found here and gives no maps.
    """

    def __init__(self, unet: torch.nn.Module, layers: Sequence[Any], state: Any):
        self.unet = unet
        self.state = state
        self.corrected_calls = 0  # diagnostics and tests
        self._cond: Optional[torch.Tensor] = None  # the step's cond rows (R, T, C)
        self._uncond: Optional[torch.Tensor] = None  # the step's uncond rows (U, T, C)
        self._before: Any = None
        self._entry_tokens: Optional[int] = None
        self._pending = False
        self._session = HookSession()  # no root: clearing "stale" hooks would drop the fusion's
        self._session.add_forward_pre_hook(unet, self._enter_unet, with_kwargs=True, label="unet.rows")
        for layer in layers:
            self._session.add_forward_pre_hook(layer.module, self._enter_attn2, with_kwargs=True,
                                               label=f"{layer.name}.rows")

    def install(self) -> "RowCheck":
        self._session.install()
        return self

    def remove(self) -> None:
        self._cond = self._uncond = None
        self._session.remove()

    def begin_step(self, text_cond: Any, text_uncond: Any) -> None:
        self._cond, self._uncond = _crossattn(text_cond), _crossattn(text_uncond)

    def _enter_unet(self, module, args, kwargs) -> None:
        self._before = module.__dict__.get("cond_mark")
        context = args[2] if len(args) > 2 else kwargs.get("context")
        self._entry_tokens = int(context.shape[1]) if isinstance(context, torch.Tensor) and context.ndim == 3 else None
        self._pending = True

    def _enter_attn2(self, module, args, kwargs) -> None:
        if not self._pending:
            return
        self._pending = False
        state = self.state
        if not state.enabled or state.rows is None:
            return
        context = args[1] if len(args) > 1 else kwargs.get("context")
        marked = isinstance(context, torch.Tensor) and context.ndim == 3 and self._entry_tokens == context.shape[1] + 1
        rows = self._from_cond_mark(state.batch) if marked else None
        if rows is None:
            rows = self._from_context(context, state.batch)
        if rows is None or torch.equal(rows, state.rows.cpu()):
            return
        state.rows = rows
        state.token_groups = None
        self.corrected_calls += 1

    def _from_cond_mark(self, batch: Optional[int]) -> Optional[torch.Tensor]:
        mark = self.unet.__dict__.get("cond_mark")
        if mark is self._before or not isinstance(mark, torch.Tensor) or mark.numel() != batch:
            return None
        return torch.where(mark.detach().reshape(-1).float().cpu() > 0.5, COND, UNCOND).long()

    def _from_context(self, context: Any, batch: Optional[int]) -> Optional[torch.Tensor]:
        if not isinstance(context, torch.Tensor) or context.ndim != 3 or context.shape[0] != batch:
            return None
        if self._cond is None or self._uncond is None:
            return None
        is_uncond, is_cond = _starts_like(context, self._uncond), _starts_like(context, self._cond)
        if is_uncond is None or is_cond is None:
            return None
        is_uncond, is_cond = torch.stack((is_uncond, is_cond)).cpu()  # one device sync per UNet call
        if not bool((is_uncond ^ is_cond).all()):
            return None  # a row like both (same prompt and negative) or like neither
        return torch.where(is_uncond, UNCOND, COND).long()


def _crossattn(cond: Any) -> Optional[torch.Tensor]:
    """The text rows (N, T, C) of a CFG cond: a tensor, or SDXL's dict."""
    tensor = cond.get("crossattn") if isinstance(cond, dict) else cond
    return tensor.detach() if isinstance(tensor, torch.Tensor) and tensor.ndim == 3 else None


def _starts_like(context: torch.Tensor, rows: torch.Tensor) -> Optional[torch.Tensor]:
    """(B,) bool: context row b equals one of `rows` over their common length. Padding the host
    adds after on_cfg_denoiser (pad_cond_uncond, stacked AND rows) only appends tokens."""
    if context.shape[-1] != rows.shape[-1]:
        return None
    tokens = min(context.shape[1], rows.shape[1])
    a = context.detach()[:, None, :tokens]
    b = rows[None, :, :tokens].to(device=a.device, dtype=a.dtype)
    return (a == b).flatten(2).all(dim=-1).any(dim=-1)


class Controller:
    """What the Script delegates to; one per script instance."""

    def __init__(self, resolve_model):
        self.resolve_model = resolve_model  # (kind, name) -> path, or raise CharacterAdapterError
        self.generation: Optional[Generation] = None
        self.error: Optional[str] = None
        self._error_hooks: Optional[HookSession] = None
        self._guard: Optional[Tuple[Any, Any]] = None  # (weakref to the denoiser, handle)

    # ---- run start -----------------------------------------------------------------------

    def process(self, p, args: Sequence[Any]) -> None:
        """Run start: clear leftovers, validate settings, prepare tokens (or remember the error)."""
        self.end()
        unet = _unet(p.sd_model)
        if unet is not None:
            clear_stale(unet)  # a crashed run skips postprocess
        try:
            params = Params.from_args(args)
            if params.enabled:
                from .xyz import cell_overrides  # an X/Y/Z cell's values, set on its copy of p

                params = params.with_overrides(cell_overrides(p))
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
        except Exception as err:  # noqa: BLE001 - the host would log it and sample without the adapter
            self._fail("preparing the reference", err)
            return self._report(p)
        gen = self.generation
        p.extra_generation_params.update(params.to_infotext(gen.image_hash))
        for name in gen.reference.empty_regions:
            p.comment(f"Character-Adapter: region '{name}' was not found in the reference; "
                      f"its crop is the whole image.")
        if gen.image.info.get("frames", 1) > 1:
            p.comment(f"Character-Adapter: the reference is animated ({gen.image.info['frames']} frames); "
                      f"its first frame is used.")
        return None

    def _report(self, p) -> None:
        if not self.error.startswith("Character-Adapter"):  # loader errors name the file, not us
            self.error = f"Character-Adapter: {self.error}"
        log.error("%s", self.error)
        p.comment(self.error)

    def _prepare(self, p, params: Params) -> Generation:
        if params.image is None:
            raise CharacterAdapterError("Character-Adapter: no reference image: drop one in the accordion")
        image = load_image(params.image, min_side=MIN_REFERENCE_SIDE)
        if not params.model:
            raise CharacterAdapterError("Character-Adapter: choose an IP-Adapter model (none is selected)")
        apply_cache_settings()
        adapter_path = self.resolve_model("adapter", params.model)
        weights = ADAPTER_CACHE.get_or_create(adapter_path, lambda: load_ip_adapter(adapter_path))
        _check_architecture(p.sd_model, weights)
        encoder_path = self.resolve_model("encoder", params.encoder or ("auto:" + weights.spec.encoder))
        reference_hash = image_hash(image)  # reads every pixel: once
        # masks depend on the model and the reference phrases only: an adapter sweep segments once
        masks_key = (reference_hash, tuple(r.reference_phrase for r in params.regions), params.timestep,
                     params.crop, getattr(p.sd_model, "sd_model_hash", None), id(_unet(p.sd_model)))
        reference = REFERENCE_CACHE.get_or_create(
            masks_key + (adapter_path, encoder_path),
            lambda: self._reference(p.sd_model, image, params, weights, encoder_path, masks_key))
        return Generation(params, weights, reference, reference_hash, image)

    def _reference(self, sd_model, image: Image.Image, params: Params, weights: IPAdapterWeights,
                   encoder_path: str, masks_key: tuple) -> Reference:
        with _progress("Character-Adapter: loading the image encoder"):
            clip = ENCODER_CACHE.get_or_create(encoder_path, lambda: load_clip_vision(encoder_path))
            encoder = RegionEncoder(weights, clip)  # checks the pair before the UNet pass below
        segmentation = boxes = None
        empty: List[str] = []
        if params.regions:
            segmentation = SEGMENTATION_CACHE.get_or_create(masks_key, lambda: _segment_with_progress(
                sd_model, image, params))
            boxes = segmentation.boxes(image.size, params.crop)
            crops = region_crops(image, boxes)
            empty = [r.reference_phrase for r, e in zip(params.regions, segmentation.empty) if e]
        else:
            crops = [image]
        with _progress("Character-Adapter: encoding the reference"):
            try:
                clip.to(_device())
                tokens = encoder.encode(crops)
            finally:
                if _low_vram(sd_model):
                    clip.to("cpu")  # the WebUI keeps only the running part on the GPU
        return Reference(tokens, segmentation, boxes, tuple(empty))

    # ---- sampling ------------------------------------------------------------------------

    def before_sampling(self, p, x: torch.Tensor) -> None:
        """Each sampling start (hires too): guard the pass, then install its hooks. The host only
        logs a failure here, so it stops the run instead of sampling on without the adapter."""
        self._guard_denoiser(p)
        try:
            self._begin_pass(p, x)
        except Exception as err:  # noqa: BLE001
            self._fail("starting the sampling pass", err)
            self._stop_generation(_unet(p.sd_model))

    def _fail(self, what: str, err: Exception) -> None:
        """Remember the first error of the run; the next UNet call raises it."""
        # the traceback as text: a log record holding the exception would keep the run's tensors
        log.error("Character-Adapter: %s failed\n%s", what, traceback.format_exc())
        if self.error is None:
            self.error = str(err) if isinstance(err, CharacterAdapterError) else (
                f"Character-Adapter: {what} failed: {type(err).__name__}: {err}")

    def _guard_denoiser(self, p) -> None:
        """An exception inside a denoiser call ends the run with no postprocess (the host has no
        try/finally around sampling, HOST_NOTES §3): an always-call hook on the pass's CFG
        denoiser (a per-pass nn.Module) then removes everything of ours at once."""
        denoiser = getattr(getattr(p, "sampler", None), "model_wrap_cfg", None)
        if not isinstance(denoiser, torch.nn.Module):
            return
        if self._guard is not None and self._guard[0]() is denoiser:
            return
        self._drop_guard()
        owner = weakref.ref(self)

        def on_exit(module, args, output):
            controller = owner()
            if output is None and controller is not None:  # torch passes None when forward raised
                controller._guard = None  # torch is iterating this hook's dict: leave the hook there
                controller.end()

        try:
            handle = denoiser.register_forward_hook(MarkedHook(on_exit, "charadapter.guard"), always_call=True)
        except TypeError:  # torch < 2.1 has no always_call: the next run start cleans up instead
            return
        self._guard = (weakref.ref(denoiser), handle)

    def _drop_guard(self) -> None:
        guard, self._guard = self._guard, None
        if guard is not None:
            guard[1].remove()

    def _begin_pass(self, p, x: torch.Tensor) -> None:
        """(Re)install the fusion hooks for this pass."""
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
            gen.remove_hooks()  # hires checkpoint: a different UNet
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
            gen.row_check = RowCheck(unet, layers, gen.fusion.state).install()
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
        """Before each denoiser call. The host only logs a callback's error: a failure stops the
        run at this step's UNet call instead of sampling on with the last step's plan."""
        try:
            self._begin_step(params)
        except Exception as err:  # noqa: BLE001
            self._fail("preparing the sampling step", err)
            gen = self.generation
            self._stop_generation(gen.fusion.unet if gen is not None and gen.fusion is not None else None)

    def _begin_step(self, params) -> None:
        """The step and which rows are cond / uncond, per image."""
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
        if gen.row_check is not None:
            gen.row_check.begin_step(params.text_cond, params.text_uncond)

    def _row_plan(self, gen: Generation, params, step: int) -> RowPlan:
        """The full CFG batch as CFGDenoiser.forward stacks it: each image's AND rows, then one
        uncond row per image (HOST_NOTES §7). Calls that get only part of it (split calls, Skip
        Early CFG, NGMS) are matched in call order by FusionSession."""
        text_cond = params.text_cond
        cond_rows = int((text_cond["crossattn"] if isinstance(text_cond, dict) else text_cond).shape[0])
        rows = int(params.x.shape[0])
        images = max(rows - cond_rows, 1)
        prompts = _prompts(gen.p, gen.hires, images)
        subprompts = [_subprompts(prompts[i] if i < len(prompts) else "") for i in range(images)]
        if sum(len(s) for s in subprompts) != cond_rows:
            # the batch is not what the prompts give (another extension changed it): share the
            # rows out evenly, the rest to the last image, and reuse the last text
            share = max(cond_rows // images, 1)
            counts = [share] * (images - 1) + [max(cond_rows - share * (images - 1), 0)]
            subprompts = [[(s[j] if j < len(s) else s[-1]) for j in range(n)] for s, n in zip(subprompts, counts)]
        is_cond, image, groups = [], [], []
        for i, texts in enumerate(subprompts):
            found = [self._groups(gen, _scheduled(text, step, gen.p)) for text in texts]
            self._warn_missing(gen, found[0] if found else ())
            is_cond += [True] * len(texts)
            image += [i] * len(texts)
            groups += found
        for i in range(rows - cond_rows):
            is_cond.append(False)
            image.append(i)
            groups.append(None)
        return RowPlan(tuple(is_cond[:rows]), tuple(image[:rows]), tuple(groups[:rows]))

    def _groups(self, gen: Generation, text: str) -> Tuple[Tuple[int, ...], ...]:
        """Token positions of each region's generation phrase in `text` (host tokenizer)."""
        found = gen.prompt_groups.get(text)
        if found is None:
            model = gen.p.sd_model
            chunks = _prompt_chunks(model, text)
            found = tuple(tuple(phrase_positions(chunks, _phrase_ids(model, r.phrase)))
                          for r in gen.params.regions)
            gen.prompt_groups[text] = found
        return found

    @staticmethod
    def _warn_missing(gen: Generation, first: Tuple[Tuple[int, ...], ...]) -> None:
        """Once per phrase: a region phrase missing from an image's prompt. With AND, the layout
        is read from the rows with the first sub-prompt's positions (FusionSession), so that
        sub-prompt must hold it."""
        for region, positions in zip(gen.params.regions, first):
            if positions or region.phrase in gen.missing_phrases:
                continue
            gen.missing_phrases.add(region.phrase)
            gen.p.comment(
                f"Character-Adapter: '{region.phrase}' is not in the prompt (with AND: in its first "
                f"part), so that region cannot be located in the image and gets almost no weight; add "
                f"the phrase to the prompt or change the region's generation phrase.")

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
            if gen is not None:
                gen.remove_hooks()
        finally:
            try:
                if hooks is not None:
                    hooks.remove()
            finally:
                self._drop_guard()

    def _show_masks(self, gen: Generation, processed) -> None:
        extra = []
        reference = gen.reference
        if reference.segmentation is not None:  # rendered only when asked for
            extra.append(reference.segmentation.to_overlay(gen.image, boxes=reference.boxes))
        layout = gen.fusion.masks if gen.fusion is not None else None
        if layout is not None and gen.fusion.latent_hw is not None:
            h, w = gen.fusion.latent_hw
            # the layout is the last batch's: after a grid (index_of_first_image) and earlier batches
            start = int(getattr(processed, "index_of_first_image", 0) or 0)
            start += int(getattr(gen.p, "iteration", 0) or 0) * int(getattr(gen.p, "batch_size", 1) or 1)
            images = list(processed.images)[start:start + layout.shape[0]]
            paste_to = getattr(gen.p, "paste_to", None)  # inpaint "only masked": the crop was sampled
            for index, img in enumerate(images):
                labels = (layout[index].reshape(-1, h, w).argmax(dim=0).numpy() - 1).astype(np.int64)  # background -1
                extra.append(_layout_overlay(img, labels, paste_to))
        processed.images.extend(extra)
        processed.infotexts.extend([processed.infotexts[0] if processed.infotexts else ""] * len(extra))


# ---- host helpers ----------------------------------------------------------------------------


def _layout_overlay(image: Image.Image, labels: np.ndarray, paste_to: Optional[Sequence[int]]) -> Image.Image:
    """Layout labels over the generated image, or over the box an "only masked" inpaint pasted."""
    if not paste_to:
        return mask_overlay(image, labels)
    x, y, w, h = (int(v) for v in paste_to)
    out = image.convert("RGB")
    out.paste(mask_overlay(out.crop((x, y, x + w, y + h)), labels), (x, y))
    return out


def _device() -> torch.device:
    from modules import devices

    return devices.device


def _low_vram(sd_model) -> bool:
    """--medvram / --lowvram (or --medvram-sdxl on SDXL): only the running part may stay on the GPU."""
    from modules import lowvram, shared

    flags = shared.cmd_opts
    return bool(lowvram.is_enabled(sd_model) or getattr(flags, "lowvram", False) or getattr(flags, "medvram", False)
                or (getattr(flags, "medvram_sdxl", False) and getattr(sd_model, "is_sdxl", False)))


@contextlib.contextmanager
def _progress(text: str):
    """Show `text` as the WebUI's status line while the block runs, then what was there before."""
    from modules import shared

    state = shared.state
    previous = getattr(state, "textinfo", None)
    state.textinfo = text
    try:
        yield
    finally:
        state.textinfo = previous


def apply_cache_settings() -> None:
    """Resize the caches to the Settings values (read at each run start and on change)."""
    from modules import shared

    for key, cache, default in _CACHE_SETTINGS:
        cache.capacity = models.cache_size(shared.opts.data.get(key, default), default)


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

    indexes, flat, _ = prompt_parser.get_multicond_prompt_list([prompt])
    return [flat[i] for i, _ in indexes[0]] or [prompt]  # "a AND a" is two rows of one text


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


def _segment_with_progress(sd_model, image: Image.Image, params: Params) -> SegmentationResult:
    with _progress("Character-Adapter: segmenting the reference"):
        return _segment(sd_model, image, params)


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
            tokens = len(_phrase_ids(sd_model, phrase))
            why = (f"is {tokens} tokens long; it must fit in one 75-token chunk" if tokens > 75
                   else "gives no tokens" if tokens == 0
                   else "is cut by a 75-token chunk border: the region phrases together are too long")
            shown = phrase if len(phrase) <= 40 else phrase[:40] + "..."
            raise CharacterAdapterError(f"Character-Adapter: region phrase {shown!r} {why}")
    with torch.no_grad():
        vae_dtype = getattr(devices, "dtype_vae", torch.float32)
        pixels = pixels.to(devices.device, vae_dtype)
        latent = _encode(sd_model, pixels)
        cond = sd_model.get_learned_conditioning([prompt])
        noisy = noise_latent(latent, sd_model.alphas_cumprod.float().cpu(), params.timestep)
        timestep = torch.tensor([float(params.timestep)], device=noisy.device)
        cond = _with_concat(sd_model, cond, noisy, pixels)

        def run_unet():
            # the host's apply_model casts to dtype_unet under autocast (sd_hijack_unet.apply_model);
            # autocast here too, for hosts that only autocast around sampling (processing.py)
            with devices.autocast():
                return sd_model.apply_model(noisy, timestep, cond)

        result, _ = segment_reference(unet, find_attn2_layers(unet), run_unet, tuple(noisy.shape[-2:]), groups)
    return result


def _encode(sd_model, pixels: torch.Tensor) -> torch.Tensor:
    """The VAE latent of `pixels` in [-1, 1]: the posterior's mode, so the same reference always
    gives the same masks (ldm's get_first_stage_encoding would sample it with the global RNG)."""
    posterior = sd_model.encode_first_stage(pixels)
    if not isinstance(posterior, torch.Tensor) and hasattr(posterior, "mode"):  # sgm returns the latent
        posterior = posterior.mode()
    return sd_model.get_first_stage_encoding(posterior)


def _with_concat(sd_model, cond, latent: torch.Tensor, pixels: torch.Tensor):
    """Inpainting models (conditioning_key "hybrid") also take a mask and a masked image: the
    reference pass gets what the host gives txt2img, everything masked and a grey image
    (processing.py (txt2img_image_conditioning))."""
    model = getattr(sd_model, "model", None)
    if getattr(model, "conditioning_key", None) != "hybrid":
        return cond
    grey = _encode(sd_model, torch.zeros_like(pixels))
    mask = torch.ones(latent.shape[0], 1, *latent.shape[-2:], device=latent.device, dtype=latent.dtype)
    concat = torch.cat([mask, grey.to(device=latent.device, dtype=latent.dtype)], dim=1)
    crossattn = cond["crossattn"] if isinstance(cond, dict) else cond
    return {"c_concat": [concat], "c_crossattn": [crossattn]}
