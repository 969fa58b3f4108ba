"""Soak (issue 5.4): 50 generations in a row through the Script in the WebUI test double.

Settings change from one generation to the next: weight (0 included), start/end, soft / hard /
one region / whole image, region phrases, batch size 1-2, steps 1-2, hires fix on every fifth,
show masks, 20 references, three adapters and two image encoders (more than the caches hold),
and the cache sizes in Settings halfway through. After each generation: no hook of ours is on
the UNet, the Controller holds nothing, every cache is within its bound. Between generations 10
and 50: resident memory (after gc) grows by less than 50 MB, the live tensors neither grow in
number nor in bytes, and no Generation or FusionSession of an earlier run is still alive.
"""

import gc
import os
import time
import weakref

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from charadapter.cache import BoundedCache
from charadapter.params import Params, Region
from charadapter.webui import caches as ca_caches
from charadapter.webui import controller as ca_controller
from charadapter.webui import reference_pass as ca_reference_pass
from charadapter.webui import settings as ca_settings
from webui_host import (CLIP_DIM, find_attn2_layers, ours, processing, shared, tiny_adapter)

GENERATIONS = int(os.environ.get("SOAK_GENERATIONS", 50))
WARM_UP = 10  # memory is measured from here: first-use allocations (caches, allocator arenas) are done
MAX_GROWTH_MB = 50
ADAPTERS = ("soak-a", "soak-b", "soak-c")
ENCODERS = ("soak-enc-1", "soak-enc-2")
REGION_SETS = (
    None,  # the panel's defaults: face / upper body / lower body
    (Region("face", "face", 1.2),),
    (),  # no region: one over the whole image
    (Region("upper body", "upper body", 0.7), Region("lower body", "standing", 1.0)),
)
PROMPT = "a face, upper body, lower body, standing"


def rss_mb():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def live_tensors():
    tensors = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
    return len(tensors), sum(t.element_size() * t.nelement() for t in tensors if t.device.type != "meta")


def reference(index):
    """20 different characters: colours and proportions vary."""
    rng = np.random.default_rng(index)
    skin, top, legs = (tuple(int(c) for c in rng.integers(20, 235, 3)) for _ in range(3))
    width = 64 + 8 * (index % 3)
    img = Image.new("RGB", (width, 96), (90, 160, 90))
    img.paste(skin, (20, 5, 44, 30))
    img.paste(top, (12, 30, width - 12, 62))
    img.paste(legs, (16, 62, 48, 94))
    return img


