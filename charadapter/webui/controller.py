"""One generation in the WebUI, from run start to run end: validate the settings, prepare the
reference, install the fusion hooks at every sampling pass, give them each step's rows, and
remove everything on every path (success, error, interrupt, unload).

Host facts it relies on are in docs/HOST_NOTES.md; `modules` is only imported by the rooms it
calls (host.py, prompts.py, reference_pass.py), so this file imports without the WebUI.
"""

import logging
import traceback
import weakref
from typing import Any, List, Optional, Sequence, Tuple

import torch

from ..errors import CharacterAdapterError, InputError
from ..fusion import CharacterTokens, FusionConfig, FusionSession
from ..hooks import HookSession, MarkedHook, clear_stale
from ..layers import check_adapter_layers, find_attn2_layers
from ..params import INFOTEXT_PREFIX, Character, Params
from . import refusal
from .host import check_architecture, unet_of
from .prompts import (FROM_PHRASE, PhraseFinder, encoder_key, image_texts, located_infotext, phrase_bank,
                      row_plan)
from .reference_pass import Prepared, ResolveModel, prepare
from .rows import RowCheck
from .show_masks import show_masks
from .xyz import cell_overrides

log = logging.getLogger("character_adapter")


def several(params: Params) -> bool:
    """Two or more characters: their subject phrases share the image out among them."""
    return len(params.characters) > 1


def character_label(params: Params, character: Character) -> str:
    """"Character 2: " where it matters which character a message is about, else ""."""
    return f"{character.label}: " if several(params) or character.unit > 1 else ""


def map_phrases(params: Params) -> PhraseFinder:
    """The phrases whose maps make the layout, in FusionSession's column order: every character's
    region phrases, then (two or more characters) each one's subject phrase."""
    phrases, roles = [], []
    for character in params.characters:
        for region in character.regions:
            phrases.append(region.phrase)
            roles.append(f"{character_label(params, character)}region '{region.reference_phrase}'")
    if several(params):
        for character in params.characters:
            phrases.append(character.subject)
            roles.append(f"the subject of {character.label}")
    return PhraseFinder(tuple(phrases), tuple(roles))


class Generation:
    """Per-generation state of one script instance (one tab): never stored on `p` or modules."""

    def __init__(self, params: Params, prepared: Sequence[Prepared]):
        self.params = params
        self.prepared = list(prepared)  # one per character, in params.characters order
        self.fusion: Optional[FusionSession] = None
        self.row_check: Optional[RowCheck] = None
        self.p: Any = None
        self.hires = False
        self.phrases = map_phrases(params)
        self.located: List[Tuple[str, ...]] = []  # per image of the run: how each mapped phrase is located
        self.needs_bank = False  # some phrase is absent from some prompt: locate it from the phrase itself
        self.located_infotext: Any = None  # the "located" infotext value (a text, or one per image)

    def remove_hooks(self) -> None:
        """Remove the fusion hooks and the row check; safe to call twice."""
        check, self.row_check = self.row_check, None
        try:
            if self.fusion is not None:
                self.fusion.remove()
        finally:
            if check is not None:
                check.remove()


