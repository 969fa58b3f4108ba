"""Oracle: our hooks on the WebUI's ldm UNet give the same numbers as diffusers' IP-Adapter.

A tiny SD1.5-shaped ldm UNetModel (random weights) is converted with diffusers' own converter
(diffusers.loaders.single_file_utils: create_unet_diffusers_config_from_ldm +
convert_ldm_unet_checkpoint); IP-Adapter layers are set with diffusers' own loader mapping
(UNet2DConditionModel._convert_ip_adapter_attn_to_diffusers, which numbers the attn2 processors
1, 3, 5, ... in attn_processors order), so a match also proves our layer order.
"""

import pytest
import torch
from torch import nn

from charadapter.attention import ip_keys_values
from charadapter.hooks import HookSession, RegionState, plan_region_hooks
from charadapter.layers import find_attn2_layers
from charadapter.masks import mask_pyramid
from tiny_unet import SD15_DEPTH_LAYOUT, sd15_unet

diffusers = pytest.importorskip("diffusers")
from diffusers import UNet2DConditionModel  # noqa: E402
from diffusers.image_processor import IPAdapterMaskProcessor  # noqa: E402
from diffusers.loaders.single_file_utils import (  # noqa: E402
    convert_ldm_unet_checkpoint,
    create_unet_diffusers_config_from_ldm,
)
from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0  # noqa: E402
from diffusers.models.embeddings import MultiIPAdapterImageProjection  # noqa: E402

CTX = 32          # text/image token width (SD1.5: 768)
CHANNELS = 32     # model_channels (SD1.5: 320)
TOKENS = 4        # image tokens per region (IP-Adapter base)
LATENT = (16, 16)
TOL = 1e-5


@pytest.fixture(scope="module")
def pair():
    """(ldm unet, diffusers unet with IP-Adapter processors, IP-Adapter state dict)."""
    ldm_unet = sd15_unet(CHANNELS, CTX, seed=0)
    params = dict(SD15_DEPTH_LAYOUT, model_channels=CHANNELS, context_dim=CTX)
    original_config = {"model": {"params": {
        "unet_config": {"params": params},
        "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}},
    }}}
    checkpoint = {"model.diffusion_model." + k: v for k, v in ldm_unet.state_dict().items()}
    config = create_unet_diffusers_config_from_ldm(original_config, checkpoint, image_size=128)
    d_unet = UNet2DConditionModel(**config)
    d_unet.load_state_dict(convert_ldm_unet_checkpoint(checkpoint, config), strict=True)
    d_unet.eval()

    layers = find_attn2_layers(ldm_unet)
    gen = torch.Generator().manual_seed(1)
    ip = {}
    for layer in layers:
        for tag in ("to_k_ip", "to_v_ip"):
            w = torch.randn(layer.inner_dim, CTX, generator=gen) / CTX ** 0.5
            ip[f"{2 * layer.index + 1}.{tag}.weight"] = w
    state_dict = {"image_proj": {"proj.weight": torch.zeros(TOKENS * CTX, 8)}, "ip_adapter": ip}
    d_unet.set_attn_processor(d_unet._convert_ip_adapter_attn_to_diffusers([state_dict], low_cpu_mem_usage=False))
    # image tokens go in as already projected: identity projection
    d_unet.encoder_hid_proj = MultiIPAdapterImageProjection([nn.Identity()])
    d_unet.config.encoder_hid_dim_type = "ip_image_proj"
    return ldm_unet, d_unet, state_dict


def _inputs(seed=2, batch=2):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, *LATENT, generator=gen)
    t = torch.tensor([10.0, 600.0])[:batch]
    ctx = torch.randn(batch, 7, CTX, generator=gen)
    return x, t, ctx


def _set_scale(d_unet, scale):
    for proc in d_unet.attn_processors.values():
        if isinstance(proc, IPAdapterAttnProcessor2_0):
            proc.scale = [scale]


def _kv(layers, state_dict, tokens):
    """Per layer (K, V) (R, S, T, C_inner) from region tokens (R, S, T, CTX) with the file's weights."""
    out = []
    for layer in layers:
        wk = state_dict["ip_adapter"][f"{2 * layer.index + 1}.to_k_ip.weight"]
        wv = state_dict["ip_adapter"][f"{2 * layer.index + 1}.to_v_ip.weight"]
        out.append(ip_keys_values(tokens, wk, wv))
    return out


