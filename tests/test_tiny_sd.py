"""The tiny SD1 test model is a real ldm LatentDiffusion with SD's tokenizer and latent geometry."""

import importlib.util
import os
import sys

import pytest
import torch

import tiny_sd
from tiny_sd import (BOS_TOKEN_ID, EOS_TOKEN_ID, LATENT_CHANNELS, LATENT_FACTOR, MAX_LENGTH,
                     SCALE_FACTOR, TINY_CONTEXT_DIM, TINY_IMAGE_SIZE)

PROMPTS = [
    "a red jacket",
    "A photo of a cat, (masterpiece:1.2), [blurry]",
    "2 girls' blue-haired hats!!  in   Tokyo 2024",
    "portrait of a café owner, 8k, highly detailed",
]


@pytest.fixture(scope="module")
def sd():
    return tiny_sd.make_tiny_sd(seed=0)


def _open_clip_simple_tokenizer():
    """open_clip's SimpleTokenizer, loaded from its file (the package itself needs torchvision)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        pytest.skip("open-clip-torch is not installed")
    path = os.path.join(os.path.dirname(spec.origin), "tokenizer.py")
    module_spec = importlib.util.spec_from_file_location("_open_clip_tokenizer", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.SimpleTokenizer()


def test_parts_are_the_webui_ldm_classes(sd):
    ldm = tiny_sd.LDM
    assert type(sd) is ldm.ddpm.LatentDiffusion
    assert type(sd.first_stage_model) is ldm.autoencoder.AutoencoderKL
    assert type(sd.cond_stage_model) is ldm.encoders.FrozenCLIPEmbedder  # what sd_hijack wraps
    assert type(sd.model.diffusion_model) is ldm.openaimodel.UNetModel
    assert sd.model.conditioning_key == "crossattn"
    assert not sd.training and sd.dtype == torch.float32 and sd.device.type == "cpu"
    assert sd.scale_factor == SCALE_FACTOR
    assert sd.alphas_cumprod.shape == (1000,)
    # SD1's scaled-linear schedule: sqrt(beta) linear from sqrt(0.00085) to sqrt(0.012)
    betas = (torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2)
    torch.testing.assert_close(sd.alphas_cumprod, torch.cumprod(1 - betas, 0).float())


def test_unet_has_sd15_cross_attention_layout(sd):
    attn2 = [(n, m) for n, m in sd.model.diffusion_model.named_modules() if n.endswith("attn2")]
    blocks = [n.split(".")[0] for n, _ in attn2]
    assert (blocks.count("input_blocks"), blocks.count("middle_block"), blocks.count("output_blocks")) == (6, 1, 9)
    assert all(m.to_k.in_features == TINY_CONTEXT_DIM for _, m in attn2)
    assert all(m.heads == 8 for _, m in attn2)


def test_vae_encodes_64px_to_8x8_latents_and_back(sd):
    torch.manual_seed(0)
    image = torch.rand(1, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE) * 2 - 1
    with torch.no_grad():
        posterior = sd.encode_first_stage(image)
        torch.manual_seed(1)
        z = sd.get_first_stage_encoding(posterior)
        torch.manual_seed(1)
        expected_z = SCALE_FACTOR * posterior.sample()
        decoded = sd.decode_first_stage(z)
        direct = sd.first_stage_model.decode((1.0 / SCALE_FACTOR) * z)
    side = TINY_IMAGE_SIZE // LATENT_FACTOR
    assert z.shape == (1, LATENT_CHANNELS, side, side)
    torch.testing.assert_close(z, expected_z, rtol=0, atol=0)
    assert decoded.shape == image.shape and torch.isfinite(decoded).all()
    torch.testing.assert_close(decoded, direct, rtol=0, atol=0)


def test_learned_conditioning_is_the_clip_last_hidden_state(sd):
    with torch.no_grad():
        cond = sd.get_learned_conditioning(["a red jacket"])
        ids = torch.tensor([[BOS_TOKEN_ID, 320, 736, 6164] + [EOS_TOKEN_ID] * (MAX_LENGTH - 4)])
        expected = sd.cond_stage_model.transformer(input_ids=ids).last_hidden_state
    assert cond.shape == (1, MAX_LENGTH, TINY_CONTEXT_DIM)
    torch.testing.assert_close(cond, expected, rtol=0, atol=0)


def test_apply_model_runs_the_unet_with_cross_attention(sd):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, LATENT_CHANNELS, 8, 8, generator=gen)
    t = torch.tensor([10, 700])
    with torch.no_grad():
        cond = sd.get_learned_conditioning(["a red jacket", "a blue hat"])
        eps = sd.apply_model(x, t, cond)
        direct = sd.model.diffusion_model(x, t, context=cond)
        swapped = sd.apply_model(x, t, cond.flip(0))
    assert eps.shape == x.shape and torch.isfinite(eps).all()
    torch.testing.assert_close(eps, direct, rtol=0, atol=0)
    assert eps.abs().mean() > 1e-2  # zero-initialised outputs were given weights
    assert (eps - swapped).abs().max() > 1e-4  # the text reaches the output through attn2


def test_tokenizer_matches_open_clip_simple_tokenizer(sd):
    reference = _open_clip_simple_tokenizer()
    tokenizer = sd.cond_stage_model.tokenizer
    ours = tokenizer(PROMPTS, truncation=False, add_special_tokens=False)["input_ids"]
    assert ours == [reference.encode(p) for p in PROMPTS]
    assert ours[0] == [320, 736, 6164]
    # the special tokens by name: open_clip 2.20 (the WebUI's pin) has no sot_token_id / eot_token_id
    specials = (reference.encoder["<start_of_text>"], reference.encoder["<end_of_text>"])
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == specials
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (BOS_TOKEN_ID, EOS_TOKEN_ID)
    vocab = tokenizer.get_vocab()
    assert len(vocab) == len(reference.encoder) == tiny_sd.CLIP_VOCAB_SIZE
    assert vocab[",</w>"] == reference.encoder[",</w>"] == 267  # the WebUI's comma_token


def test_seed_fixes_every_weight_and_checkpoints_round_trip(sd, tmp_path):
    reference = sd.state_dict()
    other = tiny_sd.make_tiny_sd(seed=1)
    state = tiny_sd.tiny_sd_state_dict(other)
    unet = [k for k in reference if k.startswith("model.diffusion_model.")]
    assert not any(torch.equal(state[k], reference[k]) for k in unet if reference[k].ndim >= 2)
    for prefix in tiny_sd.CHECKPOINT_PREFIXES:
        assert any(k.startswith(prefix) for k in state), prefix
    assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in state  # SD1 names

    path = tiny_sd.save_tiny_sd_checkpoint(other, str(tmp_path / "tiny.safetensors"))
    loaded = tiny_sd.tiny_sd_state_dict(tiny_sd.load_tiny_sd_checkpoint(path))
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)

    again = tiny_sd.make_tiny_sd(seed=0).state_dict()
    assert again.keys() == reference.keys()
    assert all(torch.equal(again[k], reference[k]) for k in reference)


def test_import_left_no_placeholder_modules():
    for name in ("torchvision", "torchvision.utils", "open_clip"):
        module = sys.modules.get(name)
        assert module is None or getattr(module, "__file__", None) is not None, name
