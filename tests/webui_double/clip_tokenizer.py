"""Offline CLIP BPE tokenizer (double-only helper, not part of the WebUI).

Builds vocab.json + merges.txt from the BPE merge list that open-clip-torch ships
(open_clip/bpe_simple_vocab_16e6.txt.gz, the same merges as OpenAI CLIP) and loads a
transformers CLIPTokenizer from them, so ids match the real SD1 tokenizer
(BOS 49406, EOS 49407, ',</w>' 267). open_clip itself is not imported (it needs torchvision).
"""
import gzip
import importlib.util
import json
import os

VOCAB_SIZE = 49408


def bpe_path():
    """Path of open_clip's bundled BPE merges file."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("open-clip-torch is not installed: expected open_clip/bpe_simple_vocab_16e6.txt.gz")
    path = os.path.join(list(spec.submodule_search_locations)[0], "bpe_simple_vocab_16e6.txt.gz")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"expected the CLIP BPE file at {path}")
    return path


def _byte_symbols():
    """CLIP's reversible byte -> printable unicode table, in CLIP's order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def write_tokenizer_files(folder):
    """Write vocab.json and merges.txt for the 49408-token CLIP vocabulary into folder."""
    lines = gzip.open(bpe_path()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]  # open_clip keeps 48894 merges
    symbols = _byte_symbols()
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == VOCAB_SIZE, f"expected {VOCAB_SIZE} tokens, built {len(vocab)}"
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({token: i for i, token in enumerate(vocab)}, f)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return folder


def build_clip_tokenizer(folder):
    """A transformers CLIPTokenizer for the real CLIP vocabulary, built offline in folder (cached there)."""
    from transformers import CLIPTokenizer
    if not os.path.isfile(os.path.join(folder, "merges.txt")):
        write_tokenizer_files(folder)
    return CLIPTokenizer.from_pretrained(folder)