def _ours(ldm_unet, state, x, t, ctx):
    layers = find_attn2_layers(ldm_unet)
    session = HookSession(root=ldm_unet)
    plan_region_hooks(session, ldm_unet, layers, state)
    with torch.no_grad(), session:
        return ldm_unet(x, timesteps=t, context=ctx)


def test_plain_outputs_match(pair):
    ldm_unet, d_unet, _ = pair
    x, t, ctx = _inputs()
    _set_scale(d_unet, 0.0)  # scale 0: diffusers skips the IP term
    with torch.no_grad():
        a = ldm_unet(x, timesteps=t, context=ctx)
        b = d_unet(x, t, encoder_hidden_states=ctx,
                   added_cond_kwargs={"image_embeds": [torch.zeros(2, 1, TOKENS, CTX)]}).sample
    diff = (a - b).abs().max().item()
    print(f"\nplain ldm vs diffusers: max abs diff {diff:.3e} (output max {a.abs().max().item():.3f})")
    assert diff <= TOL


def test_one_region_matches_ip_adapter(pair):
    ldm_unet, d_unet, state_dict = pair
    layers = find_attn2_layers(ldm_unet)
    x, t, ctx = _inputs()
    scale = 0.8
    tokens = torch.randn(2, TOKENS, CTX, generator=torch.Generator().manual_seed(3))  # (B, T, CTX)
    _set_scale(d_unet, scale)
    with torch.no_grad():
        ref = d_unet(x, t, encoder_hidden_states=ctx, added_cond_kwargs={"image_embeds": [tokens[:, None]]}).sample
        plain = ldm_unet(x, timesteps=t, context=ctx)
    # one region, one token set per row (S = B), M = 1, weight = scale
    state = RegionState(kv=_kv(layers, state_dict, tokens[None]), weights=torch.tensor([scale]))
    ours = _ours(ldm_unet, state, x, t, ctx)
    diff = (ours - ref).abs().max().item()
    effect = (ref - plain).abs().max().item()
    print(f"\none region, M=1: max abs diff {diff:.3e} (IP term moves the output by {effect:.3f})")
    assert effect > 1e-2, "the IP term should change the output noticeably"
    assert diff <= TOL
    # the session left nothing behind
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in ldm_unet.modules())


def _block_masks():
    """Two regions on the 16x16 latent: left / right halves, with soft values (1, 2, 16, 16)."""
    m = torch.zeros(1, 2, *LATENT)
    m[0, 0, :, :8] = 1.0
    m[0, 0, :8, 8:] = 0.25
    m[0, 1] = 1.0 - m[0, 0]
    return m


