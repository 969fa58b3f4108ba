"""The Character-Adapter panel (gradio 3.41.2) and its infotext paste wiring.

`build_ui` returns the components in `charadapter.params.ARG_NAMES` order, whose values are the
script's positional args. Every default is taken from `Params()`, so the values `ui()` returns
(which the API also uses as its defaults) parse back to `Params()`. `build_ui` has no side
effects beyond building components: it reads the cached model listing and registers nothing
outside the gradio Blocks it is called in.
"""

import logging
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import gradio as gr

from ..errors import CharacterAdapterError
from ..params import ARG_NAMES, CROP_STYLES, FUSION_MODES, INFOTEXT_PREFIX, MAX_REGIONS, RANGES, Params, Region

logger = logging.getLogger(__name__)

AUTO = "Auto"  # the encoder dropdown's label for "" (the encoder that matches the adapter)
REFRESH_SYMBOL = "\U0001f504"  # 🔄, as the WebUI's own refresh buttons (modules/ui_common.py)
REFERENCE_HEIGHT = 240  # px: about the height of the controls beside it, whatever the image's aspect


def tab_name(is_img2img: bool) -> str:
    """The WebUI tab the panel lives in."""
    return "img2img" if is_img2img else "txt2img"


def elem_id(tab: str, name: str) -> str:
    """Element id of one control: charadapter_<tab>_<name>."""
    return f"charadapter_{tab}_{name}"


class AutoDropdown(gr.Dropdown):
    """A dropdown whose value "" is shown as the choice "Auto".

    gradio 3.41 dropdowns have no separate label and value, so the mapping happens at the
    component's edges: `.value` (the Python-side default, which the API also uses) stays "",
    the browser sees "Auto", and "Auto" picked in the browser arrives as "".
    """

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.value = "" if self.value in (AUTO, None) else self.value  # gradio stored postprocess(value)

    def get_block_name(self) -> str:
        return "dropdown"  # the frontend knows components by this name

    def get_config(self) -> Dict[str, Any]:
        config = super().get_config()
        config["value"] = self.postprocess(config.get("value"))
        return config

    def preprocess(self, x: Any) -> Any:
        return "" if x == AUTO else super().preprocess(x)

    def postprocess(self, y: Any) -> Any:
        return AUTO if y in ("", None) else y


def adapter_choices(listing: Any) -> List[str]:
    """Adapter names in the listing's priority order."""
    return list(listing.adapters)


def encoder_choices(listing: Any) -> List[str]:
    """"Auto" first, then the listed encoder names."""
    return [AUTO] + [name for name in listing.encoders if name != AUTO]


def _refresh_handler(refresh_fn: Callable[[], Any], model: gr.Dropdown,
                     encoder: gr.Dropdown) -> Callable[[], Tuple[dict, dict]]:
    """Click handler: rescan, then give both dropdowns the new choices (values are kept)."""

    def refresh() -> Tuple[dict, dict]:
        listing = refresh_fn()
        adapters, encoders = adapter_choices(listing), encoder_choices(listing)
        model.choices, encoder.choices = adapters, encoders  # pages loaded later see them too
        return gr.update(choices=adapters), gr.update(choices=encoders)

    return refresh


