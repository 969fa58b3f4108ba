"""Bad inputs (issue 5.3): each is answered by an error that names the problem, nothing runs,
nothing is left behind.

Two levels:
- core: `load_image`, `Params` (UI positional args and the API dict), `load_ip_adapter` and
  `load_clip_vision` on broken or foreign files (no file handle left open, a pickle's code never
  runs);
- script: the same kinds of input through the Script in the WebUI test double: the generation
  stops with the message (raised from the first UNet call, also in `p.comments`), no UNet
  forward ran, no hook of ours is left, the Controller holds nothing, no cache gained an entry.

Decisions (also in the images.py docstring and the README): CMYK, 16-bit and palette images are
converted, not refused; an animated GIF / WebP / PNG gives its first frame and a note in the
result's info; a reference under 32 px on its short side is refused.
"""

import io
import math
import os
import pickle
import struct
import time
import zlib
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

import fake_weights as fw
from charadapter.cache import BoundedCache
from charadapter.checkpoint import load_ip_adapter
from charadapter.clip_vision import load_clip_vision
from charadapter.errors import CharacterAdapterError, CheckpointError, ImageInputError
from charadapter.images import MIN_REFERENCE_SIDE, load_image
from charadapter.params import ParamError, Params, Region
from charadapter.webui import caches as ca_caches
from webui_host import CLIP_DIM, find_attn2_layers, ours, processing, reference_image, tiny_adapter

PROMPT = "a face, upper body, lower body, standing"


# ---- inputs ------------------------------------------------------------------------------------


def encode(img, fmt="PNG", **kwargs):
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def noise_image(w=64, h=64):
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8))


def png_header_only(w, h):
    """A PNG that declares w x h RGB pixels and holds none: a decompression bomb's header."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def write(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def animated(fmt, colors=((200, 30, 30), (30, 30, 200), (30, 200, 30))):
    frames = [Image.new("RGB", (48, 48), c) for c in colors]
    extra = {"lossless": True} if fmt == "WEBP" else {}
    return encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=50, loop=0, **extra)


def open_fds():
    return len(os.listdir("/proc/self/fd"))


# ---- core: images ------------------------------------------------------------------------------


BAD_IMAGES = {
    "zero-byte file": (lambda t: write(t, "empty.png", b""), r"empty \(0 bytes\)"),
    "zero bytes": (lambda t: b"", r"zero bytes"),
    "truncated PNG": (lambda t: encode(noise_image())[:400], r"truncated or corrupt"),
    "truncated JPEG": (lambda t: encode(noise_image(), "JPEG")[:600], r"truncated or corrupt"),
    "text file named .png": (lambda t: write(t, "notes.png", b"just some text, not pixels\n"),
                             r"not a recognised image format \(it starts with b'just some te"),
    "HTML error page as base64": (
        lambda t: "PGh0bWw+PGJvZHk+NDA0IE5vdCBGb3VuZDwvYm9keT48L2h0bWw+", r"not a recognised image format"),
    "20000x20000 PNG header": (lambda t: png_header_only(20000, 20000), r"too large|MP limit"),
    "9000x9000 PNG header (under PIL's own limit)": (lambda t: png_header_only(9000, 9000), r"9000x9000.*MP limit"),
    "20000x20000 array": (lambda t: np.broadcast_to(np.zeros(1, np.uint8), (20000, 20000)), r"20000, 20000.*MP limit"),
    "1x1 image": (lambda t: Image.new("RGB", (1, 1)), r"only 1x1 pixels.*at least 32 px"),
    "thin strip 400x20": (lambda t: encode(Image.new("RGB", (400, 20))), r"only 400x20 pixels"),
    "not base64": (lambda t: "this is ~not~ base64 @@", r"not valid base64"),
    "data URL without base64": (lambda t: "data:image/png,rawbytes", r"no ';base64,' payload"),
    "URL": (lambda t: "https://example.com/me.png", r"URLs are not fetched"),
    "missing file": (lambda t: str(t / "nowhere" / "me.png"), r"file not found"),
    "float array with NaN": (lambda t: np.full((40, 40, 3), np.nan, np.float32), r"NaN or infinity"),
    "array with 5 channels": (lambda t: np.zeros((40, 40, 5), np.uint8), r"expected \(H, W\) or \(H, W, C\)"),
    "a list": (lambda t: [1, 2, 3], r"unsupported reference image type list"),
}


@pytest.mark.parametrize("name", list(BAD_IMAGES))
def test_bad_image_is_refused(tmp_path, monkeypatch, name):
    make, message = BAD_IMAGES[name]
    source = make(tmp_path)

    def no_decoding(self, *a, **k):  # a bomb must be refused from its header alone
        raise AssertionError("pixels were decoded")

    if "header" in name:
        monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    fds = open_fds()
    start = time.perf_counter()
    with pytest.raises(ImageInputError, match=message):
        load_image(source, min_side=MIN_REFERENCE_SIDE)
    assert time.perf_counter() - start < 5.0
    assert open_fds() == fds, "a file handle was left open"
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_huge_header_refused_even_without_pils_guard(monkeypatch):
    """Hosts sometimes set Image.MAX_IMAGE_PIXELS = None; our own limit still holds."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("pixels were decoded"))
    with pytest.raises(ImageInputError, match=r"20000x20000 = 400.0 MP, more than the 64 MP limit"):
        load_image(png_header_only(20000, 20000))


