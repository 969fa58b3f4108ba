"""The Character-Adapter panel (gradio 3.41.2) and its infotext paste wiring.

`build_ui` returns the components in `charadapter.params.arg_names(units)` order (the first
character's and the shared settings' 25 values as a single-character panel had them, then the
first character's subject, then each further character tab's values), whose values are the
script's positional args. Every default is taken from `Params()`, so the values `ui()` returns
(which the API also uses as its defaults) parse back to `Params()`. `build_ui` has no side
effects beyond building components: it reads the cached model listing and registers nothing
outside the gradio Blocks it is called in.
"""

import logging
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import gradio as gr

from ..errors import CharacterAdapterError
from ..params import (
    CROP_STYLES, DEFAULT_UNITS, FUSION_MODES, INFOTEXT_PREFIX, MAX_CHARACTERS, MAX_REGIONS, RANGES, UNIT_ARGS,
    Character, Params, Region, arg_names,
)

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


def _refresh_handler(refresh_fn: Callable[[], Any], dropdowns: Sequence[gr.Dropdown]) -> Callable[[], Tuple[dict, ...]]:
    """Click handler: rescan, then give every (model, encoder) dropdown pair the new choices (values are kept)."""

    def refresh() -> Tuple[dict, ...]:
        listing = refresh_fn()
        adapters, encoders = adapter_choices(listing), encoder_choices(listing)
        updates = []
        for index, dropdown in enumerate(dropdowns):
            choices = adapters if index % 2 == 0 else encoders
            dropdown.choices = choices  # pages loaded later see them too
            updates.append(gr.update(choices=choices))
        return tuple(updates)

    return refresh


def build_ui(is_img2img: bool, listing_fn: Callable[[], Any],
             refresh_fn: Optional[Callable[[], Any]] = None, units: int = DEFAULT_UNITS) -> List[Any]:
    """Build the panel inside the current gr.Blocks; return its inputs in `arg_names(units)` order.

    `units` character tabs (one: no tabs, the single-character panel); `listing_fn()` gives the
    cached ModelListing (read, never rescanned here); `refresh_fn()` rescans and returns the new
    listing when 🔄 is clicked (default: models.refresh).
    """
    from modules.ui_components import FormRow, InputAccordion, ToolButton  # the host's helpers

    if refresh_fn is None:
        from . import models

        refresh_fn = models.refresh
    units = min(max(int(units), 1), MAX_CHARACTERS)
    tab = tab_name(is_img2img)

    def eid(name: str) -> str:
        return elem_id(tab, name)

    d = Params()
    listing = listing_fn()
    c: Dict[str, Any] = {}
    refreshes = []
    dropdowns: List[Any] = []

    def unit_controls(unit: int) -> None:
        """One character's controls; names and element ids of unit 1 are the single panel's."""
        prefix = "" if unit == 1 else f"character{unit}_"
        character = d.first

        def uid(name: str) -> str:
            return eid(prefix + name)

        with gr.Row(elem_id=uid("top_row")):
            with gr.Column(scale=1, min_width=200):
                c[prefix + "image"] = gr.Image(
                    value=None, type="pil", source="upload", image_mode="RGBA", label="Reference image",
                    height=REFERENCE_HEIGHT, elem_id=uid("image"), elem_classes=["charadapter-reference"],
                )
            with gr.Column(scale=2):
                with FormRow(elem_id=uid("model_row")):
                    c[prefix + "model"] = gr.Dropdown(
                        label="IP-Adapter", choices=adapter_choices(listing), value=character.model,
                        elem_id=uid("model"),
                    )
                    c[prefix + "encoder"] = AutoDropdown(
                        label="Image encoder", choices=encoder_choices(listing), value=character.encoder,
                        elem_id=uid("encoder"),
                    )
                    refreshes.append(ToolButton(value=REFRESH_SYMBOL, elem_id=uid("refresh")))
                    dropdowns.extend([c[prefix + "model"], c[prefix + "encoder"]])
                c[prefix + "weight"] = gr.Slider(*RANGES["weight"], step=0.05, value=character.weight,
                                                 label="Weight", elem_id=uid("weight"))
                with FormRow(elem_id=uid("window_row")):
                    c[prefix + "start"] = gr.Slider(*RANGES["start"], step=0.01, value=character.start,
                                                    label="Start at step fraction", elem_id=uid("start"))
                    c[prefix + "end"] = gr.Slider(*RANGES["end"], step=0.01, value=character.end,
                                                  label="End at step fraction", elem_id=uid("end"))
                c[prefix + "subject"] = gr.Textbox(
                    value=character.subject, label="Subject: the words of the prompt that name this character",
                    placeholder="needed with two or more characters, e.g. girl, old knight", lines=1, max_lines=1,
                    elem_id=uid("subject"),
                )
        for slot in range(1, MAX_REGIONS + 1):
            region = character.regions[slot - 1] if slot <= len(character.regions) else Region("", "", 1.0)
            with FormRow(elem_id=uid(f"region{slot}_row"), elem_classes=["charadapter-region-row"]):
                c[f"{prefix}region{slot}_reference_phrase"] = gr.Textbox(
                    value=region.reference_phrase, label=f"Region {slot}: phrase in the reference",
                    placeholder="unused" if slot > len(character.regions) else "", lines=1, max_lines=1,
                    elem_id=uid(f"region{slot}_reference_phrase"),
                )
                c[f"{prefix}region{slot}_phrase"] = gr.Textbox(
                    value="" if region.phrase == region.reference_phrase else region.phrase,
                    label=f"Region {slot}: phrase in the new image", placeholder="same as reference phrase",
                    lines=1, max_lines=1, elem_id=uid(f"region{slot}_phrase"),
                )
                c[f"{prefix}region{slot}_weight"] = gr.Slider(
                    *RANGES["region_weight"], step=0.05, value=float(region.weight), label=f"Region {slot}: weight",
                    elem_id=uid(f"region{slot}_weight"),
                )

    with InputAccordion(d.enabled, label="Character-Adapter", elem_id=eid("accordion")) as enabled:
        c["enabled"] = enabled
        if units == 1:
            unit_controls(1)
        else:
            with gr.Tabs(elem_id=eid("units")):
                for unit in range(1, units + 1):
                    with gr.Tab(f"Character {unit}", elem_id=eid(f"unit{unit}")):
                        unit_controls(unit)
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
    for button in refreshes:  # each tab's 🔄 rescans once and updates every tab's lists
        button.click(fn=_refresh_handler(refresh_fn, dropdowns), inputs=[], outputs=dropdowns, show_progress=False)
    names = arg_names(units)
    mismatch = set(names) ^ set(c)
    if mismatch:  # a programming error: Params and the panel drifted apart
        raise CharacterAdapterError(f"UI controls and arg_names disagree on {sorted(mismatch)}")
    return [c[name] for name in names]


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


