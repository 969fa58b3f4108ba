"""The host-free parts of prompt reading: rows shared out when the batch is not what the prompts
give, and the message for a region phrase the segmentation prompt cannot hold."""

from charadapter.tokens import unplaced_phrase
from charadapter.webui.prompts import share_rows


def test_rows_follow_the_prompts_when_they_match():
    texts = [["a", "b"], ["c"]]
    assert share_rows(texts, 3) is texts


def test_rows_are_shared_out_evenly_when_another_extension_changed_the_batch():
    # two images, six cond rows: three each, each image repeating its last text
    assert share_rows([["a", "b"], ["c"]], 6) == [["a", "b", "b"], ["c", "c", "c"]]
    # fewer rows than texts: one each, the rest to the last image
    assert share_rows([["a", "b"], ["c", "d"]], 3) == [["a"], ["c", "d"]]
    # fewer rows than images: every image still gets one, the last none
    assert share_rows([["a"], ["b"], ["c"]], 2) == [["a"], ["b"], []]


def test_unplaced_phrase_says_why():
    assert unplaced_phrase("face", 80) == "region phrase 'face' is 80 tokens long; it must fit in one 75-token chunk"
    assert unplaced_phrase("", 0) == "region phrase '' gives no tokens"
    long = "x" * 50
    assert unplaced_phrase(long, 3) == (f"region phrase {'x' * 40 + '...'!r} is cut by a 75-token chunk border: "
                                        f"the region phrases together are too long")
