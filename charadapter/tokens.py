"""Locating region phrases among the prompt's tokens, as the host's text encoder laid them out."""

from typing import List, Sequence

# The WebUI cuts a prompt into chunks of 75 tokens, each stored as [BOS] 75 tokens [EOS]
# (modules/sd_hijack_clip.py, TextConditionalModel.tokenize_line), encodes each chunk and
# concatenates the 77-token results along the token axis (TextConditionalModel.forward).


def find_subsequence(haystack: Sequence[int], needle: Sequence[int]) -> List[int]:
    """Start indices of every occurrence of `needle` in `haystack`."""
    n = len(needle)
    if n == 0 or n > len(haystack):
        return []
    first = needle[0]
    return [
        i for i in range(len(haystack) - n + 1)
        if haystack[i] == first and list(haystack[i:i + n]) == list(needle)
    ]


def phrase_positions(chunks: Sequence[Sequence[int]], phrase: Sequence[int]) -> List[int]:
    """Conditioning-axis positions of every occurrence of `phrase` in the prompt's chunks.

    `chunks` are the token lists of tokenize_line's chunks, BOS and EOS included (77 each); a
    phrase that a chunk border (BREAK or the 75-token limit) cuts in two is matched in neither
    half, which is also what the text encoder saw.
    """
    positions: List[int] = []
    offset = 0
    for chunk in chunks:
        for start in find_subsequence(chunk, phrase):
            positions.extend(offset + start + i for i in range(len(phrase)))
        offset += len(chunk)
    return sorted(set(positions))


def unplaced_phrase(phrase: str, tokens: int, chunk: int = 75) -> str:
    """Why a region phrase of `tokens` tokens was not found in its own prompt, naming it."""
    why = (f"is {tokens} tokens long; it must fit in one {chunk}-token chunk" if tokens > chunk
           else "gives no tokens" if tokens == 0
           else f"is cut by a {chunk}-token chunk border: the region phrases together are too long")
    shown = phrase if len(phrase) <= 40 else phrase[:40] + "..."
    return f"region phrase {shown!r} {why}"
