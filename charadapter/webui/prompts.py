"""Prompt -> token groups: where each region phrase lies in the text the host encodes, for every
row of a step's CFG batch (the host's tokenizer, emphasis, BREAK, AND and prompt editing).

`modules` is imported inside the functions that need it, so importing this file needs no WebUI.
"""

import weakref
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

import torch

from ..fusion import RowPlan, TokenGroups
from ..phrases import PhraseBank
from ..tokens import phrase_positions
from .caches import PHRASE_CACHE

IN_PROMPT, FROM_PHRASE, NOT_LOCATED = "in the prompt", "from the phrase", "not located"


def prompts_of(p, hires: bool, images: int) -> List[str]:
    """The prompts of the batch being sampled (the hires prompts in the hires pass)."""
    prompts = list(getattr(p, "hr_prompts", None) or []) if hires else []
    return prompts or list(getattr(p, "prompts", None) or [getattr(p, "prompt", "")] * images)


def subprompts(prompt: str) -> List[str]:
    """The AND sub-prompts of a prompt, as the WebUI splits them."""
    from modules import prompt_parser

    indexes, flat, _ = prompt_parser.get_multicond_prompt_list([prompt])
    return [flat[i] for i, _ in indexes[0]] or [prompt]  # "a AND a" is two rows of one text


def scheduled(text: str, step: int, steps: int) -> str:
    """The prompt-editing variant of `text` in force at `step` of `steps`."""
    from modules import prompt_parser

    schedules = prompt_parser.get_learned_conditioning_prompt_schedules([text], max(int(steps), 1))[0]
    for end_at, variant in schedules:
        if step <= end_at:
            return variant
    return schedules[-1][1]


def prompt_chunks(sd_model, text: str) -> List[List[int]]:
    """The 77-token chunks (BOS/EOS included) the host encodes `text` into."""
    batch_chunks, _ = sd_model.cond_stage_model.process_texts([text])
    return [list(chunk.tokens) for chunk in batch_chunks[0]]


def phrase_ids(sd_model, phrase: str) -> List[int]:
    """The host tokenizer's ids of `phrase` (no BOS/EOS)."""
    return list(sd_model.cond_stage_model.tokenize([phrase])[0])


def phrase_token_count(sd_model, phrase: str) -> int:
    """How many tokens the host encodes `phrase` into on its own (emphasis parsed; one chunk's worth)."""
    _, count = sd_model.cond_stage_model.process_texts([phrase])
    return min(int(count), 75)


def phrase_encoding(sd_model, phrase: str, key: tuple) -> torch.Tensor:
    """The host text encoder's rows (n, C_ctx) of `phrase` encoded alone: its own tokens, after BOS
    and before EOS (SDXL: both encoders' channels). Float32 on the CPU, cached under `key`."""

    def encode() -> torch.Tensor:
        count = phrase_token_count(sd_model, phrase)
        with torch.no_grad():
            cond = sd_model.get_learned_conditioning([phrase])
        crossattn = cond["crossattn"] if isinstance(cond, dict) else cond  # (1, 77, C_ctx)
        return crossattn[0, 1:1 + count].detach().float().cpu()  # (n, C_ctx)

    return PHRASE_CACHE.get_or_create((phrase,) + key, encode)


def phrase_bank(sd_model, phrases: Sequence[str], key: tuple) -> Tuple[PhraseBank, Tuple[Tuple[int, ...], ...]]:
    """A bank of the phrases' own tokens, and each phrase's token-group entries (() where a phrase
    gives no token); a repeated phrase is stored once."""
    unique = [phrase for i, phrase in enumerate(phrases) if phrase not in phrases[:i]]
    encodings = [phrase_encoding(sd_model, phrase, key) for phrase in unique]
    bank = PhraseBank.stack(encodings)
    return bank, tuple(bank.entries(unique.index(phrase)) for phrase in phrases)


def encoder_key(sd_model, p, hires: bool) -> tuple:
    """What a phrase's encoding depends on besides the phrase: the checkpoint (hash and the loaded
    object), CLIP skip, emphasis mode and the extra networks active in this pass (LoRA on the
    text encoder)."""
    from modules import shared

    opts = shared.opts
    networks = getattr(p, "hr_extra_network_data" if hires else "extra_network_data", None) or {}
    active = tuple(sorted((str(name), tuple(tuple(str(v) for v in getattr(item, "items", ()) or ()) for item in items))
                          for name, items in dict(networks).items()))
    return (getattr(sd_model, "sd_model_hash", None), id(sd_model), getattr(opts, "CLIP_stop_at_last_layers", None),
            getattr(opts, "emphasis", None), active)


