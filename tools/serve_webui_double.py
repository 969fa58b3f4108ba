"""Serve the WebUI test double's HTTP API with the extension loaded, to try API clients on a CPU.

    python tools/serve_webui_double.py --port 7860

It is what `webui.py --nowebui` does (FastAPI app, /sdapi/v1/txt2img|img2img, before_ui, then
app_started, which adds /character-adapter/models), on the tiny random-weight `ldm` model of the
tests: the images are noise-like, but every argument takes the real path through the API, the
script and the hooks. The README's curl and webuiapi examples were run against it.
"""

import argparse
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--adapter-name", default="ip-adapter_sd15.safetensors",
                        help="file name the tiny adapter is listed under")
    parser.add_argument("--encoder-name", default="CLIP-ViT-H-14-laion2B-s32B-b79K",
                        help="folder name the tiny image encoder is listed under")
    args = parser.parse_args()

    import pytest
    import uvicorn

    import webui_api_host
    from webui_host import make_sd_model, start_host

    webui_api_host.ADAPTER_NAME, webui_api_host.ENCODER_NAME = args.adapter_name, args.encoder_name
    data_dir = tempfile.mkdtemp(prefix="webui-double-")
    monkeypatch = pytest.MonkeyPatch()
    host = start_host(make_sd_model(), data_dir, monkeypatch)
    _, script = next(host)
    listing = webui_api_host.install_listed_models(script, monkeypatch)
    app, _ = webui_api_host.api_only_app()
    print(f"WebUI double in {data_dir}: adapters {list(listing.adapters)}, encoders {list(listing.encoders)}")
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        monkeypatch.undo()


if __name__ == "__main__":
    main()
