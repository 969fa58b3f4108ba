"""Memory of loading the real WebUI install's weight files the way a Character-Adapter request
does, outside the WebUI (docs/REAL_WEBUI.md, "Memory"): per step, the process's RSS after it and
its peak during it (VmHWM, reset before each step through /proc/self/clear_refs; Linux).

    python load_peaks.py [--encoder DIR] [--adapter FILE]

Steps: load the image encoder (fp32, as load_clip_vision gives it); load the IP-Adapter; make
the keys and values of every adapter layer for three regions' tokens three times, as each
generation's FusionSession does (what the process keeps of them shows in "after").
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from charadapter.attention import ip_keys_values  # noqa: E402
from charadapter.checkpoint import load_ip_adapter  # noqa: E402
from charadapter.clip_vision import load_clip_vision  # noqa: E402

MODELS = "/work/realwebui/webui/models"


def kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def step(name: str, fn):
    """Run fn with the peak reset; print RSS after and the peak above the RSS before, in MiB."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = kib("VmRSS")
    out = fn()
    print(f"{name:<40} peak +{(kib('VmHWM') - before) / 1024:7.0f} MiB   after +{(kib('VmRSS') - before) / 1024:7.0f} MiB")
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--encoder", default=os.path.join(MODELS, "clip_vision/image_encoder"))
    ap.add_argument("--adapter", default=os.path.join(MODELS, "ipadapter/ip-adapter_sdxl_vit-h.safetensors"))
    ap.add_argument("--whole-cast", action="store_true",
                    help="cast each layer's weights whole to the tokens' dtype first, as sessions did before a809896")
    args = ap.parse_args()
    from transformers import CLIPVisionModelWithProjection  # noqa: F401  (imported before measuring)

    torch.set_num_threads(2)
    step("image encoder load", lambda: load_clip_vision(args.encoder))
    adapter = step("IP-Adapter load", lambda: load_ip_adapter(args.adapter))
    width = adapter.layers[0][0].shape[1]
    for i in range(3):
        sets = torch.randn(3, 2, 4, width)  # (R, cond/uncond, T, C_ctx)
        cast = (lambda w: w.to(sets.dtype)) if args.whole_cast else (lambda w: w)
        step(f"keys and values, session {i + 1}",
             lambda: [ip_keys_values(sets, cast(wk), cast(wv)) for wk, wv in adapter.layers])


if __name__ == "__main__":
    main()
