"""Prompt parsing; mirrors modules/prompt_parser.py.

Simplification: prompt editing / alternation ([a:b:N], [a|b]) is not parsed. Every prompt has a
one-entry schedule, so the text reaching the text encoder is the prompt as written (after the
AND split). Everything else (AND + weights, emphasis, BREAK, batch reconstruction) follows v1.10.1.
"""
from __future__ import annotations

import re
from collections import namedtuple

import torch

ScheduledPromptConditioning = namedtuple("ScheduledPromptConditioning", ["end_at_step", "cond"])  # mirrors modules/prompt_parser.py


class SdConditioning(list):  # mirrors modules/prompt_parser.py (SdConditioning)
    """A list of prompts that also carries width / height / is_negative_prompt (SDXL reads them)."""

    def __init__(self, prompts, is_negative_prompt=False, width=None, height=None, copy_from=None):
        super().__init__()
        self.extend(prompts)
        if copy_from is None:
            copy_from = prompts
        self.is_negative_prompt = is_negative_prompt or getattr(copy_from, 'is_negative_prompt', False)
        self.width = width or getattr(copy_from, 'width', None)
        self.height = height or getattr(copy_from, 'height', None)


def get_learned_conditioning_prompt_schedules(prompts, base_steps, hires_steps=None, use_old_scheduling=False):  # mirrors modules/prompt_parser.py; no editing syntax in the double
    """One schedule per prompt: [[steps, prompt]] (the real one splits [a:b:N] into several entries)."""
    steps = hires_steps if hires_steps is not None else base_steps
    return [[[steps, prompt]] for prompt in prompts]


def get_learned_conditioning(model, prompts, steps, hires_steps=None, use_old_scheduling=False):  # mirrors modules/prompt_parser.py (get_learned_conditioning)
    """Per prompt, a list of ScheduledPromptConditioning; identical prompts share one encoding."""
    res = []
    prompt_schedules = get_learned_conditioning_prompt_schedules(prompts, steps, hires_steps, use_old_scheduling)
    cache = {}
    for prompt, prompt_schedule in zip(prompts, prompt_schedules):
        cached = cache.get(prompt, None)
        if cached is not None:
            res.append(cached)
            continue
        texts = SdConditioning([x[1] for x in prompt_schedule], copy_from=prompts)
        conds = model.get_learned_conditioning(texts)
        cond_schedule = []
        for i, (end_at_step, _) in enumerate(prompt_schedule):
            cond = {k: v[i] for k, v in conds.items()} if isinstance(conds, dict) else conds[i]
            cond_schedule.append(ScheduledPromptConditioning(end_at_step, cond))
        cache[prompt] = cond_schedule
        res.append(cond_schedule)
    return res


