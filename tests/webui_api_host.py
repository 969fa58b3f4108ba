"""The WebUI double served over HTTP: model files on disk, the real model lookup, an API-only app.

Used by tests/test_webui_api.py and tools/serve_webui_double.py (the README's curl / Python client
examples ran against it). Builds on webui_host.start_host (the double with the extension loaded).
"""

import base64
import io
import os
import threading

from safetensors.torch import save_file

from webui_host import tiny_adapter, tiny_clip  # noqa: F401  (sys.path set up by webui_host)
from charadapter.webui import caches as ca_caches
from charadapter.layers import find_attn2_layers
from charadapter.webui import models, script as script_module
from modules import paths, script_callbacks, shared

ADAPTER_NAME = "ip-adapter_tiny.safetensors"
ENCODER_NAME = "CLIP-ViT-H-14-tiny"


def install_listed_models(script, monkeypatch):
    """Put a tiny IP-Adapter file and CLIP folder where the WebUI's models live; use the real lookup.

    The files are scanned like users' files (models.scan); their loaded weights are put in the
    extension's caches under the scanned paths, so generation does not depend on the loaders (tested
    elsewhere on real layouts). Returns the listing.
    """
    unet = shared.sd_model.model.diffusion_model
    weights = tiny_adapter(find_attn2_layers(unet))
    adapter_path = os.path.join(paths.models_path, "ipadapter", ADAPTER_NAME)
    os.makedirs(os.path.dirname(adapter_path), exist_ok=True)
    tensors = {f"image_proj.{k}": v.contiguous() for k, v in weights.image_proj.items()}
    for index, (k, v) in enumerate(weights.layers):
        tensors[f"ip_adapter.{2 * index + 1}.to_k_ip.weight"] = k.contiguous()
        tensors[f"ip_adapter.{2 * index + 1}.to_v_ip.weight"] = v.contiguous()
    save_file(tensors, adapter_path)
    encoder_path = os.path.join(paths.models_path, "clip_vision", ENCODER_NAME)
    clip = tiny_clip()
    clip.save_pretrained(encoder_path, safe_serialization=True)
    ca_caches.ADAPTER_CACHE.put(adapter_path, weights)
    ca_caches.ENCODER_CACHE.put(encoder_path, clip)
    monkeypatch.setattr(models, "_cached", None)
    monkeypatch.setattr(script.hooks.controller, "resolve_model", script_module.resolve_model)
    listing = models.refresh()
    assert listing.adapter_path(ADAPTER_NAME) == adapter_path, listing
    assert listing.encoder_path(ENCODER_NAME) == encoder_path, listing
    return listing


def api_only_app():
    """What webui.py (api_only) does: FastAPI app, Api routes, before_ui, then app_started."""
    from fastapi import FastAPI
    from modules.api.api import Api

    app = FastAPI()
    api = Api(app, threading.Lock())
    script_callbacks.before_ui_callback()
    script_callbacks.app_started_callback(None, app)
    return app, api


def b64_png(image, data_url=False):
    """An image as the API expects it: base64 PNG text, optionally as a data URL."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    text = base64.b64encode(buffer.getvalue()).decode()
    return f"data:image/png;base64,{text}" if data_url else text