def test_static_masks_match_ip_adapter_masks(pair):
    ldm_unet, d_unet, state_dict = pair
    layers = find_attn2_layers(ldm_unet)
    x, t, ctx = _inputs()
    weights = [0.7, 1.2]
    tokens = torch.randn(2, 2, TOKENS, CTX, generator=torch.Generator().manual_seed(4))  # (B, R, T, CTX)
    masks = _block_masks()
    _set_scale(d_unet, weights)
    with torch.no_grad():
        ref = d_unet(x, t, encoder_hidden_states=ctx, added_cond_kwargs={"image_embeds": [tokens]},
                     cross_attention_kwargs={"ip_adapter_masks": [masks]}).sample
    # our masks per layer grid: exactly what diffusers' processor uses at that grid
    pyramid = {}
    for layer in layers:
        h, w = LATENT[0] >> layer.level, LATENT[1] >> layer.level
        per_region = [IPAdapterMaskProcessor.downsample(masks[:, r], 2, h * w, 1)[..., 0]
                      for r in range(2)]  # each (B, N)
        pyramid[(h, w)] = torch.stack(per_region, dim=1)  # (B, R, N)
    state = RegionState(kv=_kv(layers, state_dict, tokens.transpose(0, 1)), weights=torch.tensor(weights),
                        masks=pyramid)
    ours = _ours(ldm_unet, state, x, t, ctx)
    diff = (ours - ref).abs().max().item()
    unmasked = _ours(ldm_unet, RegionState(kv=state.kv, weights=state.weights), x, t, ctx)
    effect = (ref - unmasked).abs().max().item()
    print(f"\ntwo regions, static masks: max abs diff {diff:.3e} (masks move the output by {effect:.3f})")
    assert effect > 1e-2
    assert diff <= TOL

    # Our own pyramid (area resize) keeps the block mask exact at every level; diffusers'
    # bicubic downsampling does not at block borders, which is why the oracle gets its masks.
    full = torch.cat([torch.zeros(1, 1, *LATENT), masks], dim=1).flatten(2)  # (1, R+1, N)
    ours_pyr = mask_pyramid(full, LATENT, {layer.level for layer in layers})
    for (h, w), m in ours_pyr.items():
        exact = masks[:, :, :: LATENT[0] // h, :: LATENT[1] // w].flatten(2)  # (1, R, N): 8x8 blocks
        assert torch.allclose(m, exact, atol=1e-6), (h, w)
        bicubic = (pyramid[(h, w)][:1] - exact).abs().max().item()
        print(f"grid {h}x{w}: ours exact; diffusers bicubic differs by up to {bicubic:.3f}")


# --- region_ip_delta and text maps against the formula, written out naively ----------------

def _naive_delta(q, keys, values, heads, masks, weights):
    """Sum_r w_r M_r softmax(q K_r^T / sqrt(D)) V_r with explicit loops over regions and heads."""
    b, n, c = q.shape
    d = c // heads
    out = torch.zeros(b, n, c, dtype=torch.float64)
    for r in range(keys.shape[0]):
        k = keys[r].expand(b, -1, -1).double()
        v = values[r].expand(b, -1, -1).double()
        for h in range(heads):
            sl = slice(h * d, (h + 1) * d)
            p = torch.softmax(q[..., sl].double() @ k[..., sl].transpose(1, 2) / d ** 0.5, dim=-1)
            m = 1.0 if masks is None else masks[:, r, :, None].double()
            w = weights[..., r].double().reshape(-1, 1, 1)
            out[..., sl] += w * m * (p @ v[..., sl])
    return out


@pytest.mark.parametrize("regions,key_rows,use_masks,row_weights", [
    (1, 2, False, False), (1, 1, True, False), (3, 2, True, True), (3, 1, False, False), (2, 2, True, False),
])
def test_region_ip_delta_matches_formula(regions, key_rows, use_masks, row_weights):
    from charadapter.attention import region_ip_delta
    gen = torch.Generator().manual_seed(regions * 10 + key_rows)
    b, n, t, heads, c = 2, 12, 5, 4, 32
    q = torch.randn(b, n, c, generator=gen)
    keys = torch.randn(regions, key_rows, t, c, generator=gen)
    values = torch.randn(regions, key_rows, t, c, generator=gen)
    masks = torch.rand(b, regions, n, generator=gen) if use_masks else None
    weights = torch.rand(b, regions, generator=gen) if row_weights else torch.rand(regions, generator=gen)
    expected = _naive_delta(q, keys, values, heads, masks, weights)
    got = region_ip_delta(q, keys, values, heads, masks, weights)
    assert got.shape == (b, n, c)
    assert (got.double() - expected).abs().max() <= 1e-5
    if regions == 1:  # (B, T, C) for one region is the same as (1, B, T, C)
        assert torch.allclose(region_ip_delta(q, keys[0], values[0], heads, masks, weights),
                              region_ip_delta(q, keys, values, heads, masks, weights))
    ones = torch.ones(b, regions, n)
    assert torch.allclose(region_ip_delta(q, keys, values, heads, None, weights),
                          region_ip_delta(q, keys, values, heads, ones, weights), atol=1e-6)


def test_region_ip_delta_low_precision_close():
    from charadapter.attention import region_ip_delta
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 16, 32, generator=gen)
    keys, values = torch.randn(2, 3, 2, 4, 32, generator=gen)
    masks = torch.rand(2, 3, 16, generator=gen)
    ref = region_ip_delta(q, keys, values, 4, masks, torch.tensor([0.5, 1.0, 0.8]))
    got = region_ip_delta(q.bfloat16(), keys, values, 4, masks, torch.tensor([0.5, 1.0, 0.8]))
    assert got.dtype == torch.bfloat16
    assert (got.float() - ref).abs().max() <= 0.05 * ref.abs().max()


