"""Image projections against diffusers' own (the numerical oracle), fed the same state dicts.

diffusers builds its modules from an IP-Adapter state dict with
UNet2DConditionLoadersMixin._convert_ip_adapter_image_proj_to_diffusers (loaders/unet.py),
which also renames the keys: that conversion is the oracle's path, ours loads the file keys as
they are.
"""

import pytest
import torch

import fake_weights as fw
from charadapter.checkpoint import IPAdapterWeights
from charadapter.errors import CharacterAdapterError, CheckpointError
from charadapter.projection import (
    ImageProjection, MLPProjection, Resampler, build_image_projection, infer_projection_config, merge_heads,
    split_heads,
)

TOL = 1e-5


def _weights(state):
    """Weights holding only a projection: all that build_image_projection reads."""
    return IPAdapterWeights(spec=None, image_proj=state, layers=[], source="test.safetensors")


def _oracle(state):
    """diffusers' module for this IP-Adapter projection, built by diffusers' converter."""
    from diffusers.loaders.unet import UNet2DConditionLoadersMixin

    # `self` is only used when low_cpu_mem_usage=True
    module = UNet2DConditionLoadersMixin._convert_ip_adapter_image_proj_to_diffusers(
        None, dict(state), low_cpu_mem_usage=False)
    return module.float().eval()


def _compare(name, state, x):
    """Max |ours - diffusers| on input x, printed for the record."""
    ours = build_image_projection(_weights(state))
    with torch.no_grad():
        a, b = ours(x), _oracle(state)(x)
    assert a.shape == b.shape
    diff = (a - b).abs().max().item()
    print(f"ORACLE {name}: out {tuple(a.shape)} max|ours - diffusers| = {diff:.3e} (|out| max {b.abs().max():.2f})")
    return ours, a, diff


@pytest.mark.parametrize("in_dim,context", [(1024, 768), (1280, 2048)], ids=["sd15", "sdxl"])
def test_base_projection_matches_diffusers(in_dim, context):
    state = fw.linear_state(in_dim, 4, context, fw.Filler(10))
    x = torch.randn(3, in_dim, generator=torch.Generator().manual_seed(0))
    ours, out, diff = _compare(f"base {in_dim}->4x{context}", state, x)
    assert isinstance(ours, ImageProjection)
    assert out.shape == (3, 4, context)
    assert diff <= TOL


@pytest.mark.parametrize("dim,heads", [(128, 2), (96, 2)], ids=["inner=dim", "inner!=dim"])
def test_small_resampler_matches_diffusers(dim, heads):
    # depth 4: diffusers' converter builds IPAdapterPlusImageProjection with its default depth
    state = fw.resampler_state(48, dim, 80, 5, depth=4, heads=heads, f=fw.Filler(11))
    x = torch.randn(2, 7, 48, generator=torch.Generator().manual_seed(1))
    ours, out, diff = _compare(f"resampler small dim={dim} heads={heads}", state, x)
    assert isinstance(ours, Resampler)
    assert out.shape == (2, 5, 80)
    assert diff <= TOL


def test_real_sd15_plus_resampler_matches_diffusers():
    state = fw.resampler_state(1280, 768, 768, 16, depth=4, heads=12, f=fw.Filler(12))
    x = torch.randn(2, 257, 1280, generator=torch.Generator().manual_seed(2))  # ViT-H/14 penultimate states
    ours, out, diff = _compare("resampler real SD1.5 Plus", state, x)
    assert out.shape == (2, 16, 768)
    assert diff <= TOL
    cfg = infer_projection_config(state)
    got = (cfg.depth, cfg.heads, cfg.dim_head, cfg.num_tokens, cfg.hidden_dim, cfg.in_dim, cfg.out_dim, cfg.ff_dim)
    assert got == (4, 12, 64, 16, 768, 1280, 768, 3072)


def test_full_face_matches_diffusers():
    state = fw.mlp_state(1280, 768, fw.Filler(13))
    x = torch.randn(2, 257, 1280, generator=torch.Generator().manual_seed(3))
    ours, out, diff = _compare("full-face MLP real SD1.5", state, x)
    assert isinstance(ours, MLPProjection)
    assert out.shape == (2, 257, 768)
    assert diff <= TOL


def test_sdxl_plus_hyper_parameters_from_shapes():
    state = fw.resampler_state(1280, 1280, 2048, 16, depth=4, heads=20, f=fw.Filler(14, torch.float16, zeros=True))
    cfg = infer_projection_config(state)
    assert (cfg.kind, cfg.depth, cfg.heads, cfg.dim_head, cfg.hidden_dim, cfg.out_dim, cfg.ff_dim) == (
        "resampler", 4, 20, 64, 1280, 2048, 5120)


