"""HTTP route GET /character-adapter/models: the names the API's `model` / `encoder` keys accept.

Added from script_callbacks.on_app_started(demo, app), which the WebUI calls with its FastAPI app
(demo is None with --nowebui), like sd-webui-controlnet's /controlnet/model_list. Generation
itself goes through the WebUI's own /sdapi/v1/txt2img and /img2img (alwayson_scripts).
"""

from typing import Any, Dict, List

MODELS_ROUTE = "/character-adapter/models"


def model_names(refresh: bool = False) -> Dict[str, List[str]]:
    """{"adapters": [...], "encoders": [...]}: listed names; refresh=true rescans the folders first."""
    from . import models

    listing = models.refresh() if refresh else models.listing()
    return {"adapters": list(listing.adapters), "encoders": list(listing.encoders)}


def has_route(app: Any, path: str, method: str = "GET") -> bool:
    """True when `app` already serves `method path` (a second on_app_started must not add another)."""
    for route in getattr(app, "routes", []):
        if getattr(route, "path", None) == path and method in (getattr(route, "methods", None) or ()):
            return True
    return False


def on_app_started(demo: Any, app: Any) -> None:
    """script_callbacks.on_app_started callback: add the route once per app."""
    if not has_route(app, MODELS_ROUTE):
        app.add_api_route(MODELS_ROUTE, model_names, methods=["GET"])