def test_region_ip_delta_shape_errors():
    from charadapter.attention import region_ip_delta
    from charadapter.errors import GeometryError
    q = torch.randn(2, 16, 32)
    kv = torch.randn(3, 2, 4, 32)
    with pytest.raises(GeometryError, match=r"masks: expected \(B=2, R=3, N=16\), got \(2, 3, 15\)"):
        region_ip_delta(q, kv, kv, 4, torch.rand(2, 3, 15))
    with pytest.raises(GeometryError, match=r"q \(2, 16, 32\) with heads=4 does not fit keys \(3, 2, 4, 24\)"):
        region_ip_delta(q, torch.randn(3, 2, 4, 24), torch.randn(3, 2, 4, 24), 4)
    with pytest.raises(GeometryError, match=r"weights: expected \(3,\)"):
        region_ip_delta(q, kv, kv, 4, None, torch.ones(2))


def test_text_attention_probs():
    from charadapter.attention import phrase_maps, text_attention_probs, text_region_maps
    from charadapter.errors import CharacterAdapterError
    gen = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 9, 16, generator=gen), torch.randn(2, 7, 16, generator=gen)
    every = text_attention_probs(q, k, 2, list(range(7)))
    assert every.shape == (2, 7, 9)
    assert torch.allclose(every.sum(dim=1), torch.ones(2, 9), atol=1e-6)  # softmax over all T tokens
    # mean over heads of per-head softmax, written out
    qh, kh = q.view(2, 9, 2, 8).transpose(1, 2), k.view(2, 7, 2, 8).transpose(1, 2)
    ref = torch.softmax(qh @ kh.transpose(-1, -2) / 8 ** 0.5, dim=-1).mean(dim=1)  # (B, N, T)
    sub = text_attention_probs(q, k, 2, [4, 1])
    assert torch.allclose(sub, ref[..., [4, 1]].transpose(1, 2), atol=1e-6)
    maps = text_region_maps(q, k, 2, [[1, 2], [5]])
    assert torch.allclose(maps[:, 0], ref[..., [1, 2]].mean(-1), atol=1e-6)
    assert torch.allclose(maps, phrase_maps(every, [[1, 2], [5]]), atol=1e-6)
    with pytest.raises(CharacterAdapterError, match="T=7 tokens"):
        text_attention_probs(q, k, 2, [7])


def test_add_region_term_adds_in_place_with_weights_in_the_values():
    """add_region_term(out) == out + region_ip_delta, written into out; region_kv keeps rows apart."""
    from charadapter.attention import add_region_term, mask_coefficients, region_ip_delta, region_kv
    gen = torch.Generator().manual_seed(9)
    q, base = torch.randn(2, 10, 24, generator=gen), torch.randn(2, 10, 24, generator=gen)
    keys, values = torch.randn(2, 2, 3, 24, generator=gen), torch.randn(2, 2, 3, 24, generator=gen)
    masks = torch.rand(2, 2, 10, generator=gen)
    weights = torch.tensor([0.3, 1.4])
    delta = region_ip_delta(q, keys, values, 3, masks, weights)
    kv = region_kv(keys, values, 3, weights=weights)
    assert kv.keys.shape == kv.values.shape == (2, 2 * 3, 3, 8)  # (B, R*H, T, D)
    coef = mask_coefficients(masks, 2, 2, 10, q.dtype, q.device)  # (B, N, R)
    out = base.clone()
    fused = add_region_term(out, q, kv, coef)
    assert fused is out and torch.allclose(fused, base + delta, atol=1e-6)
    # one region: attention and one add; masks as (B, N, 1)
    kv1 = region_kv(keys[:1], values[:1], 3, weights=weights[:1])
    one = add_region_term(base.clone(), q, kv1, coef[..., :1].contiguous())
    assert torch.allclose(one, base + region_ip_delta(q, keys[:1], values[:1], 3, masks[:, :1], weights[:1]),
                          atol=1e-6)
    # a tensor autograd tracks is not written in place
    tracked = base.clone().requires_grad_(True)
    with torch.enable_grad():
        got = add_region_term(tracked, q, kv, coef)
    assert got is not tracked and torch.equal(tracked.detach(), base)


