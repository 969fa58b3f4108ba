"""Glue between the WebUI's Script hooks and the Controller (imported only inside the WebUI)."""

from typing import Any, List

from modules import script_callbacks

from ..errors import InputError
from . import api, models, settings, ui, xyz
from .controller import Controller

TITLE = "Character-Adapter"


def resolve_model(kind: str, name: str) -> str:
    """A listed name -> its path; never opens user text as a path."""
    if kind == "adapter":
        path = models.resolve_adapter(name)
        if path is None:
            raise InputError(
                f"Character-Adapter: model: {name!r} is not an IP-Adapter in the list "
                f"({len(models.listing().adapters)} found); put the file in models/ and press 🔄")
        return path
    if name.startswith("auto:"):
        wanted = name[len("auto:"):]
        listing = models.listing()
        picked = models.pick_encoder(wanted, listing.encoders)
        if picked is None:
            raise InputError(
                f"Character-Adapter: encoder: no {wanted} CLIP image encoder found; see models/README.md")
        return listing.encoders[picked]
    path = models.resolve_encoder(name)
    if path is None:
        raise InputError(f"Character-Adapter: encoder: {name!r} is not an image encoder in the list")
    return path


class ScriptHooks:
    """Methods the Script class forwards to; holds one Controller per script instance."""

    def __init__(self):
        self.controller = Controller(resolve_model)
        script_callbacks.on_cfg_denoiser(self.controller.on_cfg_denoiser)
        script_callbacks.on_script_unloaded(self.controller.end)

    def ui(self, script, is_img2img: bool) -> List[Any]:
        units = settings.character_units()
        components = ui.build_ui(is_img2img, models.listing, models.refresh, units)
        script.infotext_fields = ui.infotext_fields(components)
        script.paste_field_names = ui.paste_field_names(units)
        return components

    def process(self, p, *args) -> None:
        self.controller.process(p, args)

    def process_before_every_sampling(self, p, *args, **kwargs) -> None:
        self.controller.before_sampling(p, kwargs["x"])

    def postprocess(self, p, processed, *args) -> None:
        self.controller.postprocess(p, processed)


def register_callbacks() -> None:
    """Module-level callbacks; called each time the WebUI imports our script file.

    The WebUI clears every callback before it (re)loads the scripts (modules/scripts.py
    load_scripts) but this package stays imported, so registering at its import would be lost
    on "Reload UI". Each callback is removed first, so a second call adds no duplicate.
    """
    for register, callback in ((script_callbacks.on_ui_settings, settings.add_settings),
                               (script_callbacks.on_app_started, api.on_app_started),
                               (script_callbacks.on_before_ui, xyz.add_axes)):
        script_callbacks.remove_callbacks_for_function(callback)
        register(callback)
    xyz.add_axes()  # now too: with --nowebui the UI (xyz's axis list copy) is built before on_before_ui
