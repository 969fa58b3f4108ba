"""Text-map columns beyond the prompt: regions located from their own phrase.

A region's token group lists the key columns its text map averages. An entry >= 0 is a token of
the prompt as the host laid it out (tokens.phrase_positions). A phrase the prompt does not hold
is located from itself: its own token embeddings (the host's text encoder on the phrase alone,
BOS and EOS dropped) are stacked in a phrase bank, and the group names bank row b as the entry
-1 - b. On the map layers, the bank rows a call's groups name are projected with that layer's
own to_k and appended to the prompt's keys, so the map is softmax over the prompt's tokens plus
those phrase tokens, the phrase's columns taken. They enter the maps only: the host's attention
never sees them.
"""

from dataclasses import dataclass
from typing import Iterable, Optional, Sequence, Tuple

import torch

from .errors import CharacterAdapterError

Groups = Sequence[Sequence[int]]


def bank_entry(row: int) -> int:
    """The token-group entry that names bank row `row`."""
    return -1 - int(row)


def bank_rows(groups: Optional[Groups]) -> Tuple[int, ...]:
    """The bank rows that `groups` name, ascending (() when they name prompt tokens only)."""
    return tuple(sorted({-1 - int(t) for group in groups or () for t in group if int(t) < 0}))


def resolve_columns(groups: Groups, prompt_tokens: int, rows: Sequence[int]) -> Tuple[Tuple[int, ...], ...]:
    """Groups as key columns of [prompt tokens | bank rows `rows`]: bank row rows[j] -> prompt_tokens + j."""
    column = {row: prompt_tokens + j for j, row in enumerate(rows)}
    try:
        return tuple(tuple(int(t) if int(t) >= 0 else column[-1 - int(t)] for t in group) for group in groups)
    except KeyError as err:
        raise CharacterAdapterError(f"token groups name phrase-bank row {err.args[0]}, not among the rows "
                                    f"{tuple(rows)} appended to the keys") from None


@dataclass(frozen=True)
class PhraseBank:
    """Token embeddings of phrases located from themselves, phrase after phrase.

    embeddings (P, C_ctx): the rows the map layers project with their own to_k; spans[i] = the
    rows [start, stop) of phrase i.
    """

    embeddings: torch.Tensor
    spans: Tuple[Tuple[int, int], ...]

    @classmethod
    def stack(cls, encodings: Iterable[torch.Tensor]) -> "PhraseBank":
        """One bank from each phrase's token rows (n_i, C_ctx) (float32 on the CPU: one copy per
        device and dtype is made when the layers project it)."""
        rows, spans, start = [], [], 0
        for enc in encodings:
            if enc.ndim != 2:
                raise CharacterAdapterError(f"phrase encoding: expected (tokens, C), got {tuple(enc.shape)}")
            rows.append(enc.detach().float().cpu())
            spans.append((start, start + enc.shape[0]))
            start += enc.shape[0]
        if not rows or start == 0:
            raise CharacterAdapterError("phrase bank: no phrase token to locate a region with")
        return cls(torch.cat(rows), tuple(spans))

    def entries(self, phrase: int) -> Tuple[int, ...]:
        """Token-group entries of phrase `phrase`'s own tokens."""
        start, stop = self.spans[phrase]
        return tuple(bank_entry(row) for row in range(start, stop))

