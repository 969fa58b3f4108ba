"""Model folder discovery: which files are adapters / encoders, their names, and name -> path only."""
import json
import os

import numpy as np
import pytest
from safetensors.numpy import save_file

from charadapter.params import Params
from charadapter.webui import caches as ca_caches, models, reference_pass as ca_reference_pass, settings as ca_settings
from charadapter.webui.models import VIT_BIGG, VIT_H

DOUBLE = os.path.join(os.path.dirname(__file__), "webui_double")


# ---------------------------------------------------------------- tiny fake files


def _st(path, keys):
    """A real .safetensors file holding tiny tensors under `keys` ({name: shape})."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file({k: np.zeros(shape, dtype=np.float16) for k, shape in keys.items()}, path)
    return path


def _touch(path, data=b"not really a pickle"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return path


ADAPTER_KEYS = {"image_proj.proj.weight": (12, 4), "image_proj.norm.weight": (3,), "ip_adapter.1.to_k_ip.weight": (3, 4),
                "ip_adapter.1.to_v_ip.weight": (3, 4)}
FACEID_KEYS = {"image_proj.proj.0.weight": (8, 4), "ip_adapter.1.to_k_ip.weight": (3, 4),
               "ip_adapter.1.to_k_lora.down.weight": (2, 3), "ip_adapter.1.to_k_lora.up.weight": (3, 2)}
CONTROLNET_KEYS = {"control_model.input_blocks.0.0.weight": (4, 4, 3, 3), "control_model.zero_convs.0.0.bias": (4,)}


def _vision_keys(width):
    return {"vision_model.embeddings.class_embedding": (width,), "vision_model.post_layernorm.weight": (width,),
            "visual_projection.weight": (4, width)}


def _hf_encoder(folder, width, model_type="clip_vision_model"):
    os.makedirs(folder, exist_ok=True)
    config = {"model_type": model_type, "hidden_size": width}
    if model_type == "clip":
        config = {"model_type": "clip", "vision_config": {"hidden_size": width}}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    _st(os.path.join(folder, "model.safetensors"), _vision_keys(width))
    return folder


@pytest.fixture()
def tree(tmp_path):
    """A WebUI data folder as users have it: our extension, the WebUI's models, sd-webui-controlnet."""
    root = tmp_path
    ext = root / "extensions" / "sd-webui-character-adapter"
    webui_models = root / "models"
    cn = root / "extensions" / "sd-webui-controlnet-main"  # cloned under another folder name
    p = {}
    p["ext_adapter"] = _st(str(ext / "models" / "ip-adapter_sd15.safetensors"), ADAPTER_KEYS)
    p["renamed_adapter"] = _st(str(ext / "models" / "my character adapter.safetensors"), ADAPTER_KEYS)
    p["faceid_st"] = _st(str(ext / "models" / "ip-adapter-faceid_sd15.safetensors"), FACEID_KEYS)
    p["faceid_bin"] = _touch(str(ext / "models" / "ip-adapter-faceid-plusv2_sd15.bin"))
    p["hidden"] = _st(str(ext / "models" / ".ip-adapter_hidden.safetensors"), ADAPTER_KEYS)
    p["readme"] = _touch(str(ext / "models" / "README.md"), b"# weights")
    p["invoke"] = str(ext / "models" / "ipadapter" / "ip_adapter_sd_image_encoder_invoke")
    _touch(os.path.join(p["invoke"], "ip_adapter.bin"))
    p["controlnet"] = _st(str(webui_models / "ControlNet" / "control_v11p_sd15_openpose.safetensors"), CONTROLNET_KEYS)
    p["cn_adapter_dup"] = _st(str(webui_models / "ControlNet" / "ip-adapter_sd15.safetensors"), ADAPTER_KEYS)
    p["cn_adapter_pth"] = _touch(str(webui_models / "ControlNet" / "ip-adapter_sd15_plus.pth"))
    p["corrupt"] = _touch(str(webui_models / "ControlNet" / "ip-adapter_broken.safetensors"), b"\xff" * 64)
    p["h94_h"] = _hf_encoder(str(webui_models / "ipadapter" / "IP-Adapter" / "models" / "image_encoder"), 1280)
    p["h94_g"] = _hf_encoder(str(webui_models / "ipadapter" / "IP-Adapter" / "sdxl_models" / "image_encoder"), 1664)
    p["bigg_file"] = _st(str(webui_models / "clip_vision" / "CLIP-ViT-bigG-14-laion2B-39B-b160k.safetensors"), _vision_keys(1664))
    p["anon_vision"] = _st(str(webui_models / "clip_vision" / "anything.safetensors"), _vision_keys(1280))
    p["sd_ckpt"] = _st(str(webui_models / "clip_vision" / "clip_vision_but_text.safetensors"),
                       {"cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (8, 4)})
    _touch(str(cn / "scripts" / "controlnet.py"), b"")
    p["clip_h"] = _touch(str(cn / "annotator" / "downloads" / "clip_vision" / "clip_h.pth"))
    p["clip_g"] = _touch(str(cn / "annotator" / "downloads" / "clip_vision" / "clip_g.pth"))
    p["cn_models_adapter"] = _st(str(cn / "models" / "ip-adapter_sd15.safetensors"), ADAPTER_KEYS)
    _touch(str(cn / "models" / "cldm_v15.yaml"), b"model: {}")
    os.makedirs(root / "extensions-builtin", exist_ok=True)
    p.update(root=str(root), ext=str(ext), webui_models=str(webui_models), cn=str(cn))
    return p


def _folders(t, extra=()):
    cn_dirs = models.find_controlnet_dirs([os.path.join(t["root"], "extensions"), os.path.join(t["root"], "extensions-builtin")])
    return models.candidate_folders(t["webui_models"], t["ext"], cn_dirs, list(extra))


# ---------------------------------------------------------------- folders


def test_candidate_folders_order_dedupe_and_existing_only(tree, tmp_path):
    extra = tmp_path / "extra"
    extra.mkdir()
    folders = _folders(tree, [str(extra), os.path.join(tree["webui_models"], "ControlNet"), str(tmp_path / "missing")])
    j = os.path.join
    assert folders == [
        j(tree["ext"], "models"),
        j(tree["ext"], "models", "ipadapter"),
        j(tree["webui_models"], "ControlNet"),
        j(tree["webui_models"], "ipadapter"),
        j(tree["webui_models"], "clip_vision"),
        j(tree["cn"], "models"),
        j(tree["cn"], "annotator", "downloads", "clip_vision"),
        str(extra),
    ]


def test_find_controlnet_dirs_by_content_not_folder_name(tree):
    assert models.find_controlnet_dirs([os.path.join(tree["root"], "extensions"), "/nonexistent"]) == [tree["cn"]]


def test_controlnet_setting_folders():
    class Flags:
        controlnet_dir = "/cn/extra"
        controlnet_annotator_models_path = None

    got = models.controlnet_setting_folders({"control_net_modules_path": "annot"}, Flags(), "/data")
    assert got == ["/cn/extra", os.path.join("/data", "annot", "clip_vision")]
    got = models.controlnet_setting_folders({"control_net_models_path": "/m"}, object(), "/data")
    assert got == ["/m"]


def test_parse_folder_list():
    assert models.parse_folder_list(' /a ;"/b c"\n\n/d;') == ["/a", "/b c", "/d"]
    assert models.parse_folder_list(None) == []


# ---------------------------------------------------------------- scanning


def test_scan_finds_adapters_and_encoders(tree):
    listing = models.scan(_folders(tree))
    assert listing.adapters == {
        "ip-adapter_sd15.safetensors": tree["ext_adapter"],
        "my character adapter.safetensors": tree["renamed_adapter"],  # found by its keys, not its name
        "ip_adapter_sd_image_encoder_invoke": tree["invoke"],
        "ControlNet - ip-adapter_sd15.safetensors": tree["cn_adapter_dup"],
        "ip-adapter_sd15_plus.pth": tree["cn_adapter_pth"],
        "models - ip-adapter_sd15.safetensors": tree["cn_models_adapter"],
    }
    assert listing.encoders == {
        "image_encoder": tree["h94_h"],
        "sdxl_models - image_encoder": tree["h94_g"],
        "CLIP-ViT-bigG-14-laion2B-39B-b160k.safetensors": tree["bigg_file"],
        "anything.safetensors": tree["anon_vision"],  # every key is a vision-tower key
        "clip_g.pth": tree["clip_g"],
        "clip_h.pth": tree["clip_h"],
    }


def test_scan_skips_faceid_controlnet_corrupt_hidden_and_text_models(tree):
    listing = models.scan(_folders(tree))
    listed = set(listing.adapters.values()) | set(listing.encoders.values())
    for key in ("faceid_st", "faceid_bin", "hidden", "readme", "controlnet", "corrupt", "sd_ckpt"):
        assert tree[key] not in listed, key
    assert models.classify_file(tree["faceid_st"]) is None
    assert models.classify_file(tree["controlnet"]) is None


def test_scan_reads_headers_only(tree, monkeypatch):
    import safetensors

    def no_tensors(*a, **k):
        raise AssertionError("scan must not load tensors")

    monkeypatch.setattr(safetensors, "safe_open", no_tensors)
    monkeypatch.setattr(np, "load", no_tensors)
    assert len(models.scan(_folders(tree)).adapters) == 6


def test_header_reader_rejects_lies(tmp_path):
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes((10 ** 12).to_bytes(8, "little") + b"{}")
    assert models.read_safetensors_header(str(huge)) is None
    not_json = tmp_path / "x.safetensors"
    not_json.write_bytes((4).to_bytes(8, "little") + b"\x00\x01\x02\x03")
    assert models.read_safetensors_header(str(not_json)) is None
    assert models.read_safetensors_header(str(tmp_path / "missing.safetensors")) is None


def test_same_name_in_three_folders_stays_unique(tmp_path):
    for parent in ("a", "b", "c"):
        _st(str(tmp_path / parent / "models" / "ip-adapter.safetensors"), ADAPTER_KEYS)
    listing = models.scan([str(tmp_path / p) for p in ("a", "b", "c")])
    assert list(listing.adapters) == [
        "ip-adapter.safetensors", "models - ip-adapter.safetensors", "models - ip-adapter.safetensors (2)"]
    assert len(set(listing.adapters.values())) == 3


def test_encoder_named_auto_does_not_shadow_the_auto_choice(tmp_path):
    _hf_encoder(str(tmp_path / "enc" / "Auto"), 1280)
    assert list(models.scan([str(tmp_path / "enc")]).encoders) == ["enc - Auto"]


def test_symlink_loop_and_duplicate_folder_terminate(tmp_path):
    _st(str(tmp_path / "m" / "ip-adapter.safetensors"), ADAPTER_KEYS)
    try:
        os.symlink(str(tmp_path / "m"), str(tmp_path / "m" / "loop"))
    except (OSError, NotImplementedError):
        pytest.skip("no symlinks here")
    listing = models.scan([str(tmp_path / "m"), str(tmp_path / "m" / "loop")])
    assert list(listing.adapters) == ["ip-adapter.safetensors"]


def test_folder_weights_match_the_loader():
    from charadapter import clip_vision

    assert models.FOLDER_WEIGHTS == clip_vision.FOLDER_WEIGHTS


# ---------------------------------------------------------------- names are the only way in


def test_names_resolve_paths_never_do(tree):
    listing = models.scan(_folders(tree))
    assert listing.adapter_path("ip-adapter_sd15.safetensors") == tree["ext_adapter"]
    assert listing.adapter_path("ControlNet - ip-adapter_sd15.safetensors") == tree["cn_adapter_dup"]
    assert listing.encoder_path("clip_h.pth") == tree["clip_h"]
    for probe in (tree["ext_adapter"], tree["cn_adapter_dup"], "ControlNet/ip-adapter_sd15.safetensors",
                  "../models/ip-adapter_sd15.safetensors", "ControlNet\\ip-adapter_sd15.safetensors",
                  "./ip-adapter_sd15.safetensors", "", None, 3, "IP-ADAPTER_SD15.SAFETENSORS"):
        assert listing.adapter_path(probe) is None, probe
    assert listing.encoder_path(tree["clip_h"]) is None
    assert listing.encoder_path("ip-adapter_sd15.safetensors") is None  # kinds do not mix


def test_listed_names_pass_params_validation(tree, tmp_path):
    _st(str(tmp_path / ".cache" / "x.safetensors"), ADAPTER_KEYS)
    _st(str(tmp_path / "y" / "x.safetensors"), ADAPTER_KEYS)
    _st(str(tmp_path / "z" / "a  b\tc.safetensors"), ADAPTER_KEYS)
    listing = models.scan(_folders(tree) + [str(tmp_path / "y"), str(tmp_path / ".cache"), str(tmp_path / "z")])
    assert listing.adapter_path("x.safetensors") == str(tmp_path / "y" / "x.safetensors")
    assert listing.adapter_path("cache - x.safetensors") == str(tmp_path / ".cache" / "x.safetensors")
    assert "a b c.safetensors" in listing.adapters
    for name in list(listing.adapters) + list(listing.encoders):
        assert "/" not in name and "\\" not in name and not name.startswith(".")
        assert Params.single(model=name, encoder=name).validated().first.model == name


# ---------------------------------------------------------------- picking the encoder


def test_pick_encoder_by_name_and_h94_layout(tree):
    listing = models.scan(_folders(tree))
    assert models.pick_encoder(VIT_H, listing.encoders) == "image_encoder"
    assert models.pick_encoder(VIT_BIGG, listing.encoders) == "sdxl_models - image_encoder"
    assert models.pick_encoder("vit-bigg-14", listing.encoders) == "sdxl_models - image_encoder"
    only_cn = {"clip_g.pth": tree["clip_g"], "clip_h.pth": tree["clip_h"]}
    assert models.pick_encoder(VIT_H, only_cn) == "clip_h.pth"
    assert models.pick_encoder(VIT_BIGG, only_cn) == "clip_g.pth"
    comfy = {"clip_vision_g.safetensors": tree["bigg_file"]}
    assert models.pick_encoder(VIT_BIGG, comfy) == "clip_vision_g.safetensors"
    assert models.pick_encoder(VIT_H, comfy) is None


def test_pick_encoder_from_shapes(tree, tmp_path):
    anon = {"anything.safetensors": tree["anon_vision"], "mystery.bin": _touch(str(tmp_path / "mystery.bin"))}
    assert models.pick_encoder(VIT_H, anon) == "anything.safetensors"
    assert models.pick_encoder(VIT_BIGG, anon) is None
    full_clip = _hf_encoder(str(tmp_path / "laion" / "CLIP-ViT-bigG-14-laion2B"), 1664, model_type="clip")
    assert models.pick_encoder(VIT_BIGG, {"x": full_clip}) == "x"


def test_stored_shapes_beat_a_misleading_folder_name(tmp_path):
    # h94's ViT-bigG folder copied into our models/ is named like h94's ViT-H folder
    copied = _hf_encoder(str(tmp_path / "models" / "image_encoder"), 1664)
    assert models.encoder_kind_from_name(copied) == VIT_H
    assert models.pick_encoder(VIT_BIGG, {"image_encoder": copied}) == "image_encoder"
    assert models.pick_encoder(VIT_H, {"image_encoder": copied}) is None


def test_pick_encoder_unknown_spec_or_empty():
    assert models.pick_encoder("ViT-L-14", {"clip_h.pth": "/x/clip_h.pth"}) is None
    assert models.pick_encoder(VIT_H, {}) is None
    assert models.pick_encoder(None, {"clip_h.pth": "/x/clip_h.pth"}) is None


# ---------------------------------------------------------------- the cached listing


@pytest.fixture()
def fresh_cache(monkeypatch):
    monkeypatch.setattr(models, "_cached", None)
    yield
    models._cached = None


def test_listing_is_cached_and_refresh_rescans(tree, monkeypatch, fresh_cache):
    folders = _folders(tree)
    calls = []
    monkeypatch.setattr(models, "webui_folders", lambda: calls.append(1) or folders)
    first = models.listing()
    assert models.listing() is first and len(calls) == 1
    late = _st(os.path.join(tree["ext"], "models", "ip-adapter_late.safetensors"), ADAPTER_KEYS)
    assert "ip-adapter_late.safetensors" not in models.listing().adapters
    assert models.resolve_adapter("ip-adapter_late.safetensors") == late  # an unknown name rescans once
    assert len(calls) == 2
    assert models.resolve_adapter(late) is None and models.resolve_adapter("../x") is None
    assert len(calls) == 2  # path-like text never triggers a scan
    assert models.resolve_encoder("clip_h.pth") == tree["clip_h"]
    assert models.refresh([]).adapters == {} and models.listing().adapters == {}


@pytest.mark.skipif(not os.path.isfile(os.path.join(DOUBLE, "modules", "paths.py")), reason="WebUI test double absent")
def test_webui_folders_from_the_host(tree, monkeypatch, fresh_cache, tmp_path):
    monkeypatch.syspath_prepend(DOUBLE)
    from modules import paths, shared

    extra = tmp_path / "extra"
    extra.mkdir()
    old = paths.data_path
    monkeypatch.setitem(shared.opts.data, ca_settings.SETTING_EXTRA_FOLDERS, f"{extra};{tmp_path / 'nope'}")
    monkeypatch.setattr(models, "EXTENSION_DIR", tree["ext"])
    try:
        paths.set_data_path(tree["root"])
        folders = models.webui_folders()
    finally:
        paths.set_data_path(old)
    assert folders == _folders(tree, [str(extra)])


@pytest.mark.skipif(not os.path.isfile(os.path.join(DOUBLE, "modules", "shared.py")), reason="WebUI test double absent")
def test_add_settings_registers_the_section_and_resizes_the_caches(monkeypatch):
    monkeypatch.syspath_prepend(DOUBLE)
    from modules import shared

    keys = (ca_settings.SETTING_EXTRA_FOLDERS, ca_settings.SETTING_SEGMENTATION_CACHE, ca_settings.SETTING_ADAPTERS_LOADED)
    monkeypatch.setattr(ca_caches.SEGMENTATION_CACHE, "capacity", ca_caches.SEGMENTATION_CACHE.capacity)
    monkeypatch.setattr(ca_caches.ADAPTER_CACHE, "capacity", ca_caches.ADAPTER_CACHE.capacity)
    try:
        ca_settings.add_settings()
        infos = [shared.opts.data_labels[key] for key in keys]
        assert [info.default for info in infos] == ["", ca_caches.DEFAULT_SEGMENTATION_CACHE, ca_caches.DEFAULT_ADAPTERS_LOADED]
        assert {info.section for info in infos} == {ca_settings.SETTINGS_SECTION}
        # Settings -> Apply runs each changed option's onchange (modules/options.py (Options.set))
        assert shared.opts.set(ca_settings.SETTING_SEGMENTATION_CACHE, 3) and ca_caches.SEGMENTATION_CACHE.capacity == 3
        assert shared.opts.set(ca_settings.SETTING_ADAPTERS_LOADED, 0.0) and ca_caches.ADAPTER_CACHE.capacity == 0
    finally:
        for key in keys:
            shared.opts.data_labels.pop(key, None)
            shared.opts.data.pop(key, None)


def test_cache_size_reads_what_settings_hold():
    assert ca_caches.cache_size(4, 16) == 4 and ca_caches.cache_size("5", 16) == 5 and ca_caches.cache_size(2.0, 16) == 2
    assert ca_caches.cache_size(-3, 16) == 0 and ca_caches.cache_size(10 ** 6, 16) == ca_caches.MAX_CACHE_SIZE
    assert ca_caches.cache_size(None, 16) == 16 and ca_caches.cache_size("many", 2) == 2


# ---------------------------------------------------------------- the extension's use of them (host double)


def prepare(script, **params):
    """Controller.process alone (no sampling): validate, segment and encode the reference."""
    from webui_host import args_for, processing

    p = processing.StableDiffusionProcessingTxt2Img(prompt="a face", steps=1, width=64, height=64, sampler_name="Euler")
    controller = script.hooks.controller
    controller.process(p, args_for(script, **params)[script.args_from:script.args_to])
    try:
        assert controller.error is None and controller.generation is not None, controller.error
    finally:
        controller.end()
    return p


def test_runtime_caches_follow_the_settings(host, monkeypatch):
    from modules import shared

    runner, script = host
    monkeypatch.setattr(ca_caches.SEGMENTATION_CACHE, "capacity", ca_caches.SEGMENTATION_CACHE.capacity)
    monkeypatch.setattr(ca_caches.ADAPTER_CACHE, "capacity", ca_caches.ADAPTER_CACHE.capacity)
    segmented = []
    original = ca_reference_pass.segment
    monkeypatch.setattr(ca_reference_pass, "segment", lambda *args: segmented.append(1) or original(*args))
    shared.opts.data[ca_settings.SETTING_SEGMENTATION_CACHE] = 0  # config.json values are in opts.data from the start
    prepare(script)
    prepare(script)
    assert len(segmented) == 2 and ca_caches.SEGMENTATION_CACHE.capacity == 0
    shared.opts.data[ca_settings.SETTING_SEGMENTATION_CACHE] = 4
    shared.opts.data[ca_settings.SETTING_ADAPTERS_LOADED] = 1
    prepare(script)
    prepare(script)
    assert len(segmented) == 3 and ca_caches.SEGMENTATION_CACHE.capacity == 4 and ca_caches.ADAPTER_CACHE.capacity == 1


@pytest.mark.parametrize("flag, back_to_cpu", [
    (None, False), ("medvram", True), ("lowvram", True), ("medvram_sdxl", False), ("sd_model.lowvram", True),
])
def test_low_vram_modes_send_the_image_encoder_back_to_the_cpu(host, sd_model, monkeypatch, flag, back_to_cpu):
    """--medvram / --lowvram keep only the running part on the GPU (modules/lowvram.py); there is no
    GPU here, so a spy on the encoder's .to records the moves. --medvram-sdxl is for SDXL only."""
    from modules import devices, shared

    runner, script = host
    if flag == "sd_model.lowvram":  # what lowvram.setup_for_low_vram sets, whichever flag asked for it
        monkeypatch.setattr(sd_model, "lowvram", True)
    elif flag:
        monkeypatch.setattr(shared.cmd_opts, flag, True)
    clip = ca_caches.ENCODER_CACHE.get("tiny-encoder")
    moves = []
    monkeypatch.setattr(clip, "to", lambda *args, **kwargs: moves.append(args[0]) or clip)
    prepare(script)
    assert moves == ([devices.device, "cpu"] if back_to_cpu else [devices.device])


def test_status_text_while_the_reference_is_prepared(host, monkeypatch):
    """shared.state.textinfo is what the progress bar shows (modules/progress.py (progressapi))."""
    from modules import shared

    runner, script = host
    seen = []
    segment, encode = ca_reference_pass.segment, ca_reference_pass.RegionEncoder.encode
    monkeypatch.setattr(ca_reference_pass, "segment", lambda *args: seen.append(shared.state.textinfo) or segment(*args))
    monkeypatch.setattr(ca_reference_pass.RegionEncoder, "encode",
                        lambda self, *args: seen.append(shared.state.textinfo) or encode(self, *args))
    shared.state.textinfo = "Batch 1 out of 2"
    prepare(script)
    assert seen == ["Character-Adapter: segmenting the reference", "Character-Adapter: encoding the reference"]
    assert shared.state.textinfo == "Batch 1 out of 2"
    prepare(script)  # cached: nothing to show
    assert len(seen) == 2 and shared.state.textinfo == "Batch 1 out of 2"


def test_headers_without_wanted_keys_are_skimmed(tree):
    assert models.read_safetensors_header(tree["controlnet"], (b"image_proj.",)) == {}
    assert set(models.read_safetensors_header(tree["controlnet"])) == set(CONTROLNET_KEYS)
    assert set(models.read_safetensors_header(tree["ext_adapter"], (b"image_proj.",))) == set(ADAPTER_KEYS)