def test_text_maps_of_an_absent_phrase_are_zero():
    from charadapter.attention import text_map_values, text_region_maps
    from charadapter.errors import CharacterAdapterError
    gen = torch.Generator().manual_seed(10)
    q, k = torch.randn(2, 9, 16, generator=gen), torch.randn(2, 7, 16, generator=gen)
    maps = text_region_maps(q, k, 2, [[1, 2], [], [5]], allow_empty=True)
    assert maps.shape == (2, 3, 9) and (maps[:, 1] == 0).all()
    assert torch.allclose(maps[:, [0, 2]], text_region_maps(q, k, 2, [[1, 2], [5]]), atol=1e-7)
    with pytest.raises(CharacterAdapterError, match="at least one token"):
        text_map_values([[1], []], 7, 2, 8)


def test_text_maps_with_appended_key_rows():
    """Extra key rows (a phrase's own keys) join the softmax; their columns are maps like any other."""
    from charadapter.attention import text_region_maps
    gen = torch.Generator().manual_seed(11)
    q, k, extra = (torch.randn(2, 9, 16, generator=gen), torch.randn(2, 7, 16, generator=gen),
                   torch.randn(2, 3, 16, generator=gen))
    joined = torch.cat([k, extra], dim=1)  # (B, T+P, C)
    maps = text_region_maps(q, joined, 2, [[1, 2], [7, 8]])
    qh, kh = q.view(2, 9, 2, 8).transpose(1, 2), joined.view(2, 10, 2, 8).transpose(1, 2)
    probs = torch.softmax(qh @ kh.transpose(-1, -2) / 8 ** 0.5, dim=-1).mean(dim=1)  # (B, N, T+P)
    assert torch.allclose(maps[:, 0], probs[..., [1, 2]].mean(-1), atol=1e-6)
    assert torch.allclose(maps[:, 1], probs[..., [7, 8]].mean(-1), atol=1e-6)


def test_many_regions_fall_back_to_wider_values():
    """More regions than a head has channels: the map values widen (unfused attention), same maps."""
    from charadapter.attention import map_value_width, text_attention_probs, text_region_maps
    gen = torch.Generator().manual_seed(12)
    q, k = torch.randn(1, 5, 8, generator=gen), torch.randn(1, 7, 8, generator=gen)  # D = 4
    groups = [[t] for t in range(7)]
    assert map_value_width(7, 4) == 8 and map_value_width(3, 4) == 4
    maps = text_region_maps(q, k, 2, groups)
    assert torch.allclose(maps.sum(dim=1), torch.ones(1, 5), atol=1e-6)
    assert torch.allclose(maps[:, :2], text_attention_probs(q, k, 2, [0, 1]), atol=1e-6)


def test_ip_keys_values_casts_an_fp16_adapter_piecewise():
    """An fp16 adapter beside fp32 tokens (the WebUI on the CPU) gives the keys and values of the
    whole cast weights, without ever holding a whole cast copy (SDXL: 140 of 5-10 MB per session,
    which the WebUI's process kept as ~0.8 GB of freed heap)."""
    from charadapter.attention import CAST_ROWS
    from charadapter.memprobe import LiveTensorBytes

    gen = torch.Generator().manual_seed(0)
    tokens = torch.randn(3, 2, 4, 512, generator=gen)  # (R, 2, T, C_ctx)
    wk = torch.randn(5 * CAST_ROWS + 7, 512, generator=gen).half()  # (C_inner, C_ctx), rows not a multiple
    wv = torch.randn(5 * CAST_ROWS + 7, 512, generator=gen).half()
    with LiveTensorBytes() as probe:
        k, v = ip_keys_values(tokens, wk, wv)
    assert k.dtype == v.dtype == torch.float32 and k.shape == (3, 2, 4, 5 * CAST_ROWS + 7)
    torch.testing.assert_close(k, torch.nn.functional.linear(tokens, wk.float()), rtol=1e-5, atol=1e-4)  # fp32 rounding of the row blocks
    torch.testing.assert_close(v, torch.nn.functional.linear(tokens, wv.float()), rtol=1e-5, atol=1e-4)
    whole_cast = wk.numel() * 4
    assert probe.peak < whole_cast / 2, (probe.peak, whole_cast)  # outputs, one piece and the concatenation
