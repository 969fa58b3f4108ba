"""CLIP image encoder: shipped configs, every supported weight layout, preprocessing, encoding.

Tiny random models stand in for ViT-H / bigG; the real shapes are checked on meta tensors.
"""

import importlib.util
import json
import os
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from charadapter import clip_vision as cv
from charadapter.errors import CheckpointError, CharacterAdapterError, ImageInputError

TINY = dict(hidden_size=32, intermediate_size=64, projection_dim=16, num_hidden_layers=2,
            num_attention_heads=4, image_size=28, patch_size=14, hidden_act="gelu")


def tiny_config(**over):
    """A CLIPVisionConfig small enough for CPU tests."""
    return CLIPVisionConfig(**dict(TINY, **over))


def tiny_model(seed=0, **over):
    """Random tiny model; every weight randomised so that a wrong copy shows."""
    torch.manual_seed(seed)
    model = CLIPVisionModelWithProjection(tiny_config(**over)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


def weights_of(model):
    """The model's weights as a file would hold them (no position_ids)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k != cv.POSITION_IDS}


def pixels(b=2, size=28, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, size, size, generator=g)


def outputs(model, px):
    with torch.no_grad():
        out = model(pixel_values=px, output_hidden_states=True)
    return out.image_embeds, out.hidden_states[-2]


def assert_same_model(loaded, ref, px=None):
    px = pixels() if px is None else px
    assert not loaded.training
    assert next(loaded.parameters()).dtype == torch.float32
    assert next(loaded.parameters()).device.type == "cpu"
    assert not any(p.requires_grad for p in loaded.parameters())
    pos = loaded.vision_model.embeddings.position_ids
    assert torch.equal(pos, torch.arange(pos.shape[-1]).expand_as(pos))
    e1, h1 = outputs(loaded, px)
    e2, h2 = outputs(ref, px)
    assert (e1 - e2).abs().max().item() <= 1e-6
    assert (h1 - h2).abs().max().item() <= 1e-6


def meta_state_dict(config):
    """Key -> meta tensor of the real shapes, without allocating the weights."""
    with torch.device("meta"):
        return CLIPVisionModelWithProjection(config).state_dict()


# ---------------------------------------------------------------- shipped configs


def test_shipped_configs_match_published_values():
    # values of h94/IP-Adapter image_encoder/config.json, as repeated in sd-webui-controlnet
    # annotator/clipvision/__init__.py (config_clip_h / config_clip_g)
    h, g = cv.shipped_config("ViT-H-14"), cv.shipped_config("ViT-bigG-14")
    assert (h.hidden_size, h.intermediate_size, h.num_hidden_layers, h.num_attention_heads, h.projection_dim) == \
        (1280, 5120, 32, 16, 1024)
    assert (g.hidden_size, g.intermediate_size, g.num_hidden_layers, g.num_attention_heads, g.projection_dim) == \
        (1664, 8192, 48, 16, 1280)
    for c in (h, g):
        assert (c.patch_size, c.image_size, c.hidden_act, c.layer_norm_eps, c.num_channels) == (14, 224, "gelu", 1e-5, 3)
    for name in cv.SHIPPED_CONFIGS:
        with open(os.path.join(cv.CONFIG_DIR, cv.SHIPPED_CONFIGS[name])) as f:
            raw = json.load(f)
        assert raw["model_type"] == "clip_vision_model"
        assert set(raw) - {"model_type"} <= set(cv.CONFIG_FIELDS)  # only fields transformers 4.30 knows


@pytest.mark.parametrize("name,millions", [("ViT-H-14", 632.08), ("ViT-bigG-14", 1844.91)])
def test_shipped_configs_parameter_counts(name, millions):
    # h94/IP-Adapter model card: ViT-H-14 "with 632.08M parameter", ViT-bigG-14 "with 1844.9M parameter"
    with torch.device("meta"):
        model = CLIPVisionModelWithProjection(cv.shipped_config(name))
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == millions


def _open_clip_model_config(name):
    spec = importlib.util.find_spec("open_clip")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("open-clip-torch not installed")
    path = os.path.join(list(spec.submodule_search_locations)[0], "model_configs", name + ".json")
    if not os.path.isfile(path):
        pytest.skip(f"{path} missing")
    with open(path) as f:
        return json.load(f)


@pytest.mark.parametrize("name", ["ViT-H-14", "ViT-bigG-14"])
def test_shipped_configs_match_open_clip_architecture(name):
    oc = _open_clip_model_config(name)
    v, cfg = oc["vision_cfg"], cv.shipped_config(name)
    assert cfg.hidden_size == v["width"]
    assert cfg.num_hidden_layers == v["layers"]
    assert cfg.num_attention_heads == v["width"] // v["head_width"]
    assert cfg.intermediate_size == int(v["width"] * v.get("mlp_ratio", 4.0))
    assert cfg.patch_size == v["patch_size"] and cfg.image_size == v["image_size"]
    assert cfg.projection_dim == oc["embed_dim"]


def test_encoder_name_and_feature_dim():
    assert cv.encoder_name(cv.shipped_config("ViT-bigG-14")) == "ViT-bigG-14"
    assert cv.encoder_name(tiny_config()) is None
    model = tiny_model()
    assert cv.feature_dim(model, plus=False) == 16 and cv.feature_dim(model, plus=True) == 32


# ---------------------------------------------------------------- shape detection (meta tensors)


@pytest.mark.parametrize("name", ["ViT-H-14", "ViT-bigG-14"])
def test_detect_encoder_on_real_shapes(name):
    sd = meta_state_dict(cv.shipped_config(name))
    assert cv.detect_encoder(cv.normalize_state_dict(sd)) == name
    # the same shapes behind a prefix, and with the old persistent position_ids
    prefixed = {"clip_vision." + k: v for k, v in sd.items()}
    prefixed["clip_vision." + cv.POSITION_IDS] = torch.empty(1, 257, dtype=torch.long, device="meta")
    norm = cv.normalize_state_dict(prefixed)
    assert cv.POSITION_IDS not in norm
    assert cv.detect_encoder(norm) == name


def test_detect_encoder_checks_layer_count_too():
    sd = meta_state_dict(cv.shipped_config("ViT-bigG-14"))
    cut = {k: v for k, v in sd.items() if not (cv._HF_LAYER.match(k) and int(cv._HF_LAYER.match(k).group(1)) >= 32)}
    with pytest.raises(CheckpointError, match=r"width 1664 with 32 layers.*config="):
        cv.detect_encoder(cut)
    with pytest.raises(CheckpointError, match="width 32 with 2 layers"):
        cv.detect_encoder(weights_of(tiny_model()))


def openclip_meta_state_dict(config, prefix="visual."):
    """OpenCLIP key names and shapes of a vision tower (plus a text-tower key), on meta."""
    w, n, i, e, p = (config.hidden_size, config.num_hidden_layers, config.intermediate_size,
                     config.projection_dim, config.patch_size)
    s = (config.image_size // p) ** 2 + 1

    def t(*shape):
        return torch.empty(*shape, device="meta")

    sd = {"class_embedding": t(w), "positional_embedding": t(s, w), "conv1.weight": t(w, 3, p, p),
          "ln_pre.weight": t(w), "ln_pre.bias": t(w), "ln_post.weight": t(w), "ln_post.bias": t(w),
          "proj": t(w, e)}
    for j in range(n):
        b = f"transformer.resblocks.{j}."
        sd.update({b + "ln_1.weight": t(w), b + "ln_1.bias": t(w), b + "ln_2.weight": t(w), b + "ln_2.bias": t(w),
                   b + "attn.in_proj_weight": t(3 * w, w), b + "attn.in_proj_bias": t(3 * w),
                   b + "attn.out_proj.weight": t(w, w), b + "attn.out_proj.bias": t(w),
                   b + "mlp.c_fc.weight": t(i, w), b + "mlp.c_fc.bias": t(i),
                   b + "mlp.c_proj.weight": t(w, i), b + "mlp.c_proj.bias": t(w)})
    out = {prefix + k: v for k, v in sd.items()}
    out["transformer.resblocks.0.attn.in_proj_weight"] = t(3 * 1024, 1024)  # the text tower of a full model
    out["logit_scale"] = t(())
    return out


@pytest.mark.parametrize("name", ["ViT-H-14", "ViT-bigG-14"])
def test_openclip_layout_converts_to_exact_hf_keys_and_shapes(name):
    cfg = cv.shipped_config(name)
    norm = cv.normalize_state_dict(openclip_meta_state_dict(cfg))
    assert cv.detect_encoder(norm) == name
    with torch.device("meta"):
        model = CLIPVisionModelWithProjection(cfg)
    cv.check_state_dict(model, norm, "meta")  # no missing, unexpected or mis-shaped key


# ---------------------------------------------------------------- layouts, loaded for real


def test_hf_folder_safetensors(tmp_path):
    ref = tiny_model()
    ref.config.to_json_file(str(tmp_path / "config.json"))
    save_file(weights_of(ref), str(tmp_path / "model.safetensors"))
    assert_same_model(cv.load_clip_vision(tmp_path), ref)


def test_hf_folder_full_clip_config_and_pytorch_bin(tmp_path):
    ref = tiny_model()
    vision = {k: TINY[k] for k in TINY if k != "projection_dim"}
    with open(tmp_path / "config.json", "w") as f:  # a CLIPModel config: projection_dim at the top
        json.dump({"model_type": "clip", "projection_dim": 16, "vision_config": vision,
                   "text_config": {"hidden_size": 8}}, f)
    sd = weights_of(ref)
    sd["text_model.embeddings.token_embedding.weight"] = torch.zeros(10, 8)
    sd["text_projection.weight"] = torch.zeros(16, 8)
    sd["logit_scale"] = torch.tensor(2.0)
    torch.save(sd, tmp_path / "pytorch_model.bin")
    assert_same_model(cv.load_clip_vision(str(tmp_path)), ref)


def test_hf_folder_sharded(tmp_path):
    ref = tiny_model()
    ref.config.to_json_file(str(tmp_path / "config.json"))
    sd = weights_of(ref)
    keys = sorted(sd)
    half = len(keys) // 2
    parts = {"model-00001-of-00002.safetensors": keys[:half], "model-00002-of-00002.safetensors": keys[half:]}
    for fname, ks in parts.items():
        save_file({k: sd[k] for k in ks}, str(tmp_path / fname))
    with open(tmp_path / "model.safetensors.index.json", "w") as f:
        json.dump({"weight_map": {k: fn for fn, ks in parts.items() for k in ks}}, f)
    assert_same_model(cv.load_clip_vision(tmp_path), ref)


@pytest.mark.parametrize("with_position_ids", [True, False])
def test_single_safetensors_with_and_without_position_ids(tmp_path, with_position_ids):
    ref = tiny_model()
    sd = weights_of(ref)
    if with_position_ids:  # what transformers <= 4.30 saved
        sd[cv.POSITION_IDS] = torch.arange(5).unsqueeze(0)
    save_file(sd, str(tmp_path / "enc.safetensors"))
    assert_same_model(cv.load_clip_vision(tmp_path / "enc.safetensors", config=tiny_config()), ref)


class _PersistentPositionIds(CLIPVisionModelWithProjection):
    """Emulates transformers 4.30, where position_ids is saved with the weights."""

    def __init__(self, config):
        super().__init__(config)
        emb = self.vision_model.embeddings
        ids = emb.position_ids
        del emb._buffers["position_ids"]
        emb.register_buffer("position_ids", ids, persistent=True)


@pytest.mark.parametrize("with_position_ids", [True, False])
def test_persistent_position_ids_like_transformers_430(tmp_path, monkeypatch, with_position_ids):
    # transformers 5 swaps its sys.modules entry after import: patch the object `from transformers import` reads
    monkeypatch.setattr(sys.modules["transformers"], "CLIPVisionModelWithProjection", _PersistentPositionIds)
    ref = tiny_model()
    sd = weights_of(ref)
    if with_position_ids:
        sd[cv.POSITION_IDS] = torch.full((1, 5), 3)  # a damaged copy must not be trusted
    torch.save(sd, tmp_path / "enc.pth")
    loaded = cv.load_clip_vision(tmp_path / "enc.pth", config=dict(TINY))
    assert isinstance(loaded, _PersistentPositionIds)
    assert cv.POSITION_IDS in loaded.state_dict()
    assert_same_model(loaded, ref)


@pytest.mark.parametrize("legacy_format", [False, True])
def test_controlnet_style_pth(tmp_path, legacy_format):
    # sd-webui-controlnet's clip_h.pth is h94's pytorch_model.bin renamed: a flat dict of HF keys,
    # written by transformers 4.28 (position_ids included); clip_g.pth holds the same layout in fp16
    ref = tiny_model()
    sd = weights_of(ref)
    sd[cv.POSITION_IDS] = torch.arange(5).unsqueeze(0)
    torch.save(sd, tmp_path / "clip_h.pth", _use_new_zipfile_serialization=not legacy_format)
    assert_same_model(cv.load_clip_vision(tmp_path / "clip_h.pth", config=tiny_config()), ref)


def test_fp16_file_loads_as_fp32(tmp_path):
    ref = tiny_model()
    save_file({k: v.half() for k, v in weights_of(ref).items()}, str(tmp_path / "clip_g.safetensors"))
    ref.half().float()  # the same rounding the file went through
    assert_same_model(cv.load_clip_vision(tmp_path / "clip_g.safetensors", config=tiny_config()), ref)


@pytest.mark.parametrize("prefix", ["clip_vision.", "model.", "conditioner.embedders.0.image_encoder."])
def test_prefixed_keys(tmp_path, prefix):
    ref = tiny_model()
    sd = {prefix + k: v for k, v in weights_of(ref).items()}
    sd["first_stage_model.decoder.conv_in.weight"] = torch.zeros(2, 2)  # another part of a bundle
    save_file(sd, str(tmp_path / "bundle.safetensors"))
    assert_same_model(cv.load_clip_vision(tmp_path / "bundle.safetensors", config=tiny_config()), ref)


def test_wrapped_state_dict(tmp_path):
    ref = tiny_model()
    torch.save({"state_dict": weights_of(ref), "epoch": 3}, tmp_path / "enc.pt")
    assert_same_model(cv.load_clip_vision(tmp_path / "enc.pt", config=tiny_config()), ref)


class OpenClipLikeVisual(torch.nn.Module):
    """OpenCLIP's VisionTransformer structure and names (open_clip/transformer.py), default options."""

    def __init__(self, width=32, layers=2, heads=4, mlp=64, patch=14, image=28, embed=16):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, width, patch, patch, bias=False)
        self.class_embedding = torch.nn.Parameter(torch.randn(width))
        self.positional_embedding = torch.nn.Parameter(torch.randn((image // patch) ** 2 + 1, width))
        self.ln_pre, self.ln_post = torch.nn.LayerNorm(width), torch.nn.LayerNorm(width)
        self.transformer = torch.nn.Module()
        self.transformer.resblocks = torch.nn.ModuleList()
        for _ in range(layers):
            blk = torch.nn.Module()
            blk.ln_1, blk.ln_2 = torch.nn.LayerNorm(width), torch.nn.LayerNorm(width)
            blk.attn = torch.nn.MultiheadAttention(width, heads, batch_first=True)
            blk.mlp = torch.nn.Sequential()
            blk.mlp.add_module("c_fc", torch.nn.Linear(width, mlp))
            blk.mlp.add_module("gelu", torch.nn.GELU())
            blk.mlp.add_module("c_proj", torch.nn.Linear(mlp, width))
            self.transformer.resblocks.append(blk)
        self.proj = torch.nn.Parameter(torch.randn(width, embed))

    def forward(self, x):
        x = self.conv1(x).flatten(2).transpose(1, 2)  # (B, N, W)
        cls = self.class_embedding.expand(x.shape[0], 1, -1)
        x = self.ln_pre(torch.cat([cls, x], dim=1) + self.positional_embedding)  # (B, 1+N, W)
        for blk in self.transformer.resblocks:
            h = blk.ln_1(x)
            x = x + blk.attn(h, h, h, need_weights=False)[0]
            x = x + blk.mlp(blk.ln_2(x))
        return self.ln_post(x[:, 0]) @ self.proj  # (B, E)


def test_openclip_layout_numerically(tmp_path):
    torch.manual_seed(0)
    ref = OpenClipLikeVisual().eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0.0, 0.3)
    sd = {"visual." + k: v for k, v in ref.state_dict().items()}
    sd["transformer.resblocks.0.attn.in_proj_weight"] = torch.zeros(24, 8)  # text tower of a full model
    sd["token_embedding.weight"] = torch.zeros(10, 8)
    sd["logit_scale"] = torch.tensor(4.6)
    save_file(sd, str(tmp_path / "open_clip_model.safetensors"))
    loaded = cv.load_clip_vision(tmp_path / "open_clip_model.safetensors", config=tiny_config())
    px = pixels()
    with torch.no_grad():
        want = ref(px)
    got = cv.encode_images(loaded, px, plus=False)
    assert got.shape == (2, 16)
    assert (got - want).abs().max().item() <= 1e-5


@pytest.fixture
def open_clip_vision_transformer():
    """open_clip's own VisionTransformer; without torchvision, its module is loaded behind a stub."""
    try:
        from open_clip.transformer import VisionTransformer
        yield VisionTransformer
        return
    except Exception:
        pass
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("open-clip-torch not installed")
    before = set(sys.modules)
    saved = {k: sys.modules[k] for k in before if k == "open_clip" or k.startswith(("open_clip.", "torchvision"))}
    misc = types.ModuleType("torchvision.ops.misc")
    misc.FrozenBatchNorm2d = type("FrozenBatchNorm2d", (), {})  # only named by open_clip/utils.py
    ops = types.ModuleType("torchvision.ops")
    ops.misc = misc
    tv = types.ModuleType("torchvision")
    tv.ops = ops
    pkg = types.ModuleType("open_clip")  # skips open_clip/__init__.py, which needs the real torchvision
    pkg.__path__ = list(spec.submodule_search_locations)
    sys.modules.update({"torchvision": tv, "torchvision.ops": ops, "torchvision.ops.misc": misc, "open_clip": pkg})
    try:
        module = importlib.import_module("open_clip.transformer")
        yield module.VisionTransformer
    except Exception as e:
        pytest.skip(f"open_clip.transformer not loadable: {e}")
    finally:
        for k in set(sys.modules) - before:
            if k == "open_clip" or k.startswith(("open_clip.", "torchvision")):
                del sys.modules[k]
        sys.modules.update(saved)


def test_real_open_clip_vision_tower(tmp_path, open_clip_vision_transformer):
    torch.manual_seed(0)
    ref = open_clip_vision_transformer(image_size=28, patch_size=14, width=32, layers=2, heads=4, mlp_ratio=2.0,
                                       output_dim=16).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0.0, 0.3)
    sd = {"visual." + k: v.contiguous() for k, v in ref.state_dict().items()}
    save_file(sd, str(tmp_path / "open_clip_pytorch_model.safetensors"))
    loaded = cv.load_clip_vision(tmp_path / "open_clip_pytorch_model.safetensors", config=tiny_config())
    px = pixels()
    with torch.no_grad():
        want = ref(px)
    want = want[0] if isinstance(want, tuple) else want
    assert want.shape == (2, 16)
    assert (cv.encode_images(loaded, px, plus=False) - want).abs().max().item() <= 1e-5


# ---------------------------------------------------------------- errors


def test_unet_state_dict_is_rejected(tmp_path):
    sd = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3),
          "model.diffusion_model.out.2.bias": torch.zeros(4)}
    save_file(sd, str(tmp_path / "unet.safetensors"))
    with pytest.raises(CheckpointError, match=r"unet\.safetensors: not a CLIP image encoder.*input_blocks"):
        cv.load_clip_vision(tmp_path / "unet.safetensors")


