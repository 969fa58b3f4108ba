"""Fixtures shared by the fusion tests (imported by name into each test module): a tiny SD1.5
UNet, its attn2 layers and a random adapter for them, context width CTX."""

import pytest
import torch

from charadapter.layers import find_attn2_layers
from tiny_unet import sd15_unet

CTX = 32


def random_adapter(layers, seed: int, tokens: int = 4, regions: int = 3):
    """(per-layer (to_k_ip, to_v_ip), region tokens (R, T, CTX), negative tokens (T, CTX))."""
    gen = torch.Generator().manual_seed(seed)
    ip = [(torch.randn(l.inner_dim, CTX, generator=gen) / CTX ** 0.5,
           torch.randn(l.inner_dim, CTX, generator=gen) / CTX ** 0.5) for l in layers]
    return ip, torch.randn(regions, tokens, CTX, generator=gen), torch.randn(tokens, CTX, generator=gen)


@pytest.fixture(scope="module")
def unet():
    return sd15_unet(32, CTX, seed=11)


@pytest.fixture(scope="module")
def layers(unet):
    return find_attn2_layers(unet)


@pytest.fixture(scope="module")
def adapter(layers):
    return random_adapter(layers, 12)