def test_parameter_names_are_the_file_keys():
    for state in (fw.linear_state(64, 3, 32), fw.mlp_state(40, 24),
                  fw.resampler_state(40, 64, 24, 4, depth=3, heads=1)):
        module = build_image_projection(_weights(state))
        assert set(module.state_dict()) == set(state)
        assert all(not p.requires_grad for p in module.parameters()) and not module.training


def test_low_precision_build_stays_close():
    state = fw.resampler_state(48, 128, 64, 4, depth=2, heads=2, f=fw.Filler(15))
    x = torch.randn(2, 9, 48, generator=torch.Generator().manual_seed(4))
    ref = build_image_projection(_weights(state))(x)
    low = build_image_projection(_weights(state), dtype=torch.bfloat16)(x.to(torch.bfloat16))
    assert low.dtype == torch.bfloat16
    err = (low.float() - ref).abs().max().item()
    print(f"bf16 resampler max|diff| vs fp32 = {err:.3e}")
    assert err < 0.1  # bf16 keeps ~3 significant digits; outputs are LayerNorm-scaled O(1)


def test_heads_split_and_merge_shapes():
    x = torch.randn(2, 5, 3 * 4)  # (B, T, H*D)
    heads = split_heads(x, 3)
    assert heads.shape == (2, 3, 5, 4)  # (B, H, T, D)
    assert torch.equal(heads[:, 1], x[:, :, 4:8])
    assert torch.equal(merge_heads(heads), x)


@pytest.mark.parametrize("state,x,width", [
    (fw.linear_state(1024, 4, 768), torch.zeros(2, 1280), "1024"),  # bigG embeds into a ViT-H adapter
    (fw.resampler_state(1280, 64, 32, 4, depth=1, heads=1), torch.zeros(2, 257, 1664), "1280"),
    (fw.resampler_state(1280, 64, 32, 4, depth=1, heads=1), torch.zeros(2, 1024), "1280"),  # embeds into Plus
    (fw.mlp_state(1280, 32), torch.zeros(2, 257, 1024), "1280"),
], ids=["base", "plus-width", "plus-rank", "full-face"])
def test_wrong_features_are_named(state, x, width):
    module = build_image_projection(_weights(state))
    with pytest.raises(CharacterAdapterError) as info:
        module(x)
    assert width in str(info.value) and str(list(x.shape)) in str(info.value)


def test_unknown_projection_layout():
    with pytest.raises(CheckpointError) as info:
        build_image_projection(_weights({"image_embeds.weight": torch.zeros(4, 4)}))
    assert "test.safetensors" in str(info.value) and "image_embeds.weight" in str(info.value)


def test_resampler_blocks_must_be_contiguous():
    state = fw.resampler_state(40, 64, 24, 4, depth=3, heads=1)
    state = {k: v for k, v in state.items() if not k.startswith("layers.1.")}
    with pytest.raises(CheckpointError, match=r"numbered 0..n-1, found \[0, 2\]"):
        build_image_projection(_weights(state))


# ---------------------------------------------------------------- layer order, from diffusers


def _tiny_unet_attn2_widths(cfg, scale):
    """attn2 widths of a tiny diffusers UNet in attn_processors order, mapped to real widths."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, norm_num_groups=4,
                                cross_attention_dim=8, attention_head_dim=2, **cfg)
    names = list(unet.attn_processors)
    attn2 = [i for i, n in enumerate(names) if n.endswith("attn2.processor")]
    # attn1 and attn2 alternate, so attn2 sits at the odd positions that IP-Adapter's key numbers use
    assert attn2 == list(range(1, len(names), 2))
    widths = [unet.get_submodule(names[i][: -len(".processor")]).to_q.in_features for i in attn2]
    blocks = [names[i].split(".")[0] for i in attn2]
    return tuple(scale[w] for w in widths), blocks


def test_layer_widths_match_diffusers_processor_order():
    sd15 = dict(
        block_out_channels=(8, 16, 32, 32), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )
    widths, blocks = _tiny_unet_attn2_widths(sd15, {8: 320, 16: 640, 32: 1280})
    assert widths == fw.SD15_WIDTHS
    # registration order of UNet2DConditionModel.__init__: down_blocks, up_blocks, then mid_block
    assert blocks == ["down_blocks"] * 6 + ["up_blocks"] * 9 + ["mid_block"]

    sdxl = dict(
        block_out_channels=(8, 16, 32), layers_per_block=2, transformer_layers_per_block=(1, 2, 10),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    )
    widths, blocks = _tiny_unet_attn2_widths(sdxl, {8: 320, 16: 640, 32: 1280})
    assert widths == fw.SDXL_WIDTHS
    assert blocks == ["down_blocks"] * 24 + ["up_blocks"] * 36 + ["mid_block"] * 10