def test_wrong_shapes_are_named(tmp_path):
    save_file(weights_of(tiny_model()), str(tmp_path / "enc.safetensors"))
    with pytest.raises(CheckpointError) as e:
        cv.load_clip_vision(tmp_path / "enc.safetensors", config=tiny_config(intermediate_size=48))
    msg = str(e.value)
    assert "enc.safetensors" in msg and "shape mismatches" in msg
    assert "mlp.fc1.weight: file (64, 32) vs model (48, 32)" in msg


def test_missing_and_unexpected_keys_are_named(tmp_path):
    sd = weights_of(tiny_model())
    del sd["visual_projection.weight"]
    sd["vision_model.encoder.layers.0.mystery.weight"] = torch.zeros(3)
    save_file(sd, str(tmp_path / "enc.safetensors"))
    with pytest.raises(CheckpointError) as e:
        cv.load_clip_vision(tmp_path / "enc.safetensors", config=tiny_config())
    msg = str(e.value)
    assert "1 missing keys: visual_projection.weight" in msg
    assert "1 unexpected keys: vision_model.encoder.layers.0.mystery.weight" in msg


def test_unknown_encoder_without_config(tmp_path):
    save_file(weights_of(tiny_model()), str(tmp_path / "enc.safetensors"))
    with pytest.raises(CheckpointError, match="matches no shipped encoder.*ViT-H-14: width 1280, 32 layers"):
        cv.load_clip_vision(tmp_path / "enc.safetensors")