class Controller:
    """What the Script delegates to; one per script instance."""

    def __init__(self, resolve_model: ResolveModel):
        self.resolve_model = resolve_model
        self.generation: Optional[Generation] = None
        self.error: Optional[str] = None
        self.refused = False  # the error is a refused input (the caller's mistake): HTTP 422, no traceback
        self._error_hooks: Optional[HookSession] = None
        self._guard: Optional[Tuple[Any, Any]] = None  # (weakref to the denoiser, handle)

    # ---- run start -----------------------------------------------------------------------

    def process(self, p, args: Sequence[Any]) -> None:
        """Run start: clear leftovers, validate settings, prepare tokens (or remember the error)."""
        self.end()
        unet = unet_of(p.sd_model)
        if unet is not None:
            clear_stale(unet)  # a crashed run skips postprocess
        try:
            params = Params.from_args(args)
            if params.enabled:
                params = params.with_overrides(cell_overrides(p))  # an X/Y/Z cell's values, set on its copy of p
        except CharacterAdapterError as err:
            return self._refuse(p, err)
        if not params.enabled:
            return None
        prepared: List[Prepared] = []
        for character in params.characters:  # each reference segmented and encoded once (cached)
            label = character_label(params, character)
            try:
                prepared.append(prepare(p, params, character, self.resolve_model))
            except CharacterAdapterError as err:
                return self._refuse(p, err, label)
            except Exception as err:  # noqa: BLE001 - the host would log it and sample without the adapter
                self._fail(f"preparing the reference{' of ' + character.label if label else ''}", err)
                return self._report(p)
        try:
            check_token_counts(params, prepared)
        except InputError as err:
            return self._refuse(p, err)
        gen = self.generation = Generation(params, prepared)
        try:
            self._locate(p, gen)
        except CharacterAdapterError as err:
            return self._refuse(p, err)
        except Exception as err:  # noqa: BLE001 - the host would log it and sample without the adapter
            self._fail("locating the phrases", err)
            return self._report(p)
        p.extra_generation_params.update(params.to_infotext([done.image_hash for done in prepared]))
        if gen.located_infotext is not None:
            p.extra_generation_params[f"{INFOTEXT_PREFIX} located"] = gen.located_infotext
        for character, done in zip(params.characters, prepared):
            label = character_label(params, character)
            for name in done.reference.empty_regions:
                p.comment(f"Character-Adapter: {label}region '{name}' was not found in the reference; "
                          f"its crop is the whole image.")
            if done.image.info.get("frames", 1) > 1:
                p.comment(f"Character-Adapter: {label}the reference is animated ({done.image.info['frames']} "
                          f"frames); its first frame is used.")
        return None

    @staticmethod
    def _locate(p, gen: Generation) -> None:
        """How each image's mapped phrases (regions, subjects) will be located (the first AND part
        of its prompt, every prompt edit): whether a phrase bank is needed, and the infotext value
        saying so."""
        if not gen.phrases.phrases:
            return
        gen.located = [gen.phrases.locations(p.sd_model, texts) for texts in image_texts(p, p.steps)]
        gen.needs_bank = any(FROM_PHRASE in kind for kinds in gen.located for kind in kinds)
        gen.located_infotext = located_infotext(gen.phrases, p.sd_model, p.steps, gen.located)

    def _refuse(self, p, err: CharacterAdapterError, label: str = "") -> None:
        """A known error at run start: remember it (an InputError is the caller's mistake: refused,
        HTTP 422) and report it."""
        self.error, self.refused = _labelled(str(err), label), isinstance(err, InputError)
        self._report(p)

    def _report(self, p) -> None:
        if not self.error.startswith("Character-Adapter"):  # loader errors name the file, not us
            self.error = f"Character-Adapter: {self.error}"
        log.error("%s", self.error)
        p.comment(self.error)

    # ---- sampling ------------------------------------------------------------------------

    def before_sampling(self, p, x: torch.Tensor) -> None:
        """Each sampling start (hires too): guard the pass, then install its hooks. The host only
        logs a failure here, so it stops the run instead of sampling on without the adapter."""
        self._guard_denoiser(p)
        try:
            self._begin_pass(p, x)
        except Exception as err:  # noqa: BLE001
            self._fail("starting the sampling pass", err)
            self._stop_generation(unet_of(p.sd_model))

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
        unet = unet_of(p.sd_model)
        if self.error is not None:
            return self._stop_generation(unet)
        gen = self.generation
        if gen is None or unet is None:
            return None
        layers = find_attn2_layers(unet)
        for done in gen.prepared:
            check_architecture(p.sd_model, done.weights)
            check_adapter_layers(layers, done.weights.layers, done.weights.source)
        previous = gen.fusion
        if previous is not None and previous.unet is not unet:
            gen.remove_hooks()  # hires checkpoint: a different UNet
            previous = None
        if previous is None:
            first, *others = character_tokens(gen.params, gen.prepared)
            gen.fusion = FusionSession(unet, layers, *first, others=others)
            gen.fusion.install()
            gen.row_check = RowCheck(unet, layers, gen.fusion.state).install()
        gen.p = p
        gen.hires = bool(getattr(p, "is_hr_pass", False))
        if gen.needs_bank:  # each pass: the encodings follow this pass's checkpoint and networks (cached)
            bank, gen.phrases.bank_entries = phrase_bank(p.sd_model, gen.phrases.phrases,
                                                         encoder_key(p.sd_model, p, gen.hires))
            gen.fusion.set_phrase_bank(bank.embeddings)
        steps = int(getattr(p, "hr_second_pass_steps", 0) or p.steps) if gen.hires else int(p.steps)
        gen.fusion.begin_pass(tuple(x.shape[-2:]), steps)
        return None

    def _stop_generation(self, unet) -> None:
        """Generation must not go on silently without the adapter: raise inside the UNet."""
        message, refused = self.error, self.refused

        def refuse(module, args):
            raise refusal.CharacterAdapterError(message) if refused else CharacterAdapterError(message)

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
        gen.fusion.begin_step(int(step), row_plan(gen.phrases, gen.p, gen.hires, params, int(step)))
        if gen.row_check is not None:
            gen.row_check.begin_step(params.text_cond, params.text_uncond)

    # ---- run end -------------------------------------------------------------------------

    def postprocess(self, p, processed) -> None:
        """Run end: masks to the gallery when asked, then remove every hook."""
        gen = self.generation
        try:
            if gen is not None and gen.params.show_masks:
                show_masks(gen.p, processed, gen.params, gen.prepared, gen.fusion, gen.phrases.phrases, gen.located)
        finally:
            self.end()

    def end(self) -> None:
        """Remove every hook of ours and forget the generation (also on errors and unload)."""
        gen, self.generation = self.generation, None
        hooks, self._error_hooks = self._error_hooks, None
        self.error, self.refused = None, False
        try:
            if gen is not None:
                gen.remove_hooks()
        finally:
            try:
                if hooks is not None:
                    hooks.remove()
            finally:
                self._drop_guard()


