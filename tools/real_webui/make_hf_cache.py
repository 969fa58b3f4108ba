"""Offline Hugging Face cache entry for openai/clip-vit-large-patch14 (config + tokenizer only).

The WebUI's SD1 text encoder (ldm FrozenCLIPEmbedder) asks the hub for this repo's config and
tokenizer; the weights themselves come from the checkpoint. Tokens ids are the real ones: the
vocabulary is rebuilt from the BPE merges file that open-clip-torch ships.

    python make_hf_cache.py <HF_HOME>     # then run the WebUI with HF_HOME=<HF_HOME> HF_HUB_OFFLINE=1
"""
import gzip
import importlib.util
import json
import os
import sys

REPO = "openai/clip-vit-large-patch14"
REVISION = "0" * 40  # any commit-like name: offline lookups follow refs/main

TEXT_CONFIG = dict(  # the published CLIPTextConfig of ViT-L/14 (SD1's text encoder)
    vocab_size=49408, hidden_size=768, intermediate_size=3072, projection_dim=768, num_hidden_layers=12,
    num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
    attention_dropout=0.0, dropout=0.0, initializer_range=0.02, initializer_factor=1.0,
    bos_token_id=0, eos_token_id=2, pad_token_id=1, model_type="clip_text_model",
)
VISION_CONFIG = dict(
    hidden_size=1024, intermediate_size=4096, projection_dim=768, num_hidden_layers=24, num_attention_heads=16,
    image_size=224, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5, attention_dropout=0.0,
    dropout=0.0, initializer_range=0.02, initializer_factor=1.0, num_channels=3, model_type="clip_vision_model",
)


def _bytes_to_unicode():
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    codes, extra = printable[:], 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def vocab_and_merges():
    spec = importlib.util.find_spec("open_clip")
    bpe = os.path.join(os.path.dirname(spec.origin), "bpe_simple_vocab_16e6.txt.gz")
    lines = gzip.open(bpe).read().decode("utf-8").split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]
    chars = _bytes_to_unicode()
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408, len(vocab)
    return vocab, merges


def main(hf_home):
    repo_dir = os.path.join(hf_home, "hub", "models--" + REPO.replace("/", "--"))
    snap = os.path.join(repo_dir, "snapshots", REVISION)
    os.makedirs(snap, exist_ok=True)
    os.makedirs(os.path.join(repo_dir, "refs"), exist_ok=True)
    with open(os.path.join(repo_dir, "refs", "main"), "w") as f:
        f.write(REVISION)
    vocab, merges = vocab_and_merges()
    with open(os.path.join(snap, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f, ensure_ascii=False)
    with open(os.path.join(snap, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
               "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    with open(os.path.join(snap, "tokenizer_config.json"), "w") as f:
        json.dump(dict(special, model_max_length=77, do_lower_case=True, errors="replace",
                       add_prefix_space=False, tokenizer_class="CLIPTokenizer"), f, indent=1)
    with open(os.path.join(snap, "special_tokens_map.json"), "w") as f:
        json.dump(special, f, indent=1)
    config = dict(architectures=["CLIPModel"], model_type="clip", projection_dim=768, logit_scale_init_value=2.6592,
                  initializer_factor=1.0, text_config=TEXT_CONFIG, vision_config=VISION_CONFIG)
    with open(os.path.join(snap, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    print(snap)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.expanduser("~/.cache/huggingface"))