@pytest.mark.parametrize("returned", [None, ["not", "a", "dict"]])
def test_torch_load_returning_none_or_non_dict(tmp_path, monkeypatch, returned):
    torch.save(weights_of(tiny_model()), tmp_path / "clip_h.pth")
    monkeypatch.setattr(torch, "load", lambda *a, **k: returned)  # the WebUI's safe loader refusing
    with pytest.raises(CheckpointError, match=r"clip_h\.pth.*\.safetensors"):
        cv.load_clip_vision(tmp_path / "clip_h.pth", config=tiny_config())


class _Evil:
    pass


def test_pickle_with_arbitrary_objects_is_refused(tmp_path):
    torch.save({"x": _Evil()}, tmp_path / "evil.bin")
    with pytest.raises(CheckpointError, match=r"weights_only=True.*\.safetensors"):
        cv.load_clip_vision(tmp_path / "evil.bin", config=tiny_config())


def test_missing_paths(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        cv.load_clip_vision(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "README.md").write_text("x")
    with pytest.raises(CheckpointError, match=r"expected a Hugging Face folder.*README\.md"):
        cv.load_clip_vision(tmp_path / "empty")
    (tmp_path / "w.onnx").write_text("x")
    with pytest.raises(CheckpointError, match="unsupported file type"):
        cv.load_clip_vision(tmp_path / "w.onnx")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00\x01garbage")
    with pytest.raises(CheckpointError, match="not a readable .safetensors"):
        cv.load_clip_vision(tmp_path / "bad.safetensors")
    assert issubclass(CheckpointError, CharacterAdapterError)


# ---------------------------------------------------------------- preprocessing


def unnormalise(px):
    """(3, H, W) CLIP input back to 0..255 RGB."""
    mean = torch.tensor(cv.CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(cv.CLIP_STD).view(3, 1, 1)
    return (px * std + mean) * 255.0


def test_preprocess_shape_and_mean_std():
    img = Image.new("RGB", (50, 30), (10, 200, 30))
    px = cv.preprocess_images([img, img.resize((300, 300))], size=56)
    assert px.shape == (2, 3, 56, 56) and px.dtype == torch.float32
    want = (torch.tensor([10, 200, 30]) / 255.0 - torch.tensor(cv.CLIP_MEAN)) / torch.tensor(cv.CLIP_STD)
    assert torch.allclose(px[1], want.view(3, 1, 1).expand(3, 56, 56), atol=1e-6)
    assert torch.allclose(px[0, :, 28, 28], want, atol=1e-6)  # centre: the image, not the padding
    grey = (torch.tensor([127.0] * 3) / 255.0 - torch.tensor(cv.CLIP_MEAN)) / torch.tensor(cv.CLIP_STD)
    assert torch.allclose(px[0, :, 0, 28], grey, atol=1e-6)  # top: padding (wide image)


def striped(w, h, axis):
    """Red first 10%, blue last 10% along `axis` (0 = rows), green between."""
    arr = np.zeros((h, w, 3), np.uint8)
    arr[...] = (0, 255, 0)
    n = (h if axis == 0 else w) // 10
    if axis == 0:
        arr[:n], arr[-n:] = (255, 0, 0), (0, 0, 255)
    else:
        arr[:, :n], arr[:, -n:] = (255, 0, 0), (0, 0, 255)
    return Image.fromarray(arr)


def test_tall_image_keeps_head_and_feet():
    px = unnormalise(cv.preprocess_images([striped(100, 400, axis=0)], size=224)[0])
    col = px[:, :, 112]  # (3, 224) centre column
    assert col[0, 2] > 200 and col[1, 2] < 50  # top rows: still red (a centre crop would cut them)
    assert col[2, -3] > 200 and col[1, -3] < 50  # bottom rows: still blue
    assert (px[:, 112, 2] - 127).abs().max() < 2  # sides are padding
    assert (px[:, 112, -3] - 127).abs().max() < 2


def test_wide_image_keeps_left_and_right():
    px = unnormalise(cv.preprocess_images([striped(400, 100, axis=1)], size=224)[0])
    row = px[:, 112, :]  # (3, 224) centre row
    assert row[0, 2] > 200 and row[2, -3] > 200
    assert (px[:, 2, 112] - 127).abs().max() < 2 and (px[:, -3, 112] - 127).abs().max() < 2


def test_custom_pad_colour():
    px = unnormalise(cv.preprocess_images([Image.new("RGB", (10, 40), (0, 0, 0))], size=28,
                                          pad_color=(255, 255, 255))[0])
    assert (px[:, 14, 0] - 255).abs().max() < 1e-3 and px[:, 14, 14].abs().max() < 1e-3


def test_modes_rgba_l_p():
    rgba = Image.new("RGBA", (20, 20), (255, 0, 0, 0))  # fully transparent: must become the pad colour
    rgba.paste((0, 0, 255, 255), (5, 5, 15, 15))
    lum = Image.new("L", (20, 20), 200)
    pal = Image.new("RGB", (20, 20), (0, 128, 255)).convert("P")  # web palette: the nearest entry
    la = Image.new("LA", (20, 20), (50, 0))
    px = unnormalise(cv.preprocess_images([rgba, lum, pal, la], size=20))
    assert (px[0, :, 0, 0] - 127).abs().max() < 1  # transparent corner -> grey, not black or red
    assert (px[0, :, 10, 10] - torch.tensor([0.0, 0.0, 255.0])).abs().max() < 1
    assert (px[1] - 200).abs().max() < 1e-3  # L replicated to three channels
    assert (px[2, :, 10, 10] - torch.tensor(pal.convert("RGB").getpixel((10, 10)), dtype=torch.float32)).abs().max() < 1e-3
    assert (px[3] - 127).abs().max() < 1  # transparent LA


def test_square_image_matches_hf_clip_processor():
    import transformers

    # the PIL backend (transformers 5 names it CLIPImageProcessorPil; 4.x has only that one)
    proc_cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    proc = proc_cls()
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (300, 300, 3), dtype=np.uint8))
    want = torch.as_tensor(np.asarray(proc(images=[img], return_tensors="np")["pixel_values"])).float()
    got = cv.preprocess_images([img])
    assert got.shape == want.shape == (1, 3, 224, 224)
    # a square image is neither padded nor cropped: same PIL bicubic resize, same mean/std
    assert (got - want).abs().max().item() <= 1e-5