def _labelled(message: str, label: str) -> str:
    """An error message with the character it is about: "Character-Adapter: Character 2: ..."."""
    prefix = "Character-Adapter: "
    if not label:
        return message
    return prefix + label + (message[len(prefix):] if message.startswith(prefix) else message)


def check_token_counts(params: Params, prepared: Sequence[Prepared]) -> None:
    """Characters share one batched term, their tokens repeated up to the largest count (4 -> 16 for a
    base and a Plus adapter); counts that do not divide it (a Full-Face adapter's 257) cannot."""
    counts = [done.reference.tokens.cond.shape[1] for done in prepared]
    largest = max(counts)
    for character, done, count in zip(params.characters, prepared, counts):
        if largest % count:
            other = params.characters[counts.index(largest)]
            raise InputError(
                f"Character-Adapter: {character.label}: model: {character.model} gives {count} image tokens per "
                f"region and {other.label}'s {other.model} gives {largest}; adapters mix in one generation only "
                f"when one count divides the other (base 4 and Plus 16 do): choose another model for one of them")


def character_tokens(params: Params, prepared: Sequence[Prepared]) -> List[CharacterTokens]:
    """Each character's adapter weights, tokens and fusion settings, for FusionSession."""
    found = []
    for character, done in zip(params.characters, prepared):
        # the adapter's weights as stored: the session casts one layer at a time (fp32 copies of
        # all layers at once were 1.4 GB more, for a moment, with an fp16 SDXL adapter)
        config = FusionConfig(
            weight=character.weight, region_weights=tuple(r.weight for r in character.regions),
            start=character.start, end=character.end, mode=params.fusion,
            temperature=params.temperature, background=params.background, subject=several(params),
        )
        found.append(CharacterTokens(done.weights.layers, done.reference.tokens.cond, done.reference.tokens.negative,
                                     config))
    return found
