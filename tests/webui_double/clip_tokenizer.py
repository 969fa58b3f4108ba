"""Offline CLIP BPE tokenizer for tests of the double (double-only helper, not part of the WebUI).

A transformers CLIPTokenizer whose ids match the real SD1 tokenizer (BOS 49406, EOS 49407,
',</w>' 267), written by tests/tiny_sd.py from the BPE merges that open-clip-torch ships.
"""
import os

from tiny_sd import write_clip_tokenizer_files  # tests/ is on sys.path under pytest


def build_clip_tokenizer(folder):
    """A transformers CLIPTokenizer for the real CLIP vocabulary, built offline in folder (cached there)."""
    from transformers import CLIPTokenizer
    if not os.path.isfile(os.path.join(folder, "merges.txt")):
        write_clip_tokenizer_files(folder)
    return CLIPTokenizer.from_pretrained(folder)
