"""IP-Adapter checkpoint loading: every published layout, both formats, and every bad file."""


import pytest
import torch

import fake_weights as fw
from charadapter.checkpoint import AdapterSpec, load_ip_adapter, weights_from_state_dict
from charadapter.errors import CharacterAdapterError, CheckpointError
from charadapter.projection import build_image_projection

FORMATS = ("safetensors", "bin")
# A misleading name for each variant: detection must come from shapes only.
MISLEADING = {"safetensors": "ip-adapter-plus-face_sdxl_vit-h.safetensors", "bin": "ip-adapter_sd15.bin"}


def _width_div(name):
    """Real shapes for SD1.5; SDXL layers narrowed 16x (a real-size SDXL file is tested once)."""
    return 1 if fw.VARIANTS[name].arch == "sd15" else 16


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", sorted(fw.VARIANTS))
def test_variant_loads_with_right_spec(tmp_path, name, fmt):
    v = fw.VARIANTS[name]
    sd = fw.variant_state(name, width_div=_width_div(name))
    path = fw.write(sd, str(tmp_path / MISLEADING[fmt]), fmt)

    w = load_ip_adapter(path)

    expected = AdapterSpec(
        variant=v.expected, arch=v.arch, plus=v.projection != "linear", num_tokens=v.num_tokens,
        context_dim=fw.CONTEXT[v.arch], clip_dim=v.clip_dim, encoder=v.encoder,
        num_layers=len(fw.WIDTHS[v.arch]), projection=v.projection, note=w.spec.note,
    )
    assert w.spec == expected
    assert w.source == path
    # canonical layout: prefixes stripped, layer i is file key 2i+1, tensors and dtype untouched
    assert set(w.image_proj) == {k[len("image_proj."):] for k in sd if k.startswith("image_proj.")}
    for key, value in w.image_proj.items():
        assert torch.equal(value, sd["image_proj." + key])
    assert len(w.layers) == len(fw.WIDTHS[v.arch])
    for i, (k, vv) in enumerate(w.layers):
        assert torch.equal(k, sd[f"ip_adapter.{2 * i + 1}.to_k_ip.weight"])
        assert torch.equal(vv, sd[f"ip_adapter.{2 * i + 1}.to_v_ip.weight"])
        assert k.dtype == torch.float16
    if v.projection == "resampler":
        assert "Plus-Face" in w.spec.note  # plus and plus-face cannot be told apart by shape


@pytest.mark.parametrize("name", ["sd15", "sd15_plus", "sd15_full_face"])
def test_sd15_layer_widths_are_the_real_unet_order(tmp_path, name):
    w = load_ip_adapter(fw.write_safetensors(fw.variant_state(name), str(tmp_path / "a.safetensors")))
    assert tuple(k.shape[0] for k, _ in w.layers) == fw.SD15_WIDTHS
    assert all(k.shape[1] == 768 for k, _ in w.layers)


def test_real_size_sdxl_layout():
    # full-size SDXL shapes (70 layers of [640|1280, 2048]; 0.7 GB as fp16) checked in memory:
    # proves nothing in the validation depends on the narrowed widths the file tests use
    w = weights_from_state_dict(fw.variant_state("sdxl", zeros=True), "ip-adapter_sdxl.safetensors")
    assert w.spec.variant == "sdxl" and w.spec.num_layers == 70 and w.spec.num_tokens == 4
    assert tuple(k.shape[0] for k, _ in w.layers) == fw.SDXL_WIDTHS
    assert all(tuple(k.shape) == tuple(v.shape) and k.shape[1] == 2048 for k, v in w.layers)
    nested = weights_from_state_dict(fw.nested(fw.variant_state("sdxl", zeros=True)), "ip-adapter_sdxl.bin")
    assert nested.spec == w.spec


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".BIN"])
def test_other_pickle_suffixes(tmp_path, suffix):
    path = fw.write_bin(fw.variant_state("sd15"), str(tmp_path / ("model" + suffix)))
    assert load_ip_adapter(path).spec.variant == "sd15"


def test_invokeai_folder(tmp_path):
    fw.write_bin(fw.variant_state("sd15_plus"), str(tmp_path / "ip_adapter.bin"))
    w = load_ip_adapter(tmp_path)
    assert w.spec.variant == "sd15_plus" and w.source == str(tmp_path / "ip_adapter.bin")


def test_describe_names_the_essentials(tmp_path):
    w = load_ip_adapter(fw.write_safetensors(fw.variant_state("sd15_plus"), str(tmp_path / "a.safetensors")))
    text = w.spec.describe()
    for part in ("sd15_plus", "16 tokens", "768", "ViT-H-14", "penultimate hidden states", "1280"):
        assert part in text


def test_loaded_projection_builds_and_runs(tmp_path):
    for name, feats in (("sd15", torch.randn(1, 1024)), ("sd15_plus", torch.randn(1, 257, 1280)),
                        ("sd15_full_face", torch.randn(1, 257, 1280))):
        sd = fw.variant_state(name, width_div=8)
        w = load_ip_adapter(fw.write_safetensors(sd, str(tmp_path / f"{name}.safetensors")))
        out = build_image_projection(w)(feats)
        assert out.shape == (1, w.spec.num_tokens, w.spec.context_dim)
        assert out.dtype == torch.float32 and torch.isfinite(out).all()


