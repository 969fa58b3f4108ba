import pytest

from charadapter.cache import BoundedCache
from charadapter.tokens import find_subsequence, phrase_positions

BOS, EOS = 49406, 49407


def chunk(tokens):
    """A 77-token chunk as tokenize_line stores it: BOS, 75 tokens padded with EOS, EOS."""
    return [BOS] + list(tokens) + [EOS] * (75 - len(tokens)) + [EOS]


def test_find_subsequence_all_occurrences():
    assert find_subsequence([1, 2, 3, 1, 2], [1, 2]) == [0, 3]
    assert find_subsequence([1, 2], []) == []
    assert find_subsequence([1], [1, 2]) == []


def test_phrase_positions_skip_bos_and_follow_chunks():
    chunks = [chunk([5, 6, 7]), chunk([8, 6, 7])]
    assert phrase_positions(chunks, [6, 7]) == [2, 3, 77 + 2, 77 + 3]


def test_phrase_cut_by_chunk_border_is_not_matched():
    chunks = [chunk([1] * 74 + [6]), chunk([7])]
    assert phrase_positions(chunks, [6, 7]) == []


def test_bounded_cache_evicts_least_recent_and_counts():
    evicted = []
    cache = BoundedCache(2, on_evict=evicted.append)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1
    cache.put("c", 3)
    assert "b" not in cache and evicted == [2] and len(cache) == 2
    assert cache.get_or_create("d", lambda: 4) == 4
    assert cache.hits == 1 and cache.misses == 1
    cache.capacity = 0
    assert len(cache) == 0 and evicted == [2, 1, 3, 4]


def test_get_or_create_does_not_store_failures():
    cache = BoundedCache(2)

    def boom():
        raise RuntimeError("no")

    with pytest.raises(RuntimeError):
        cache.get_or_create("k", boom)
    assert "k" not in cache