def build_ui(is_img2img: bool, listing_fn: Callable[[], Any],
             refresh_fn: Optional[Callable[[], Any]] = None) -> List[Any]:
    """Build the panel inside the current gr.Blocks; return its inputs in ARG_NAMES order.

    `listing_fn()` gives the cached ModelListing (read, never rescanned here); `refresh_fn()`
    rescans and returns the new listing when 🔄 is clicked (default: models.refresh).
    """
    from modules.ui_components import FormRow, InputAccordion, ToolButton  # the host's helpers

    if refresh_fn is None:
        from . import models

        refresh_fn = models.refresh
    tab = tab_name(is_img2img)

    def eid(name: str) -> str:
        return elem_id(tab, name)

    d = Params()
    listing = listing_fn()
    c: Dict[str, Any] = {}
    with InputAccordion(d.enabled, label="Character-Adapter", elem_id=eid("accordion")) as enabled:
        c["enabled"] = enabled
        with gr.Row(elem_id=eid("top_row")):
            with gr.Column(scale=1, min_width=200):
                c["image"] = gr.Image(
                    value=None, type="pil", source="upload", image_mode="RGBA", label="Reference image",
                    height=REFERENCE_HEIGHT, elem_id=eid("image"), elem_classes=["charadapter-reference"],
                )
            with gr.Column(scale=2):
                with FormRow(elem_id=eid("model_row")):
                    c["model"] = gr.Dropdown(
                        label="IP-Adapter", choices=adapter_choices(listing), value=d.model, elem_id=eid("model"),
                    )
                    c["encoder"] = AutoDropdown(
                        label="Image encoder", choices=encoder_choices(listing), value=d.encoder,
                        elem_id=eid("encoder"),
                    )
                    refresh = ToolButton(value=REFRESH_SYMBOL, elem_id=eid("refresh"))
                c["weight"] = gr.Slider(*RANGES["weight"], step=0.05, value=d.weight, label="Weight", elem_id=eid("weight"))
                with FormRow(elem_id=eid("window_row")):
                    c["start"] = gr.Slider(*RANGES["start"], step=0.01, value=d.start, label="Start at step fraction",
                                           elem_id=eid("start"))
                    c["end"] = gr.Slider(*RANGES["end"], step=0.01, value=d.end, label="End at step fraction",
                                         elem_id=eid("end"))
        for slot in range(1, MAX_REGIONS + 1):
            region = d.regions[slot - 1] if slot <= len(d.regions) else Region("", "", 1.0)
            with FormRow(elem_id=eid(f"region{slot}_row"), elem_classes=["charadapter-region-row"]):
                c[f"region{slot}_reference_phrase"] = gr.Textbox(
                    value=region.reference_phrase, label=f"Region {slot}: phrase in the reference",
                    placeholder="unused" if slot > len(d.regions) else "", lines=1, max_lines=1,
                    elem_id=eid(f"region{slot}_reference_phrase"),
                )
                c[f"region{slot}_phrase"] = gr.Textbox(
                    value="" if region.phrase == region.reference_phrase else region.phrase,
                    label=f"Region {slot}: phrase in the new image", placeholder="same as reference phrase",
                    lines=1, max_lines=1, elem_id=eid(f"region{slot}_phrase"),
                )
                c[f"region{slot}_weight"] = gr.Slider(
                    *RANGES["region_weight"], step=0.05, value=float(region.weight), label=f"Region {slot}: weight",
                    elem_id=eid(f"region{slot}_weight"),
                )
        with gr.Accordion("Advanced", open=False, elem_id=eid("advanced")):
            with FormRow(elem_id=eid("modes_row")):
                # labels == values: ui_loadsave checks saved defaults against radio labels
                c["fusion"] = gr.Radio(list(FUSION_MODES), value=d.fusion, label="Mask fusion", elem_id=eid("fusion"))
                c["crop"] = gr.Radio(list(CROP_STYLES), value=d.crop, label="Reference crops", elem_id=eid("crop"))
            with FormRow(elem_id=eid("mask_row")):
                c["temperature"] = gr.Slider(0.01, 2.0, step=0.01, value=d.temperature, label="Mask temperature",
                                             elem_id=eid("temperature"))
                c["background"] = gr.Slider(*RANGES["background"], step=0.01, value=d.background, label="Background threshold",
                                            elem_id=eid("background"))
            with FormRow(elem_id=eid("segmentation_row")):
                c["timestep"] = gr.Slider(*RANGES["timestep"], step=1, value=d.timestep, label="Segmentation timestep",
                                          elem_id=eid("timestep"))
                c["show_masks"] = gr.Checkbox(value=d.show_masks, label="Show masks", elem_id=eid("show_masks"))
    refresh.click(
        fn=_refresh_handler(refresh_fn, c["model"], c["encoder"]),
        inputs=[], outputs=[c["model"], c["encoder"]], show_progress=False,
    )
    mismatch = set(ARG_NAMES) ^ set(c)
    if mismatch:  # a programming error: Params and the panel drifted apart
        raise CharacterAdapterError(f"UI controls and ARG_NAMES disagree on {sorted(mismatch)}")
    return [c[name] for name in ARG_NAMES]