def settings(i):
    """Generation i's txt2img arguments and Character-Adapter settings."""
    regions = REGION_SETS[i % len(REGION_SETS)]
    params = dict(
        enabled=True, image=reference(i % 20), model=ADAPTERS[i % 3], encoder=ENCODERS[(i // 2) % 2],
        weight=(0.0, 0.3, 0.8, 1.5)[i % 4], start=(0.0, 0.0, 0.3)[i % 3], end=(1.0, 0.8, 1.0)[i % 3],
        fusion=("soft", "hard")[(i // 4) % 2], temperature=(0.1, 0.5)[i % 2], show_masks=i % 7 == 0,
    )
    if regions is not None:
        params["regions"] = regions
    txt2img = dict(prompt=PROMPT, negative_prompt="", batch_size=1 + i % 2, steps=1 + (i % 6 == 1),
                   width=64, height=64, sampler_name="Euler", seed=100 + i)
    if i % 5 == 4:
        txt2img.update(enable_hr=True, hr_scale=2, hr_upscaler="Latent", denoising_strength=0.5,
                       hr_second_pass_steps=1)
    return txt2img, params


def _fake_adapter(layers):
    def load(path):
        weights = tiny_adapter(layers)  # one spec; values differ per file
        scale = 1.0 + ADAPTERS.index(path) * 0.25
        return type(weights)(spec=weights.spec, image_proj=weights.image_proj,
                             layers=[(k * scale, v * scale) for k, v in weights.layers], source=path)
    return load


def _fake_encoder(path):
    torch.manual_seed(ENCODERS.index(path))
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                              image_size=224, patch_size=56, projection_dim=CLIP_DIM)
    return CLIPVisionModelWithProjection(config).eval()


@pytest.fixture
def soak_host(host, sd_model, monkeypatch):
    """The host with three adapter files and two encoders behind the real caches."""
    runner, script = host
    loads = {"adapter": [], "encoder": []}
    fake_adapter = _fake_adapter(find_attn2_layers(sd_model.model.diffusion_model))

    def load_adapter(path):
        loads["adapter"].append(path)
        return fake_adapter(path)

    def load_encoder(path):
        loads["encoder"].append(path)
        return _fake_encoder(path)

    monkeypatch.setattr(ca_reference_pass, "load_ip_adapter", load_adapter)
    monkeypatch.setattr(ca_reference_pass, "load_clip_vision", load_encoder)
    monkeypatch.setattr(script.hooks.controller, "resolve_model", lambda kind, name: name)
    ca_caches.ADAPTER_CACHE.clear()
    ca_caches.ENCODER_CACHE.clear()
    yield runner, script, loads
    shared.opts.data.pop(ca_settings.SETTING_SEGMENTATION_CACHE, None)
    ca_settings.apply_cache_settings()  # every cache back to its default size
    ca_caches.ADAPTER_CACHE.clear()
    ca_caches.ENCODER_CACHE.clear()


def test_fifty_generations_leave_nothing_and_stay_bounded(soak_host, sd_model):
    runner, script, loads = soak_host
    unet = sd_model.model.diffusion_model
    controller = script.hooks.controller
    runs = []  # weak references to every Generation / FusionSession made
    real_generation, real_fusion = ca_controller.Generation, ca_controller.FusionSession
    memory = {}
    start = time.perf_counter()
    for i in range(GENERATIONS):
        if i == GENERATIONS // 2:  # the user lowers the segmentation cache in Settings mid-session
            shared.opts.data[ca_settings.SETTING_SEGMENTATION_CACHE] = 4
        txt2img, params = settings(i)
        p = processing.StableDiffusionProcessingTxt2Img(**txt2img)
        p.scripts = runner
        full = [0] * script.args_to
        full[script.args_from:script.args_to] = Params.single(**params).to_args()
        p.script_args = tuple(full)
        made = []
        ca_controller.Generation = lambda *a, **k: _track(made, real_generation(*a, **k))
        ca_controller.FusionSession = lambda *a, **k: _track(made, real_fusion(*a, **k))
        try:
            processed = processing.process_images(p)
        finally:
            ca_controller.Generation, ca_controller.FusionSession = real_generation, real_fusion
        runs.extend(made)

        shown = len(processed.images) - txt2img["batch_size"]  # mask overlays, when asked for
        assert shown >= 0 and (shown > 0) == (params["show_masks"] and params.get("regions") != ()), (
            f"generation {i}: {len(processed.images)} images")
        assert "Character-Adapter" in processed.infotexts[0], f"generation {i} ran without the adapter"
        assert not p.comments or all("not found in the reference" in c for c in p.comments), p.comments
        assert ours(unet) == 0 and controller.generation is None, f"generation {i} left something behind"
        for name, cache in vars(ca_caches).items():
            if isinstance(cache, BoundedCache):
                assert len(cache) <= cache.capacity, f"generation {i}: {name} over its bound"
        del p, processed
        if i + 1 in (WARM_UP, GENERATIONS):
            gc.collect()
            memory[i + 1] = (rss_mb(), *live_tensors())
    elapsed = time.perf_counter() - start

    growth = memory[GENERATIONS][0] - memory[WARM_UP][0]
    assert growth < MAX_GROWTH_MB, f"resident memory grew {growth:.1f} MB from generation {WARM_UP} to {GENERATIONS}"
    (_, count_10, bytes_10), (_, count_50, bytes_50) = memory[WARM_UP], memory[GENERATIONS]
    assert count_50 <= count_10 and bytes_50 <= bytes_10 + 2**20, (
        f"live tensors: {count_10} ({bytes_10 / 2**20:.1f} MB) at {WARM_UP}, "
        f"{count_50} ({bytes_50 / 2**20:.1f} MB) at {GENERATIONS}")
    gc.collect()
    assert len(runs) >= 2 * GENERATIONS and not [r for r in runs if r() is not None], "an earlier run is still alive"
    # the bounds were exercised, not just respected
    assert ca_caches.SEGMENTATION_CACHE.capacity == 4 and len(ca_caches.SEGMENTATION_CACHE) == 4
    assert len(loads["adapter"]) > len(ADAPTERS) and len(loads["encoder"]) > len(ENCODERS)
    print(f"soak: {GENERATIONS} generations in {elapsed:.1f} s; RSS {memory[WARM_UP][0]:.0f} -> "
          f"{memory[GENERATIONS][0]:.0f} MB; tensors {count_10} -> {count_50}")


def _track(made, obj):
    made.append(weakref.ref(obj))
    return obj