# ---------------------------------------------------------------- files that must be refused


def small(name):
    """A variant with its layers narrowed 8x: the defects below do not depend on layer widths."""
    return fw.variant_state(name, width_div=8)


def _refused(path, *fragments):
    """Load must raise CheckpointError naming the file and each fragment of what it found."""
    with pytest.raises(CheckpointError) as info:
        load_ip_adapter(path)
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, message
    assert isinstance(info.value, CharacterAdapterError) and isinstance(info.value, ValueError)
    return message


@pytest.mark.parametrize("fmt", FORMATS)
def test_faceid_is_refused(tmp_path, fmt):
    path = fw.write(fw.faceid_state(), str(tmp_path / f"plain.{fmt}"), fmt)
    _refused(path, "FaceID", "InsightFace", "_lora.")


def test_faceid_portrait_without_lora_is_refused(tmp_path):
    path = fw.write_safetensors(fw.faceid_portrait_state(), str(tmp_path / "ip-adapter_sd15.safetensors"))
    _refused(path, "FaceID", "InsightFace", "norm.weight")


def test_instantid_is_refused(tmp_path):
    path = fw.write_bin(fw.instantid_state(), str(tmp_path / "ip-adapter.bin"))
    _refused(path, "512", "InsightFace", "[1280, 512]")


@pytest.mark.parametrize("fmt", FORMATS)
def test_controlnet_ldm_is_refused(tmp_path, fmt):
    path = fw.write_safetensors(fw.controlnet_ldm_state(), str(tmp_path / "control.safetensors")) \
        if fmt == "safetensors" else str(tmp_path / "control_v11p_sd15_openpose.pth")
    if fmt == "bin":
        torch.save(fw.controlnet_ldm_state(), path)
    _refused(path, "not an IP-Adapter", "ControlNet model (ldm layout)", "control_model.")


def test_controlnet_diffusers_is_refused(tmp_path):
    path = fw.write_safetensors(fw.controlnet_diffusers_state(), str(tmp_path / "ip-adapter_sd15.safetensors"))
    _refused(path, "ControlNet model (diffusers layout)", "4 tensors")


def test_clip_vision_is_refused(tmp_path):
    path = fw.write_safetensors(fw.clip_vision_state(), str(tmp_path / "model.safetensors"))
    _refused(path, "CLIP vision encoder")


@pytest.mark.parametrize("fmt", FORMATS)
def test_truncated_file_is_refused(tmp_path, fmt):
    path = fw.write_truncated(small("sd15"), str(tmp_path / f"ip-adapter_sd15.{fmt}"), fmt)
    _refused(path, "truncated or corrupt")


def test_garbage_bin_is_refused(tmp_path):
    path = tmp_path / "ip-adapter_sd15.bin"
    path.write_bytes(b"<html>404 Not Found</html>")  # a download that saved an error page
    _refused(str(path), "not a readable PyTorch file")


def test_garbage_safetensors_is_refused(tmp_path):
    path = tmp_path / "ip-adapter_sd15.safetensors"
    path.write_bytes(b"\x00" * 3)
    _refused(str(path), "not a readable .safetensors file")


def test_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = fw.write_malicious_bin(small("sd15"), str(tmp_path / "ip-adapter_sd15.bin"), str(marker))
    message = _refused(path, "refused", "pickled code/objects other than tensors", "system")
    assert not marker.exists(), message
    # the payload is live: unrestricted unpickling does run it, so the guard is what stops it
    live = tmp_path / "live"
    torch.load(fw.write_malicious_bin({}, str(tmp_path / "b.bin"), str(live)), weights_only=False)
    assert live.exists()


def test_wrong_sized_norm(tmp_path):
    sd = fw.with_shape(small("sd15"), "image_proj.norm.weight", (1024,))
    path = fw.write_safetensors(sd, str(tmp_path / "a.safetensors"))
    _refused(path, "image_proj.norm.weight [1024]", "expected [768]")


def test_wrong_sized_bias_is_named(tmp_path):
    sd = fw.with_shape(small("sd15"), "image_proj.proj.bias", (3000,))
    _refused(fw.write_bin(sd, str(tmp_path / "a.bin")), "proj.bias [3000]", "expected [3072]")


def test_wrong_context_in_one_layer(tmp_path):
    sd = fw.with_shape(small("sd15"), "ip_adapter.5.to_k_ip.weight", (80, 1024))
    _refused(fw.write_safetensors(sd, str(tmp_path / "a.safetensors")), "ip_adapter.5", "[80, 1024]", "[80, 768]")


def test_context_mismatch_between_layers(tmp_path):
    sd = small("sd15")
    for name in ("to_k_ip", "to_v_ip"):
        sd = fw.with_shape(sd, f"ip_adapter.7.{name}.weight", (80, 1024))
    _refused(fw.write_safetensors(sd, str(tmp_path / "a.safetensors")), "ip_adapter.7 [80, 1024]", "768")