# ---------------------------------------------------------------- infotext


class PasteKey(str):
    """An infotext field name that is also its paste function.

    `connect_paste` (modules/infotext_utils.py) calls a callable target with the parsed
    infotext; "Send to img2img/txt2img" matches targets against `paste_field_names` with `==`,
    which a lambda never equals. A str subclass serves both.
    """

    def __new__(cls, name: str, fn: Callable[[Mapping[str, Any]], Any]) -> "PasteKey":
        key = super().__new__(cls, name)
        key.fn = fn
        return key

    def __call__(self, params: Mapping[str, Any]) -> Any:
        return self.fn(params)


def _field_name(arg: str) -> str:
    """The paste field name of one arg: "Character-Adapter <arg in words>"."""
    if arg == "enabled":
        return INFOTEXT_PREFIX
    if arg == "image":
        return f"{INFOTEXT_PREFIX} reference image"
    if arg.startswith("region"):
        slot, _, part = arg[len("region"):].partition("_")
        return f"{INFOTEXT_PREFIX} region {slot} {part.replace('_', ' ')}"
    return f"{INFOTEXT_PREFIX} {arg.replace('_', ' ')}"


_last_parse: Optional[Tuple[Mapping[str, Any], Optional[Params]]] = None


def pasted_params(params: Mapping[str, Any]) -> Optional[Params]:
    """Params from a parsed infotext; None when absent or invalid (one warning per paste).

    Every field's callable asks; the result is kept for the same dict object, so one paste
    parses (and warns) once.
    """
    global _last_parse
    memo = _last_parse
    if memo is not None and memo[0] is params:
        return memo[1]
    result = None
    try:
        result = Params.from_infotext(params)
    except CharacterAdapterError as e:
        logger.warning("Character-Adapter: infotext not pasted: %s", e)
    _last_parse = (params, result)
    return result


def _region_value(slot: int, part: str, p: Params) -> Any:
    """One region box's pasted value; slots beyond the pasted regions are cleared."""
    if slot >= len(p.regions):
        return 1.0 if part == "weight" else ""
    region = p.regions[slot]
    if part == "weight":
        return region.weight
    if part == "phrase":
        return "" if region.phrase == region.reference_phrase else region.phrase
    return region.reference_phrase


def _paste_fn(arg: str) -> Callable[[Mapping[str, Any]], Any]:
    """The value `arg`'s component gets from a parsed infotext (None = leave it as it is)."""

    def enabled(d: Mapping[str, Any]) -> Optional[bool]:
        if INFOTEXT_PREFIX not in d:
            return False  # an image made without the adapter: paste it off, as hires fix does
        return None if pasted_params(d) is None else True

    def region(d: Mapping[str, Any]) -> Any:
        p = pasted_params(d) if INFOTEXT_PREFIX in d else None
        slot, _, part = arg[len("region"):].partition("_")
        return None if p is None else _region_value(int(slot) - 1, part, p)

    def scalar(d: Mapping[str, Any]) -> Any:
        if arg in ("image", "show_masks"):  # the infotext holds only a hash / nothing
            return None
        p = pasted_params(d) if INFOTEXT_PREFIX in d else None
        return None if p is None else getattr(p, arg)

    if arg == "enabled":
        return enabled
    return region if arg.startswith("region") else scalar


def infotext_fields(components: Sequence[Any]) -> List[Tuple[Any, PasteKey]]:
    """(component, name-and-callable) pairs for Script.infotext_fields, in ARG_NAMES order."""
    if len(components) != len(ARG_NAMES):
        raise CharacterAdapterError(f"expected {len(ARG_NAMES)} components (ARG_NAMES), got {len(components)}")
    return [(comp, PasteKey(_field_name(arg), _paste_fn(arg))) for comp, arg in zip(components, ARG_NAMES)]


def paste_field_names() -> List[str]:
    """Names for Script.paste_field_names: "Send to …" copies these fields between tabs."""
    return [_field_name(arg) for arg in ARG_NAMES]