def phrase_groups(sd_model, text: str, phrases: Sequence[str]) -> TokenGroups:
    """Token positions of each phrase in `text` as the host encodes it; () where it is absent."""
    chunks = prompt_chunks(sd_model, text)
    return tuple(tuple(phrase_positions(chunks, phrase_ids(sd_model, phrase))) for phrase in phrases)


def share_rows(texts: List[List[str]], cond_rows: int) -> List[List[str]]:
    """Each image's cond row texts, made to fill `cond_rows` rows when the batch is not what the
    prompts give (another extension changed it): the rows shared out evenly, the rest to the last
    image, each image reusing its last text."""
    if sum(len(t) for t in texts) == cond_rows:
        return texts
    images = len(texts)
    share = max(cond_rows // images, 1)
    counts = [share] * (images - 1) + [max(cond_rows - share * (images - 1), 0)]
    return [[(t[j] if j < len(t) else t[-1]) for j in range(n)] for t, n in zip(texts, counts)]


def layout_texts(prompt: str, steps: int, hires_prompt: Optional[str] = None) -> List[str]:
    """The texts an image's layout is read from: the first AND part of its prompt (and of its
    hires prompt), in every prompt-editing variant."""
    from modules import prompt_parser

    texts: List[str] = []
    for source in [prompt] + ([hires_prompt] if hires_prompt is not None else []):
        first = subprompts(source)[0]
        schedules = prompt_parser.get_learned_conditioning_prompt_schedules([first], max(int(steps), 1))[0]
        texts += [variant for _, variant in schedules if variant not in texts]
    return texts


def image_texts(p, steps: int) -> List[List[str]]:
    """layout_texts of every image of the run, in all_prompts order."""
    prompts = list(getattr(p, "all_prompts", None) or [getattr(p, "prompt", "")])
    hires = list(getattr(p, "all_hr_prompts", None) or []) if getattr(p, "enable_hr", False) else []
    return [layout_texts(prompt, steps, hires[i] if i < len(hires) else None) for i, prompt in enumerate(prompts)]


@dataclass
class PhraseFinder:
    """Per generation: the mapped phrases' token groups in each prompt text met so far (the regions'
    generation phrases, then the characters' subjects), the phrase bank's entries once the phrases
    absent from a prompt need them, and the phrases reported as not located (each once)."""

    phrases: Tuple[str, ...]  # the map columns' phrases: regions' generation phrases, then subjects
    roles: Tuple[str, ...] = ()  # what each phrase locates, for messages ("the subject of Character 2"); () = regions
    found: Dict[str, TokenGroups] = field(default_factory=dict)
    missing: Set[str] = field(default_factory=set)
    bank_entries: Optional[TokenGroups] = None  # per mapped phrase: its own tokens in the phrase bank
    token_counts: Dict[str, int] = field(default_factory=dict)  # phrase -> tokens it encodes into alone

    def positions(self, sd_model, text: str) -> TokenGroups:
        """Token positions of each mapped phrase in `text` (host tokenizer); () = absent."""
        groups = self.found.get(text)
        if groups is None:
            groups = self.found[text] = phrase_groups(sd_model, text, self.phrases)
        return groups

    def groups(self, sd_model, text: str) -> TokenGroups:
        """Each region's map columns for a row of `text`: its tokens in the prompt, or, where the
        prompt lacks the phrase, the phrase's own tokens (when the bank exists)."""
        bank = self.bank_entries
        return tuple(group or (bank[r] if bank is not None else ())
                     for r, group in enumerate(self.positions(sd_model, text)))

    def locations(self, sd_model, texts: Sequence[str]) -> Tuple[str, ...]:
        """How each region is located over `texts` (one image's rows): in the prompt, from the
        phrase, or both over the steps of a prompt edit."""
        out = []
        for r in range(len(self.phrases)):
            kinds = []
            for text in texts:
                kind = IN_PROMPT if self.positions(sd_model, text)[r] else FROM_PHRASE
                if kind == FROM_PHRASE and not self.token_count(sd_model, self.phrases[r]):
                    kind = NOT_LOCATED
                if kind not in kinds:
                    kinds.append(kind)
            out.append(" / ".join(kinds) or NOT_LOCATED)
        return tuple(out)

    def token_count(self, sd_model, phrase: str) -> int:
        """phrase_token_count, once per phrase (asked per region, text and image)."""
        count = self.token_counts.get(phrase)
        if count is None:
            count = self.token_counts[phrase] = phrase_token_count(sd_model, phrase)
        return count

    def warn_missing(self, p, first: TokenGroups) -> None:
        """Once per phrase: a phrase with no map columns in an image's first rows (a phrase that
        gives no token, or a prompt the run start did not foresee: no bank)."""
        roles = self.roles or ("region",) * len(self.phrases)
        for phrase, role, columns in zip(self.phrases, roles, first):
            if columns or phrase in self.missing:
                continue
            self.missing.add(phrase)
            if role.startswith("the subject of "):
                p.comment(
                    f"Character-Adapter: '{phrase}' ({role}) could not be located in the image (not in the "
                    f"prompt, with AND: in its first part, and not located from the phrase), so that "
                    f"character's figure cannot be told from the others'.")
                continue
            p.comment(
                f"Character-Adapter: '{phrase}' could not be located in the image (not in the prompt, "
                f"with AND: in its first part, and not located from the phrase), so that region gets "
                f"almost no weight.")


def located_text(phrases: Sequence[str], kinds: Sequence[str]) -> str:
    """'face: from the phrase, red jacket: in the prompt'; a phrase two characters share, once."""
    seen = {}
    for phrase, kind in zip(phrases, kinds):
        seen.setdefault(phrase, kind)
    return ", ".join(f"{phrase}: {kind}" for phrase, kind in seen.items())


class LocatedPerImage:
    """The infotext value of a run whose images locate their regions differently. create_infotext
    calls it with the prompt list it writes from and the image's index in that list (the batch's
    per-image infotexts and the run's Processed infotext use different lists; each pairs them)."""

    def __init__(self, finder: "PhraseFinder", sd_model, steps: int):
        self.finder, self.steps = finder, steps
        self.sd_model = weakref.ref(sd_model)  # p keeps this value: it must not keep a checkpoint alive

    def __call__(self, all_prompts=None, index=0, **_) -> Optional[str]:
        sd_model = self.sd_model()
        if sd_model is None or not all_prompts or not 0 <= int(index) < len(all_prompts):
            return None
        texts = layout_texts(all_prompts[int(index)], self.steps)
        return located_text(self.finder.phrases, self.finder.locations(sd_model, texts))


def located_infotext(finder: "PhraseFinder", sd_model, steps: int, located: Sequence[Sequence[str]]) -> Any:
    """The infotext value saying how each region was located: one text when every image agrees."""
    texts = {located_text(finder.phrases, kinds) for kinds in located}
    return texts.pop() if len(texts) == 1 else LocatedPerImage(finder, sd_model, steps)


def row_plan(finder: PhraseFinder, p, hires: bool, params: Any, step: int) -> RowPlan:
    """The full CFG batch as CFGDenoiser.forward stacks it: each image's AND rows, then one
    uncond row per image (HOST_NOTES §7). Calls that get only part of it (split calls, Skip
    Early CFG, NGMS) are matched in call order by FusionSession. `params` is the host's
    CFGDenoiserParams. The layout is read from each image's first AND part: later parts' rows
    get no map columns (())."""
    text_cond = params.text_cond
    cond_rows = int((text_cond["crossattn"] if isinstance(text_cond, dict) else text_cond).shape[0])
    rows = int(params.x.shape[0])
    images = max(rows - cond_rows, 1)
    prompts = prompts_of(p, hires, images)
    texts = share_rows([subprompts(prompts[i] if i < len(prompts) else "") for i in range(images)], cond_rows)
    is_cond, image, groups = [], [], []
    for i, image_texts in enumerate(texts):
        found = [finder.groups(p.sd_model, scheduled(text, step, p.steps)) for text in image_texts[:1]]
        finder.warn_missing(p, found[0] if found else ())
        is_cond += [True] * len(image_texts)
        image += [i] * len(image_texts)
        groups += found + [()] * (len(image_texts) - 1)
    for i in range(rows - cond_rows):
        is_cond.append(False)
        image.append(i)
        groups.append(None)
    return RowPlan(tuple(is_cond[:rows]), tuple(image[:rows]), tuple(groups[:rows]))
