"""Drive the extension in the WebUI test double on a real tiny ldm LatentDiffusion (shared by tests).

Adapter and encoder weights are tiny and random (the loaders are tested on real layouts in
test_checkpoint / test_clip_vision); here they are put in the extension's caches so that the
host flow runs: process -> reference segmentation with the loaded model -> region tokens ->
hooks at every sampling start -> CFG rows per step -> postprocess removes everything.
"""

import os
import sys

import numpy as np
import torch
from PIL import Image
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "webui_double"))

from modules import errors, paths, processing, script_callbacks, scripts, sd_models, shared  # noqa: E402

from charadapter.checkpoint import AdapterSpec, IPAdapterWeights  # noqa: E402
from charadapter.layers import find_attn2_layers  # noqa: E402
from charadapter.params import Params  # noqa: E402
from charadapter.webui import caches as ca_caches, reference_pass as ca_reference_pass  # noqa: E402
from tiny_sd import TINY_CONTEXT_DIM, make_tiny_sd  # noqa: E402

CLIP_DIM = 16


def make_sd_model():
    return make_tiny_sd(seed=3)


def start_host(sd_model, tmp_path, monkeypatch):
    """Fresh double with the extension loaded; yields (runner, script). Used by conftest's `host`."""
    paths.set_data_path(str(tmp_path))
    shared.reset_for_tests()
    errors.reported.clear()
    script_callbacks.clear_callbacks()
    sd_models.register_model(sd_model)
    scripts.load_scripts([(ROOT, os.path.join(ROOT, "scripts", "character_adapter.py"))])
    runner = scripts.scripts_txt2img
    runner.build_ui(is_img2img=False)
    (script,) = [s for s in runner.alwayson_scripts if s.title() == "Character-Adapter"]
    weights = tiny_adapter(find_attn2_layers(sd_model.model.diffusion_model))
    ca_caches.ADAPTER_CACHE.put("tiny-adapter", weights)
    ca_caches.ENCODER_CACHE.put("tiny-encoder", tiny_clip())
    resolved = {"adapter": "tiny-adapter", "encoder": "tiny-encoder"}
    monkeypatch.setattr(script.hooks.controller, "resolve_model", lambda kind, name: resolved[kind])
    monkeypatch.setitem(ca_reference_pass.PASS_AREA, "sd15", 64 * 128)  # the tiny model: 64x128 px for the 64x96 reference
    yield runner, script
    script_callbacks.clear_callbacks()
    ca_caches.SEGMENTATION_CACHE.clear()
    ca_caches.REFERENCE_CACHE.clear()


def tiny_adapter(layers, seed=4):
    gen = torch.Generator().manual_seed(seed)
    tokens = 4
    image_proj = {"proj.weight": torch.randn(tokens * TINY_CONTEXT_DIM, CLIP_DIM, generator=gen) * 0.3,
                  "proj.bias": torch.zeros(tokens * TINY_CONTEXT_DIM),
                  "norm.weight": torch.ones(TINY_CONTEXT_DIM), "norm.bias": torch.zeros(TINY_CONTEXT_DIM)}
    kv = [(torch.randn(l.inner_dim, TINY_CONTEXT_DIM, generator=gen) * 0.3,
           torch.randn(l.inner_dim, TINY_CONTEXT_DIM, generator=gen) * 0.3) for l in layers]
    spec = AdapterSpec(variant="sd15", arch="sd15", plus=False, num_tokens=tokens, context_dim=TINY_CONTEXT_DIM,
                       clip_dim=CLIP_DIM, encoder="ViT-H-14", num_layers=len(layers))
    return IPAdapterWeights(spec=spec, image_proj=image_proj, layers=kv, source="tiny-adapter")


def tiny_clip():
    torch.manual_seed(5)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=224, patch_size=56, projection_dim=CLIP_DIM)
    return CLIPVisionModelWithProjection(config).eval()


def reference_image():
    img = Image.new("RGB", (64, 96), (90, 160, 90))
    img.paste((230, 190, 160), (20, 5, 44, 30))
    img.paste((200, 30, 30), (12, 30, 52, 62))
    img.paste((30, 30, 200), (16, 62, 48, 94))
    return img


def args_for(script, **overrides):
    overrides.setdefault("model", "tiny-adapter")
    params = Params.single(enabled=True, image=reference_image(), **overrides)
    values = params.to_args()
    full = [0] * script.args_to
    full[script.args_from:script.args_to] = values
    return tuple(full)


def generate(script, runner, prompt="a face, upper body, lower body, standing", **kwargs):
    overrides = kwargs.pop("params", {})
    args = dict(prompt=prompt, negative_prompt="", batch_size=1, steps=2, width=64, height=64,
                sampler_name="Euler", seed=7)
    args.update(kwargs)
    p = processing.StableDiffusionProcessingTxt2Img(**args)
    p.scripts = runner
    p.script_args = args_for(script, **overrides)
    return p, processing.process_images(p)


def ours(unet):
    return sum(1 for m in unet.modules() for d in (m._forward_hooks, m._forward_pre_hooks)
               for fn in d.values() if getattr(fn, "_charadapter", False))


def plain(runner, script, **kwargs):
    args = dict(prompt="a face, upper body, lower body, standing", negative_prompt="", batch_size=1, steps=2,
                width=64, height=64, sampler_name="Euler", seed=7)
    args.update(kwargs)
    p = processing.StableDiffusionProcessingTxt2Img(**args)
    p.scripts = runner
    full = [0] * script.args_to
    full[script.args_from:script.args_to] = Params().to_args()
    p.script_args = tuple(full)
    return processing.process_images(p)


def pixels(processed, index=0):
    return torch.from_numpy(np.asarray(processed.images[index], dtype=np.float32))