def _split_arg(arg: str) -> Tuple[Optional[int], str]:
    """(unit, field) of a character's arg ("character2_weight" -> (2, "weight")); (None, arg) for shared ones."""
    if arg.startswith("character") and "_" in arg:
        unit, _, part = arg[len("character"):].partition("_")
        if unit.isdigit():
            return int(unit), part
    if arg in SHARED_ARGS:
        return None, arg
    return 1, arg


SHARED_ARGS = ("enabled", "fusion", "temperature", "background", "timestep", "crop", "show_masks")


def _field_name(arg: str) -> str:
    """The paste field name of one arg: "Character-Adapter <arg in words>", and for the character
    tabs after the first "Character-Adapter <tab> <field in words>"."""
    if arg == "enabled":
        return INFOTEXT_PREFIX
    unit, part = _split_arg(arg)
    base = INFOTEXT_PREFIX if unit in (None, 1) else f"{INFOTEXT_PREFIX} {unit}"
    if part == "image":
        return f"{base} reference image"
    if part.startswith("region"):
        slot, _, rest = part[len("region"):].partition("_")
        return f"{base} region {slot} {rest.replace('_', ' ')}"
    return f"{base} {part.replace('_', ' ')}"


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


def _region_value(slot: int, part: str, character: Character) -> Any:
    """One region box's pasted value; slots beyond the pasted regions are cleared."""
    if slot >= len(character.regions):
        return 1.0 if part == "weight" else ""
    region = character.regions[slot]
    if part == "weight":
        return region.weight
    if part == "phrase":
        return "" if region.phrase == region.reference_phrase else region.phrase
    return region.reference_phrase


def _paste_fn(arg: str) -> Callable[[Mapping[str, Any]], Any]:
    """The value `arg`'s component gets from a parsed infotext (None = leave it as it is)."""
    unit, part = _split_arg(arg)

    def enabled(d: Mapping[str, Any]) -> Optional[bool]:
        if INFOTEXT_PREFIX not in d:
            return False  # an image made without the adapter: paste it off, as hires fix does
        return None if pasted_params(d) is None else True

    def character_field(d: Mapping[str, Any]) -> Any:
        p = pasted_params(d) if INFOTEXT_PREFIX in d else None
        if p is None:
            return None
        character = next((c for c in p.characters if c.unit == unit), None)
        if character is None:  # this tab was off in that generation: clear its image to switch it off
            return gr.update(value=None) if part == "image" else None
        if part == "image":  # the infotext holds only a hash
            return None
        if part.startswith("region"):
            slot, _, rest = part[len("region"):].partition("_")
            return _region_value(int(slot) - 1, rest, character)
        return getattr(character, part)

    def shared(d: Mapping[str, Any]) -> Any:
        if arg == "show_masks":  # not in the infotext
            return None
        p = pasted_params(d) if INFOTEXT_PREFIX in d else None
        return None if p is None else getattr(p, arg)

    if arg == "enabled":
        return enabled
    return shared if unit is None else character_field


def units_of(components: Sequence[Any]) -> int:
    """Character tabs of a panel with these components (arg_names(units) long)."""
    count = len(components)
    units = 1 + max(0, count - len(arg_names(1))) // UNIT_ARGS
    if count != len(arg_names(units)):
        raise CharacterAdapterError(f"{count} components do not make a panel of whole character tabs "
                                    f"({len(arg_names(1))} + {UNIT_ARGS} per tab after the first)")
    return units


def infotext_fields(components: Sequence[Any]) -> List[Tuple[Any, PasteKey]]:
    """(component, name-and-callable) pairs for Script.infotext_fields, in arg_names order."""
    names = arg_names(units_of(components))
    return [(comp, PasteKey(_field_name(arg), _paste_fn(arg))) for comp, arg in zip(components, names)]


def paste_field_names(units: int = DEFAULT_UNITS) -> List[str]:
    """Names for Script.paste_field_names: "Send to …" copies these fields between tabs."""
    return [_field_name(arg) for arg in arg_names(units)]