def test_wrong_sized_resampler_tensor(tmp_path):
    sd = fw.with_shape(small("sd15_plus"), "image_proj.layers.2.1.3.weight", (768, 3000))
    _refused(fw.write_bin(sd, str(tmp_path / "a.bin")), "layers.2.1.3.weight [768, 3000]", "expected [768, 3072]")


def test_resampler_heads_not_multiple_of_64(tmp_path):
    state = fw.resampler_state(1280, 96, 768, 16, depth=1, heads=1, dim_head=96)
    sd = fw.flat(state, fw.ip_layers_state(fw.SD15_WIDTHS, 768, width_div=8))
    _refused(fw.write_safetensors(sd, str(tmp_path / "a.safetensors")), "96 rows", "64")


def test_unknown_resampler_key(tmp_path):
    sd = small("sd15_plus")
    sd["image_proj.pos_emb.weight"] = torch.zeros(257, 1280, dtype=torch.float16)
    _refused(fw.write_safetensors(sd, str(tmp_path / "a.safetensors")), "unexpected", "pos_emb.weight")


def test_projection_output_differs_from_context(tmp_path):
    # an SD1.5 Plus projection glued onto SDXL layers
    proj = fw.resampler_state(1280, 768, 768, 16, depth=1)
    sd = fw.flat(proj, fw.ip_layers_state(fw.SDXL_WIDTHS, 2048, width_div=8))
    _refused(fw.write_safetensors(sd, str(tmp_path / "a.safetensors")), "768-wide", "2048")


def test_base_projection_sized_for_another_context(tmp_path):
    # an SD1.5 base projection glued onto SDXL layers: 3072 rows are no whole number of 2048 tokens
    sd = fw.flat(fw.linear_state(1024, 4, 768), fw.ip_layers_state(fw.SDXL_WIDTHS, 2048, width_div=8))
    _refused(fw.write_safetensors(sd, str(tmp_path / "a.safetensors")), "3072 rows", "2048")


def test_token_rows_not_divisible(tmp_path):
    sd = fw.with_shape(small("sd15"), "image_proj.proj.weight", (3000, 1024))
    _refused(fw.write_safetensors(sd, str(tmp_path / "a.safetensors")), "3000 rows", "768")


def test_missing_layer(tmp_path):
    sd = fw.without(small("sd15"), "ip_adapter.7.")
    _refused(fw.write_safetensors(sd, str(tmp_path / "a.safetensors")), "missing [7]", "unexpected [31]")


def test_missing_v_of_a_layer(tmp_path):
    sd = fw.without(small("sd15"), "ip_adapter.9.to_v_ip")
    _refused(fw.write_bin(sd, str(tmp_path / "a.bin")), "ip_adapter.9.to_v_ip.weight is missing")


def test_wrong_layer_count(tmp_path):
    sd = fw.without(small("sd15"), "ip_adapter.31.")
    _refused(fw.write_safetensors(sd, str(tmp_path / "a.safetensors")), "has 16", "has 15")


def test_sd2_context_is_refused(tmp_path):
    sd = fw.flat(fw.linear_state(1024, 4, 1024), fw.ip_layers_state(fw.SD15_WIDTHS, 1024, width_div=8))
    _refused(fw.write_safetensors(sd, str(tmp_path / "a.safetensors")), "context width 1024", "SD2")


def test_unknown_encoder_width(tmp_path):
    sd = fw.flat(fw.linear_state(768, 4, 768), fw.ip_layers_state(fw.SD15_WIDTHS, 768, width_div=8))
    _refused(fw.write_safetensors(sd, str(tmp_path / "a.safetensors")), "image_embeds 768 wide", "1024 = ViT-H-14")


def test_unknown_ip_adapter_key(tmp_path):
    sd = small("sd15")
    sd["ip_adapter.1.to_out_ip.weight"] = torch.zeros(40, 40, dtype=torch.float16)
    _refused(fw.write_safetensors(sd, str(tmp_path / "a.safetensors")), "ip_adapter.1.to_out_ip.weight")


def test_integer_tensor_is_refused(tmp_path):
    sd = small("sd15")
    sd["image_proj.norm.bias"] = torch.zeros(768, dtype=torch.int64)
    _refused(fw.write_safetensors(sd, str(tmp_path / "a.safetensors")), "image_proj.norm.bias", "torch.int64")


def test_non_dict_pickle(tmp_path):
    path = str(tmp_path / "a.pt")
    torch.save([torch.zeros(3)], path)
    _refused(path, "expected a dict of tensors", "list")


def test_unknown_suffix(tmp_path):
    path = tmp_path / "ip-adapter_sd15.ckpt"
    path.write_bytes(b"x")
    _refused(str(path), "unknown file type '.ckpt'", ".safetensors")


def test_missing_file(tmp_path):
    _refused(str(tmp_path / "nope.safetensors"), "file not found")


def test_empty_folder(tmp_path):
    _refused(str(tmp_path), "folder without ip_adapter")