re_AND = re.compile(r"\bAND\b")  # mirrors modules/prompt_parser.py (re_AND)
re_weight = re.compile(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")  # mirrors modules/prompt_parser.py (re_weight)


def get_multicond_prompt_list(prompts):  # mirrors modules/prompt_parser.py (get_multicond_prompt_list)
    """Split prompts on AND; returns per-prompt [(flat index, weight)], the flat unique texts and their index map."""
    res_indexes = []
    prompt_indexes = {}
    prompt_flat_list = SdConditioning(prompts)
    prompt_flat_list.clear()
    for prompt in prompts:
        indexes = []
        for subprompt in re_AND.split(prompt):
            match = re_weight.search(subprompt)
            text, weight = match.groups() if match is not None else (subprompt, 1.0)
            weight = float(weight) if weight is not None else 1.0
            index = prompt_indexes.get(text, None)
            if index is None:
                index = len(prompt_flat_list)
                prompt_flat_list.append(text)
                prompt_indexes[text] = index
            indexes.append((index, weight))
        res_indexes.append(indexes)
    return res_indexes, prompt_flat_list, prompt_indexes


class ComposableScheduledPromptConditioning:  # mirrors modules/prompt_parser.py (ComposableScheduledPromptConditioning)
    def __init__(self, schedules, weight=1.0):
        self.schedules = schedules
        self.weight = weight


class MulticondLearnedConditioning:  # mirrors modules/prompt_parser.py (MulticondLearnedConditioning)
    def __init__(self, shape, batch):
        self.shape = shape
        self.batch = batch


def get_multicond_learned_conditioning(model, prompts, steps, hires_steps=None, use_old_scheduling=False):  # mirrors modules/prompt_parser.py
    """Like get_learned_conditioning, but each prompt is a list of weighted AND sub-prompts."""
    res_indexes, prompt_flat_list, _ = get_multicond_prompt_list(prompts)
    learned_conditioning = get_learned_conditioning(model, prompt_flat_list, steps, hires_steps, use_old_scheduling)
    res = [[ComposableScheduledPromptConditioning(learned_conditioning[i], weight) for i, weight in indexes] for indexes in res_indexes]
    return MulticondLearnedConditioning(shape=(len(prompts),), batch=res)


class DictWithShape(dict):  # mirrors modules/prompt_parser.py (DictWithShape): SDXL conds, .shape is the crossattn shape
    def __init__(self, x, shape=None):
        super().__init__()
        self.update(x)

    @property
    def shape(self):
        return self["crossattn"].shape


def _pick(schedules, current_step):
    """Index of the schedule entry active at current_step."""
    for index, entry in enumerate(schedules):
        if current_step <= entry.end_at_step:
            return index
    return 0


def reconstruct_cond_batch(c, current_step):  # mirrors modules/prompt_parser.py (reconstruct_cond_batch): the uncond batch
    """Stack one cond per prompt for the current step: (B, T, C) or DictWithShape."""
    param = c[0][0].cond
    if isinstance(param, dict):
        res = {k: torch.zeros((len(c),) + v.shape, device=v.device, dtype=v.dtype) for k, v in param.items()}
        res = DictWithShape(res, (len(c),) + param['crossattn'].shape)
        for i, cond_schedule in enumerate(c):
            for k, v in cond_schedule[_pick(cond_schedule, current_step)].cond.items():
                res[k][i] = v
        return res
    res = torch.zeros((len(c),) + param.shape, device=param.device, dtype=param.dtype)
    for i, cond_schedule in enumerate(c):
        res[i] = cond_schedule[_pick(cond_schedule, current_step)].cond
    return res


def stack_conds(tensors):  # mirrors modules/prompt_parser.py (stack_conds)
    """Stack (T_i, C) tensors, padding shorter ones by repeating their last token vector."""
    token_count = max(x.shape[0] for x in tensors)
    for i in range(len(tensors)):
        if tensors[i].shape[0] != token_count:
            last_vector = tensors[i][-1:]
            tensors[i] = torch.vstack([tensors[i], last_vector.repeat([token_count - tensors[i].shape[0], 1])])
    return torch.stack(tensors)


def reconstruct_multicond_batch(c, current_step):  # mirrors modules/prompt_parser.py (reconstruct_multicond_batch)
    """Flatten AND sub-prompts image by image: conds_list[i] = [(row, weight), ...] and the stacked rows."""
    param = c.batch[0][0].schedules[0].cond
    tensors = []
    conds_list = []
    for composable_prompts in c.batch:
        conds_for_batch = []
        for composable_prompt in composable_prompts:
            target_index = _pick(composable_prompt.schedules, current_step)
            conds_for_batch.append((len(tensors), composable_prompt.weight))
            tensors.append(composable_prompt.schedules[target_index].cond)
        conds_list.append(conds_for_batch)
    if isinstance(tensors[0], dict):
        keys = list(tensors[0].keys())
        stacked = {k: stack_conds([x[k] for x in tensors]) for k in keys}
        stacked = DictWithShape(stacked, stacked['crossattn'].shape)
    else:
        stacked = stack_conds(tensors).to(device=param.device, dtype=param.dtype)
    return conds_list, stacked


# mirrors modules/prompt_parser.py (re_attention): escapes, brackets, ':weight)' closers, plain runs, a lone ':'
re_attention = re.compile(r"""
\\\(|
\\\)|
\\\[|
\\]|
\\\\|
\\|
\(|
\[|
:\s*([+-]?[.\d]+)\s*\)|
\)|
]|
[^\\()\[\]:]+|
:
""", re.X)

re_break = re.compile(r"\s*\bBREAK\b\s*", re.S)  # mirrors modules/prompt_parser.py (re_break)


def parse_prompt_attention(text):  # mirrors modules/prompt_parser.py (parse_prompt_attention); our own implementation
    """Split a prompt into [text, weight] runs: (x) *1.1, [x] /1.1, (x:w) *w, BREAK -> ["BREAK", -1].

    Unclosed brackets apply to the end of the text; neighbouring runs of equal weight merge.
    """
    runs = []
    open_round = []
    open_square = []

    def scale_from(start, factor):
        for run in runs[start:]:
            run[1] *= factor

    for match in re_attention.finditer(text):
        piece, weight = match.group(0), match.group(1)
        if piece.startswith('\\'):
            runs.append([piece[1:], 1.0])
        elif piece == '(':
            open_round.append(len(runs))
        elif piece == '[':
            open_square.append(len(runs))
        elif weight is not None and open_round:
            scale_from(open_round.pop(), float(weight))
        elif piece == ')' and open_round:
            scale_from(open_round.pop(), 1.1)
        elif piece == ']' and open_square:
            scale_from(open_square.pop(), 1 / 1.1)
        else:
            for i, part in enumerate(re.split(re_break, piece)):
                if i > 0:
                    runs.append(["BREAK", -1])
                runs.append([part, 1.0])

    for start in open_round:
        scale_from(start, 1.1)
    for start in open_square:
        scale_from(start, 1 / 1.1)

    if not runs:
        runs = [["", 1.0]]

    merged = [runs[0]]
    for run in runs[1:]:
        if run[1] == merged[-1][1]:
            merged[-1][0] += run[0]
        else:
            merged.append(run)
    return merged
