"""Region crops -> CLIP features -> IP-Adapter tokens, on real SD1.5 adapter shapes."""

import torch
from PIL import Image
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from charadapter.adapter import RegionEncoder
from charadapter.checkpoint import weights_from_state_dict
from fake_weights import variant_state


def tiny_clip(hidden: int, projection: int) -> CLIPVisionModelWithProjection:
    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=hidden, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, image_size=224, patch_size=56, projection_dim=projection)
    return CLIPVisionModelWithProjection(config).eval()


CROPS = [Image.new("RGB", (40, 90), (200, 30, 30)), Image.new("RGB", (120, 50), (30, 30, 200))]


def test_base_adapter_tokens_and_zero_negative():
    weights = weights_from_state_dict(variant_state("sd15", dtype=torch.float32), "ip-adapter_sd15")
    encoder = RegionEncoder(weights, tiny_clip(32, 1024))  # base takes the 1024-wide image_embeds
    tokens = encoder.encode(CROPS)
    assert tokens.cond.shape == (2, 4, 768) and tokens.negative.shape == (4, 768)
    # IP-Adapter's negative for base models: the projection of a zero embedding
    expected = encoder.projection(torch.zeros(1, 1024))[0]
    assert torch.allclose(tokens.negative, expected)
    assert not torch.allclose(tokens.cond[0], tokens.cond[1])


def test_plus_adapter_uses_penultimate_states_and_zero_image_negative():
    weights = weights_from_state_dict(variant_state("sd15_plus", dtype=torch.float32), "ip-adapter-plus_sd15")
    clip = tiny_clip(1280, 1024)  # Plus takes 1280-wide hidden states (ViT-H width)
    encoder = RegionEncoder(weights, clip)
    tokens = encoder.encode(CROPS)
    assert tokens.cond.shape == (2, 16, 768) and tokens.negative.shape == (16, 768)
    with torch.no_grad():
        hidden = clip(pixel_values=torch.zeros(1, 3, 224, 224), output_hidden_states=True).hidden_states[-2]
        expected = encoder.projection(hidden)[0]
    assert torch.allclose(tokens.negative, expected, atol=1e-5)
