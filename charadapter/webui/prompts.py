"""Prompt -> token groups: where each region phrase lies in the text the host encodes, for every
row of a step's CFG batch (the host's tokenizer, emphasis, BREAK, AND and prompt editing).

`modules` is imported inside the functions that need it, so importing this file needs no WebUI.
"""

from dataclasses import dataclass, field
from typing import Any, Dict, List, Sequence, Set, Tuple

from ..fusion import RowPlan, TokenGroups
from ..tokens import phrase_positions


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


@dataclass
class PhraseFinder:
    """Per generation: the mapped phrases' token groups in each prompt text met so far, and the
    phrases already reported missing (each once)."""

    phrases: Tuple[str, ...]  # the map columns' phrases: regions' generation phrases, then subjects
    roles: Tuple[str, ...] = ()  # what each phrase locates, for messages ("the subject of Character 2"); () = regions
    found: Dict[str, TokenGroups] = field(default_factory=dict)
    missing: Set[str] = field(default_factory=set)

    def groups(self, sd_model, text: str) -> TokenGroups:
        """Token positions of each mapped phrase in `text` (host tokenizer)."""
        groups = self.found.get(text)
        if groups is None:
            groups = self.found[text] = phrase_groups(sd_model, text, self.phrases)
        return groups

    def warn_missing(self, p, first: TokenGroups) -> None:
        """Once per phrase: a region phrase missing from an image's prompt. With AND, the layout
        is read from the rows with the first sub-prompt's positions (FusionSession), so that
        sub-prompt must hold it."""
        roles = self.roles or ("region",) * len(self.phrases)
        for phrase, role, positions in zip(self.phrases, roles, first):
            if positions or phrase in self.missing:
                continue
            self.missing.add(phrase)
            if role.startswith("the subject of "):
                p.comment(
                    f"Character-Adapter: '{phrase}' ({role}) is not in the prompt (with AND: in its first "
                    f"part), so that character's figure cannot be told from the others'; add the phrase "
                    f"to the prompt or change the subject.")
                continue
            p.comment(
                f"Character-Adapter: '{phrase}' is not in the prompt (with AND: in its first "
                f"part), so that region cannot be located in the image and gets almost no weight; add "
                f"the phrase to the prompt or change the region's generation phrase.")


def row_plan(finder: PhraseFinder, p, hires: bool, params: Any, step: int) -> RowPlan:
    """The full CFG batch as CFGDenoiser.forward stacks it: each image's AND rows, then one
    uncond row per image (HOST_NOTES §7). Calls that get only part of it (split calls, Skip
    Early CFG, NGMS) are matched in call order by FusionSession. `params` is the host's
    CFGDenoiserParams."""
    text_cond = params.text_cond
    cond_rows = int((text_cond["crossattn"] if isinstance(text_cond, dict) else text_cond).shape[0])
    rows = int(params.x.shape[0])
    images = max(rows - cond_rows, 1)
    prompts = prompts_of(p, hires, images)
    texts = share_rows([subprompts(prompts[i] if i < len(prompts) else "") for i in range(images)], cond_rows)
    is_cond, image, groups = [], [], []
    for i, image_texts in enumerate(texts):
        found = [finder.groups(p.sd_model, scheduled(text, step, p.steps)) for text in image_texts]
        finder.warn_missing(p, found[0] if found else ())
        is_cond += [True] * len(image_texts)
        image += [i] * len(image_texts)
        groups += found
    for i in range(rows - cond_rows):
        is_cond.append(False)
        image.append(i)
        groups.append(None)
    return RowPlan(tuple(is_cond[:rows]), tuple(image[:rows]), tuple(groups[:rows]))
