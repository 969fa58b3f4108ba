"""Offline Hugging Face cache entry for openai/clip-vit-large-patch14 (config + tokenizer only).

The WebUI's SD1 text encoder (ldm FrozenCLIPEmbedder) asks the hub for this repo's config and
tokenizer; the weights themselves come from the checkpoint. Tokens ids are the real ones: the
vocabulary is rebuilt from the BPE merges file that open-clip-torch ships.

    python make_hf_cache.py <HF_HOME>     # then run the WebUI with HF_HOME=<HF_HOME> HF_HUB_OFFLINE=1
"""
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests"))
from tiny_sd import write_clip_tokenizer_files  # noqa: E402

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


def main(hf_home):
    repo_dir = os.path.join(hf_home, "hub", "models--" + REPO.replace("/", "--"))
    snap = os.path.join(repo_dir, "snapshots", REVISION)
    os.makedirs(snap, exist_ok=True)
    os.makedirs(os.path.join(repo_dir, "refs"), exist_ok=True)
    with open(os.path.join(repo_dir, "refs", "main"), "w") as f:
        f.write(REVISION)
    write_clip_tokenizer_files(snap)  # the same files the tests' tiny SD1 model uses
    config = dict(architectures=["CLIPModel"], model_type="clip", projection_dim=768, logit_scale_init_value=2.6592,
                  initializer_factor=1.0, text_config=TEXT_CONFIG, vision_config=VISION_CONFIG)
    with open(os.path.join(snap, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    print(snap)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.expanduser("~/.cache/huggingface"))