ODD_BUT_FINE = {
    # name: (encoded bytes, expected RGB at the centre, frames)
    "CMYK JPEG": (lambda: encode(Image.new("CMYK", (48, 48), (0, 255, 255, 0)), "JPEG", quality=95), (255, 0, 0), 1),
    "16-bit greyscale PNG": (lambda: encode(Image.fromarray(np.full((48, 48), 65535 // 3, np.uint16))),
                             (85, 85, 85), 1),
    "animated GIF": (lambda: animated("GIF"), (200, 30, 30), 3),
    "animated WebP": (lambda: animated("WEBP"), (200, 30, 30), 3),
    "animated PNG": (lambda: animated("PNG"), (200, 30, 30), 3),
}


@pytest.mark.parametrize("name", list(ODD_BUT_FINE))
def test_odd_formats_are_converted_not_refused(name):
    make, colour, frames = ODD_BUT_FINE[name]
    img = load_image(make(), min_side=MIN_REFERENCE_SIDE)
    assert img.mode == "RGB" and img.size == (48, 48)
    assert max(abs(a - b) for a, b in zip(img.getpixel((24, 24)), colour)) <= 12
    assert img.info.get("frames", 1) == frames


# ---- core: settings ----------------------------------------------------------------------------


def ui_args(**overrides):
    values = dict(enabled=True, image=Image.new("RGB", (40, 40)), model="m")
    values.update(overrides)
    return Params.single(**values).to_args()


BAD_SETTINGS = {
    "weight NaN": (lambda: Params.from_args(ui_args(weight=math.nan)), "weight", r"between 0.0 and 2.0, got nan"),
    "weight inf": (lambda: Params.from_args(ui_args(weight=math.inf)), "weight", r"got inf"),
    "weight negative": (lambda: Params.from_args(ui_args(weight=-0.5)), "weight", r"got -0.5"),
    "region weight NaN": (lambda: Params.from_args(ui_args(regions=(Region("face", "face", math.nan),))),
                          "regions[0].weight", r"got nan"),
    "region weight inf (API)": (lambda: Params.from_dict({"image": "x", "regions": [
        {"reference_phrase": "face", "weight": math.inf}]}), "regions[0].weight", r"got inf"),
    "start > end": (lambda: Params.from_args(ui_args(start=0.8, end=0.3)), "start", r"below end \(0.8 >= 0.3\)"),
    "start == end": (lambda: Params.from_args(ui_args(start=0.5, end=0.5)), "start", r"below end"),
    "T = 0": (lambda: Params.from_args(ui_args(timestep=0)), "timestep", r"between 1 and 999, got 0"),
    "T = 1000": (lambda: Params.from_args(ui_args(timestep=1000)), "timestep", r"got 1000"),
    "T fractional": (lambda: Params.from_args(ui_args(timestep=650.5)), "timestep", r"whole number"),
    "empty phrase (API)": (lambda: Params.from_dict({"image": "x", "regions": [{"reference_phrase": "  "}]}),
                           "regions[0].reference_phrase", r"must not be empty"),
    "absurdly long phrase": (lambda: Params.from_args(ui_args(regions=(Region("face " * 2000, "face"),))),
                             "region 1 reference phrase", r"longer than 200 characters \(9999\)"),
    "duplicate regions": (lambda: Params.from_args(ui_args(regions=(Region("face", "face"), Region("Face ", "head")))),
                          "regions[1].reference_phrase", r"'Face' is also region 0"),
    "five regions (API)": (lambda: Params.from_dict({"image": "x", "regions": [
        {"reference_phrase": f"part {i}"} for i in range(5)]}), "regions", r"at most 4 regions, got 5"),
    "model given as a path": (lambda: Params.from_args(ui_args(model="../../secrets/key.safetensors")),
                              "model", r"path-like"),
    "temperature 0": (lambda: Params.from_args(ui_args(temperature=0)), "temperature", r"between 0.001"),
    "unknown fusion mode": (lambda: Params.from_args(ui_args(fusion="medium")), "fusion", r"one of soft, hard"),
    "number as text (API)": (lambda: Params.from_dict({"image": "x", "weight": "0.5"}), "weight", r"a number"),
    "unknown API key": (lambda: Params.from_dict({"image": "x", "strength": 1}), "strength", r"unknown key"),
    "enabled without an image (API)": (lambda: Params.from_dict({"weight": 0.5}), "image", r"required"),
}


@pytest.mark.parametrize("name", list(BAD_SETTINGS))
def test_bad_setting_is_refused_naming_the_field(name):
    build, field, message = BAD_SETTINGS[name]
    with pytest.raises(ParamError, match=message) as err:
        build()
    assert err.value.field == field
    assert str(err.value).startswith(f"Character-Adapter: {field}: ")


# ---- core: weight files ------------------------------------------------------------------------


def small_sd15():
    return fw.variant_state("sd15", width_div=8)


def with_nan(sd):
    out = dict(sd)
    key = "ip_adapter.5.to_k_ip.weight"
    out[key] = sd[key].clone()
    out[key][0, 0] = float("nan")
    return out


BAD_FILES = {
    "truncated safetensors": (lambda t: fw.write_truncated(small_sd15(), str(t / "a.safetensors"), "safetensors"),
                              load_ip_adapter, r"not a readable \.safetensors file \(truncated or corrupt\?\)"),
    "zero-byte safetensors": (lambda t: write(t, "a.safetensors", b""), load_ip_adapter,
                              r"not a readable \.safetensors file"),
    "safetensors header claiming 2**60 bytes": (
        lambda t: write(t, "a.safetensors", struct.pack("<Q", 1 << 60) + b"{}"), load_ip_adapter,
        r"not a readable \.safetensors file"),
    "truncated .bin": (lambda t: fw.write_truncated(small_sd15(), str(t / "a.bin"), "bin"), load_ip_adapter,
                       r"not a readable PyTorch file \(truncated or corrupt\?\)"),
    "ControlNet as adapter": (lambda t: fw.write_safetensors(fw.controlnet_ldm_state(), str(t / "cn.safetensors")),
                              load_ip_adapter, r"not an IP-Adapter.*a ControlNet model \(ldm layout\)"),
    "ControlNet (diffusers) as adapter": (
        lambda t: fw.write_safetensors(fw.controlnet_diffusers_state(), str(t / "cn.safetensors")),
        load_ip_adapter, r"a ControlNet model \(diffusers layout\)"),
    "CLIP encoder as adapter": (lambda t: fw.write_safetensors(fw.clip_vision_state(), str(t / "clip.safetensors")),
                                load_ip_adapter, r"a CLIP vision encoder"),
    "adapter as CLIP encoder": (lambda t: fw.write_safetensors(small_sd15(), str(t / "ip.safetensors")),
                                load_clip_vision, r"not a CLIP image encoder"),
    "NaN in adapter weights": (lambda t: fw.write_safetensors(with_nan(small_sd15()), str(t / "nan.safetensors")),
                               load_ip_adapter, r"ip_adapter\.5\.to_k_ip\.weight holds NaN or infinite values"),
    "FaceID adapter": (lambda t: fw.write_safetensors(fw.faceid_portrait_state(), str(t / "faceid.safetensors")),
                       load_ip_adapter, r"FaceID"),
    "text file named .safetensors": (lambda t: write(t, "a.safetensors", b"<html>404</html>"), load_ip_adapter,
                                     r"not a readable \.safetensors file"),
    "unknown suffix": (lambda t: write(t, "a.onnx", b"\x08\x01"), load_ip_adapter, r"unknown file type '\.onnx'"),
}


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_bad_weight_file_is_refused(tmp_path, name):
    make, loader, message = BAD_FILES[name]
    path = make(tmp_path)
    fds = open_fds()
    with pytest.raises(CheckpointError, match=message) as err:
        loader(path)
    assert str(path) in str(err.value)
    assert open_fds() == fds, "a file handle was left open"


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("form", ["zip", "legacy torch", "plain pickle"])
def test_pickle_that_would_run_code_is_refused_and_never_runs(tmp_path, form):
    marker = tmp_path / "pwned"
    path = str(tmp_path / "ip-adapter_sd15.bin")
    if form == "zip":
        fw.write_malicious_bin(small_sd15(), path, str(marker))
    elif form == "legacy torch":
        torch.save({"image_proj": {"x": fw.RunsCode(str(marker))}}, path, _use_new_zipfile_serialization=False)
    else:
        with open(path, "wb") as fh:
            pickle.dump({"image_proj": fw.RunsCode(str(marker))}, fh)
    for loader in (load_ip_adapter, load_clip_vision):
        with pytest.raises(CheckpointError, match=r"refused by torch.load\(weights_only=True\)|not a readable"):
            loader(path)
    assert not marker.exists(), "the pickle ran code"


# ---- script level: through the WebUI double ----------------------------------------------------


def _sdxl_adapter(sd_model):
    weights = tiny_adapter(find_attn2_layers(sd_model.model.diffusion_model))
    return replace(weights, spec=replace(weights.spec, arch="sdxl", variant="sdxl"), source="tiny-sdxl.safetensors")


def _wide_encoder():
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(5)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                              image_size=224, patch_size=56, projection_dim=CLIP_DIM + 8)
    return CLIPVisionModelWithProjection(config).eval()


def script_args(script, **overrides):
    """The script's positional args with these Params fields (anything may be overridden)."""
    values = dict(enabled=True, image=reference_image(), model="tiny-adapter")
    values.update(overrides)
    full = [0] * script.args_to
    full[script.args_from:script.args_to] = Params.single(**values).to_args()
    return tuple(full)


# name: (build(tmp_path, sd_model) -> dict(params=..., adapter=path or (key, weights), encoder=...), message)
SCRIPT_CASES = {
    "no image": (lambda t, m: dict(params=dict(image=None)), r"no reference image"),
    "truncated PNG bytes": (lambda t, m: dict(params=dict(image=encode(noise_image())[:300])),
                            r"truncated or corrupt"),
    "text file as the image (API bytes)": (lambda t, m: dict(params=dict(image=b"hello, not an image")),
                                           r"image: cannot be decoded: .*not a recognised image format"),
    "file path as the image (API text)": (lambda t, m: dict(params=dict(image=write(t, "me.png", encode(noise_image())))),
                                          r"image: not base64.*file paths are not accepted"),
    "1x1 image": (lambda t, m: dict(params=dict(image=Image.new("RGB", (1, 1)))), r"only 1x1 pixels"),
    "20000x20000 header": (lambda t, m: dict(params=dict(image=png_header_only(20000, 20000))), r"too large|MP limit"),
    "weight NaN": (lambda t, m: dict(params=dict(weight=math.nan)), r"weight: must be between"),
    "start > end": (lambda t, m: dict(params=dict(start=0.9, end=0.2)), r"start: must be below end"),
    "T = 1000": (lambda t, m: dict(params=dict(timestep=1000)), r"timestep: must be between 1 and 999"),
    "absurdly long phrase": (lambda t, m: dict(params=dict(regions=(Region("x" * 5000, "face"),))),
                             r"longer than 200 characters"),
    "duplicate regions": (lambda t, m: dict(params=dict(regions=(Region("face", "face"), Region("face", "head")))),
                          r"'face' is also region 0"),
    "phrase longer than a token chunk": (
        lambda t, m: dict(params=dict(regions=(Region(",".join(["red"] * 50), "face"),))),
        r"region phrase 'red,red,red,.*\.\.\.' is 99 tokens long; it must fit in one 75-token chunk"),
    "region phrases longer than a chunk together": (
        lambda t, m: dict(params=dict(regions=tuple(Region(",".join([w] * 12), "face" if i == 0 else "")
                                                    for i, w in enumerate(("red", "blue", "green", "gold"))))),
        r"region phrase '.*' is cut by a 75-token chunk border"),
    "SDXL adapter on SD1.5": (lambda t, m: dict(adapter=("tiny-sdxl", _sdxl_adapter(m))),
                              r"is an SDXL adapter but the loaded checkpoint is SD15"),
    "ControlNet as adapter": (
        lambda t, m: dict(adapter=fw.write_safetensors(fw.controlnet_ldm_state(), str(t / "control.safetensors"))),
        r"not an IP-Adapter.*ControlNet"),
    "truncated adapter": (
        lambda t, m: dict(adapter=fw.write_truncated(small_sd15(), str(t / "ip.safetensors"), "safetensors")),
        r"truncated or corrupt"),
    "adapter that runs code": (
        lambda t, m: dict(adapter=fw.write_malicious_bin(small_sd15(), str(t / "ip.bin"), str(t / "pwned"))),
        r"could run code"),
    "encoder of another width": (lambda t, m: dict(encoder=("tiny-wide-encoder", _wide_encoder())),
                                 r"takes 16-wide CLIP image embeds.*gives 24-wide"),
    "model not in the list": (lambda t, m: dict(real_resolver=True, params=dict(model="ip-adapter_sd15")),
                              r"'ip-adapter_sd15' is not an IP-Adapter in the list"),
}


# the server's own weight files that cannot be used: a failure (HTTP 500, traceback), not the caller's
# mistake; every other case is refused input (HTTP 422, one log line). A name that is not listed is
# refused before any file is opened, so through the API a caller only reaches these with a listed file.
SERVER_FILE_FAILURES = {"ControlNet as adapter", "truncated adapter", "adapter that runs code"}


@pytest.mark.parametrize("name", list(SCRIPT_CASES))
def test_bad_input_stops_the_generation_with_its_message(host, sd_model, tmp_path, monkeypatch, name):
    runner, script = host
    build, message = SCRIPT_CASES[name]
    case = build(tmp_path, sd_model)
    controller = script.hooks.controller
    resolved = {"adapter": "tiny-adapter", "encoder": "tiny-encoder"}
    put_by_test = set()
    for kind in ("adapter", "encoder"):
        given = case.get(kind)
        if isinstance(given, tuple):  # (cache key, loaded object): what a loader would have returned
            cache = ca_caches.ADAPTER_CACHE if kind == "adapter" else ca_caches.ENCODER_CACHE
            cache.put(*given)
            resolved[kind] = given[0]
            put_by_test.add(given[0])
        elif given is not None:
            resolved[kind] = given
    if case.get("real_resolver"):
        from charadapter.webui import script as script_module

        monkeypatch.setattr(controller, "resolve_model", script_module.resolve_model)
    else:
        monkeypatch.setattr(controller, "resolve_model", lambda kind, name: resolved[kind])
    unet = sd_model.model.diffusion_model
    forwards = []
    handle = unet.register_forward_hook(lambda module, args, output: forwards.append(tuple(args[0].shape)))
    caches = {name: cache for name, cache in vars(ca_caches).items() if isinstance(cache, BoundedCache)}
    before = {name: set(cache._items) for name, cache in caches.items()}
    files = sorted(os.listdir(tmp_path))
    try:
        p = processing.StableDiffusionProcessingTxt2Img(prompt=PROMPT, negative_prompt="", steps=2, width=64,
                                                        height=64, sampler_name="Euler", seed=7)
        p.scripts = runner
        p.script_args = script_args(script, **case.get("params", {}))
        with pytest.raises(CharacterAdapterError, match=message) as err:
            processing.process_images(p)
    finally:
        handle.remove()
    text = str(err.value)
    # the API answers vars(e)["status_code"] (500 without one); the UI shows "<type>: <str(e)>"
    # (modules/call_queue.py wrap_gradio_call_no_job), the same text for both kinds
    assert vars(err.value).get("status_code", 500) == (500 if name in SERVER_FILE_FAILURES else 422)
    assert f"{type(err.value).__name__}: {err.value}" == f"CharacterAdapterError: {text}"
    err = None
    assert text.startswith("Character-Adapter: ")
    assert text in p.comments, "the message is not in the result's comments"
    assert forwards == [], "the UNet ran although the input was refused"
    assert ours(unet) == 0
    assert controller.generation is None and controller.error is None
    grown = {key for name, cache in caches.items() for key in set(cache._items) - before[name]}
    assert grown <= put_by_test, f"something refused was cached: {grown - put_by_test}"
    assert sorted(os.listdir(tmp_path)) == files, "something was written or executed"
