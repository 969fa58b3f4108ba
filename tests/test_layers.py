"""The attn2 layer table: count, order (IP-Adapter keys), widths, heads and levels."""

from collections import Counter

import pytest
import torch
from torch import nn

from charadapter.errors import CharacterAdapterError, CheckpointError
from charadapter.geometry import downsampled_hw
from charadapter.layers import check_adapter_layers, find_attn2_layers
from tiny_unet import SD15_DEPTH_LAYOUT, sd15_meta_unet, sd15_unet, sdxl_standin_unet
from ldm.modules.diffusionmodules.openaimodel import UNetModel

SD15_WIDTHS = [320, 320, 640, 640, 1280, 1280, 1280, 1280, 1280, 640, 640, 640, 320, 320, 320, 1280]
SD15_LEVELS = [0, 0, 1, 1, 2, 2, 2, 2, 2, 1, 1, 1, 0, 0, 0, 3]
SD15_BLOCKS = (["input_blocks.%d" % i for i in (1, 2, 4, 5, 7, 8)]
               + ["output_blocks.%d" % i for i in range(3, 12)] + ["middle_block"])


def test_sd15_table_real_widths():
    layers = find_attn2_layers(sd15_meta_unet())
    assert len(layers) == 16
    assert [l.inner_dim for l in layers] == SD15_WIDTHS
    assert [l.level for l in layers] == SD15_LEVELS
    assert all(l.heads == 8 and l.context_dim == 768 for l in layers)
    assert [l.index for l in layers] == list(range(16))
    assert [l.ip_key for l in layers] == [f"ip_adapter.{2 * i + 1}" for i in range(16)]
    assert [l.name for l in layers] == [f"{b}.1.transformer_blocks.0.attn2" for b in SD15_BLOCKS]


def test_sd15_tiny_table_matches_structure_and_runtime_grids():
    unet = sd15_unet(model_channels=32, context_dim=32)
    layers = find_attn2_layers(unet)
    assert [l.inner_dim for l in layers] == [w // 10 for w in SD15_WIDTHS]
    assert [l.level for l in layers] == SD15_LEVELS
    assert all(l.module is unet.get_submodule(l.name) for l in layers)
    # levels agree with the grids the UNet really runs on (non-square latent, row-major N)
    seen = {}
    handles = [l.module.register_forward_hook(
        lambda m, a, o, i=l.index: seen.__setitem__(i, o.shape[1])) for l in layers]
    try:
        with torch.no_grad():
            unet(torch.randn(1, 4, 16, 24), timesteps=torch.tensor([1.0]), context=torch.randn(1, 3, 32))
    finally:
        for h in handles:
            h.remove()
    for l in layers:
        h, w = downsampled_hw((16, 24), l.level)
        assert seen[l.index] == h * w, (l.name, l.level, seen[l.index])


def test_levels_come_from_resampler_positions():
    """ResBlock(down=True/up=True) instead of Downsample/Upsample modules: same levels."""
    kwargs = dict(SD15_DEPTH_LAYOUT, model_channels=32, context_dim=32, resblock_updown=True)
    unet = UNetModel(**kwargs)
    assert [l.level for l in find_attn2_layers(unet)] == SD15_LEVELS
    # and a different layout: two levels, attention everywhere
    kwargs = dict(SD15_DEPTH_LAYOUT, model_channels=32, context_dim=32, channel_mult=[1, 2],
                  attention_resolutions=[1, 2], num_res_blocks=1)
    layers = find_attn2_layers(UNetModel(**kwargs))
    assert [l.level for l in layers] == [0, 1, 1, 1, 0, 0, 1]
    assert [l.inner_dim for l in layers] == [32, 64, 64, 64, 32, 32, 64]


def test_sdxl_standin_table():
    layers = find_attn2_layers(sdxl_standin_unet())
    assert len(layers) == 70
    assert all(l.context_dim == 2048 for l in layers)
    by_part = Counter((l.name.split(".")[0], l.inner_dim, l.heads, l.level) for l in layers)
    assert by_part == {
        ("input_blocks", 640, 10, 1): 4, ("input_blocks", 1280, 20, 2): 20,
        ("output_blocks", 1280, 20, 2): 30, ("output_blocks", 640, 10, 1): 6,
        ("middle_block", 1280, 20, 2): 10,
    }
    names = [l.name for l in layers]
    assert names[:3] == ["input_blocks.4.1.transformer_blocks.0.attn2", "input_blocks.4.1.transformer_blocks.1.attn2",
                         "input_blocks.5.1.transformer_blocks.0.attn2"]
    assert names[4] == "input_blocks.7.1.transformer_blocks.0.attn2"
    assert names[24] == "output_blocks.0.1.transformer_blocks.0.attn2"
    assert names[54:60] == [f"output_blocks.{b}.1.transformer_blocks.{j}.attn2" for b in (3, 4, 5) for j in (0, 1)]
    assert names[60:] == [f"middle_block.1.transformer_blocks.{j}.attn2" for j in range(10)]
    # inside a block, transformer_blocks run in index order
    assert names[4:14] == [f"input_blocks.7.1.transformer_blocks.{j}.attn2" for j in range(10)]


def test_not_a_unet_names_what_is_missing():
    with pytest.raises(CharacterAdapterError, match="input_blocks"):
        find_attn2_layers(nn.Sequential(nn.Linear(2, 2)))


def test_unet_without_cross_attention_is_an_error():
    bare = nn.Module()  # the block names of a UNet, but no transformer blocks (e.g. replaced by an engine)
    bare.input_blocks, bare.middle_block, bare.output_blocks = nn.ModuleList(), nn.Sequential(), nn.ModuleList()
    with pytest.raises(CharacterAdapterError, match="no attn2 layers"):
        find_attn2_layers(bare)


def test_attn2_without_projection_attributes_is_an_error():
    unet = sd15_unet(32, 32)
    del unet.input_blocks[1][1].transformer_blocks[0].attn2.to_v
    with pytest.raises(CharacterAdapterError, match="to_v"):
        find_attn2_layers(unet)


def test_check_adapter_layers():
    layers = find_attn2_layers(sd15_meta_unet())
    good = [(torch.empty(l.inner_dim, 768), torch.empty(l.inner_dim, 768)) for l in layers]
    check_adapter_layers(layers, good, "ip.safetensors")
    with pytest.raises(CheckpointError, match=r"70 attn2 layers, the UNet has 16"):
        check_adapter_layers(layers, good * 4 + good[:6], "ip-sdxl.safetensors")
    bad = list(good)
    bad[3] = (torch.empty(640, 2048), torch.empty(640, 2048))
    with pytest.raises(CheckpointError, match=r"ip_adapter\.7\.to_k_ip\.weight in x\.bin has shape \(640, 2048\)"):
        check_adapter_layers(layers, bad, "x.bin")