def test_bad_images():
    with pytest.raises(ImageInputError, match="image 1 is a ndarray"):
        cv.preprocess_images([Image.new("RGB", (4, 4)), np.zeros((4, 4, 3))])
    with pytest.raises(ImageInputError, match="at least one"):
        cv.preprocess_images([])
    assert cv.preprocess_images(Image.new("RGB", (4, 8)), size=14).shape == (1, 3, 14, 14)


# ---------------------------------------------------------------- encoding


def test_encode_images_base_and_plus():
    model = tiny_model()
    px = pixels(3)
    embeds, hidden = outputs(model, px)
    base = cv.encode_images(model, px.double(), plus=False)  # moved to the model's dtype
    plus = cv.encode_images(model, px, plus=True)
    assert base.shape == (3, 16) and base.dtype == torch.float32
    assert plus.shape == (3, 5, 32)  # (B, S, W): S = 1 + (28 / 14)^2
    assert torch.equal(base, embeds) and torch.equal(plus, hidden)
    assert not base.requires_grad


def test_negative_features():
    model = tiny_model()
    px = pixels(2)
    base = cv.encode_images(model, px, plus=False)
    assert torch.equal(cv.negative_features(model, False, base), torch.zeros_like(base))
    plus = cv.encode_images(model, px, plus=True)
    neg = cv.negative_features(model, True, plus)
    assert neg.shape == plus.shape
    assert torch.equal(neg, cv.encode_images(model, torch.zeros(2, 3, 28, 28), plus=True))
    assert neg.abs().sum() > 0 and torch.equal(neg[0], neg[1])
    with pytest.raises(CharacterAdapterError, match=r"encoder gives \(2, 5, 32\).*\(2, 5, 48\)"):
        cv.negative_features(model, True, torch.zeros(2, 5, 48))


def test_pipeline_on_loaded_model(tmp_path):
    ref = tiny_model()
    save_file(weights_of(ref), str(tmp_path / "enc.safetensors"))
    model = cv.load_clip_vision(tmp_path / "enc.safetensors", config=tiny_config())
    px = cv.preprocess_images([striped(30, 90, axis=0)], size=model.config.image_size)
    assert torch.equal(cv.encode_images(model, px, plus=True), cv.encode_images(ref, px, plus=True))
