"""The panel: ARG_NAMES order, Params defaults, element ids, the refresh button, infotext paste."""
import json
import logging
import os
import re
import sys
import types

import gradio as gr
import pytest
from gradio.blocks import postprocess_update_dict

from charadapter.params import ARG_NAMES, INFOTEXT_PREFIX, Character, Params, Region, arg_names
from charadapter.webui import ui
from charadapter.webui.models import ModelListing

DOUBLE = os.path.join(os.path.dirname(__file__), "webui_double")
HAVE_DOUBLE = os.path.isfile(os.path.join(DOUBLE, "modules", "ui_components.py"))


def _standin_ui_components():
    """Minimal modules.ui_components (v1.10.1 shapes), used only while the WebUI double is missing."""

    class InputAccordion(gr.Checkbox):  # a hidden checkbox (the bool) driving an accordion
        def __init__(self, value, **kwargs):
            self.accordion_id = kwargs.get("elem_id")
            super().__init__(value, **{**kwargs, "elem_id": f"{self.accordion_id}-checkbox", "visible": False})
            self.accordion = gr.Accordion(**{**kwargs, "elem_id": self.accordion_id, "open": value})

        def __enter__(self):
            self.accordion.__enter__()
            return self

        def __exit__(self, *exc):
            self.accordion.__exit__(*exc)

        def get_block_name(self):
            return "checkbox"

    class FormRow(gr.Row):
        def get_block_name(self):
            return "row"

    class ToolButton(gr.Button):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, elem_classes=["tool", *kwargs.pop("elem_classes", [])], **kwargs)

        def get_block_name(self):
            return "button"

    module = types.ModuleType("modules.ui_components")
    module.InputAccordion, module.FormRow, module.ToolButton = InputAccordion, FormRow, ToolButton
    return module


@pytest.fixture(autouse=True)
def webui_modules(monkeypatch):
    """The WebUI double's `modules` when present, else a stand-in for modules.ui_components."""
    if HAVE_DOUBLE:
        monkeypatch.syspath_prepend(DOUBLE)
        import modules.ui_components  # noqa: F401
    else:
        package = types.ModuleType("modules")
        package.__path__ = []
        package.ui_components = _standin_ui_components()
        monkeypatch.setitem(sys.modules, "modules", package)
        monkeypatch.setitem(sys.modules, "modules.ui_components", package.ui_components)


LISTING = ModelListing(
    adapters={"ip-adapter_sd15.safetensors": "/m/ip-adapter_sd15.safetensors", "ip-adapter-plus_sd15.safetensors": "/m/p.safetensors"},
    encoders={"clip_h.pth": "/cn/clip_h.pth", "sdxl_models - image_encoder": "/m/sdxl_models/image_encoder"},
)


def build(*tabs, listing=LISTING, refresh_fn=None):
    """Build one panel per tab inside one Blocks, as the WebUI does for txt2img and img2img."""
    calls = {"listing": 0, "refresh": 0}

    def listing_fn():
        calls["listing"] += 1
        return listing

    def refresh():
        calls["refresh"] += 1
        return refresh_fn() if refresh_fn else listing

    with gr.Blocks() as demo:
        panels = [ui.build_ui(tab == "img2img", listing_fn, refresh_fn=refresh) for tab in tabs or ("txt2img",)]
    return demo, panels, calls


def by_name(components):
    return dict(zip(ARG_NAMES, components))


# ---------------------------------------------------------------- structure and defaults


def test_components_follow_arg_names_and_default_to_params():
    demo, (comps,), calls = build("txt2img")
    assert len(comps) == len(ARG_NAMES)
    c = by_name(comps)
    assert type(c["enabled"]).__name__ == "InputAccordion" and c["enabled"].value is False
    assert isinstance(c["image"], gr.Image) and c["image"].type == "pil" and c["image"].value is None
    assert c["image"].source == "upload" and c["image"].image_mode == "RGBA"
    assert isinstance(c["model"], gr.Dropdown) and isinstance(c["encoder"], gr.Dropdown)
    for slot in (1, 2, 3, 4):
        assert isinstance(c[f"region{slot}_reference_phrase"], gr.Textbox)
        assert c[f"region{slot}_phrase"].placeholder == "same as reference phrase"
        assert (c[f"region{slot}_weight"].minimum, c[f"region{slot}_weight"].maximum) == (0.0, 2.0)
    assert c["region4_reference_phrase"].value == ""
    assert (c["timestep"].minimum, c["timestep"].maximum, c["timestep"].value) == (1, 999, 650)
    assert (c["weight"].minimum, c["weight"].maximum) == (0.0, 2.0)
    def radio_values(radio):  # gradio 3.41 keeps radio choices as (label, value) pairs
        return [x[1] if isinstance(x, tuple) else x for x in radio.choices]

    assert radio_values(c["fusion"]) == ["soft", "hard"] and radio_values(c["crop"]) == ["strip", "box"]
    values = [comp.value for comp in comps]  # what the API takes as defaults
    assert Params.from_args(values) == Params(enabled=False)
    assert calls == {"listing": 1, "refresh": 0}  # no rescans while building


def test_img2img_panel_has_the_same_defaults():
    _, (comps,), _ = build("img2img")
    assert Params.from_args([c.value for c in comps]) == Params()


def test_elem_ids_unique_and_prefixed_across_both_tabs():
    demo, (t2i, i2i), _ = build("txt2img", "img2img")
    for tab, comps in (("txt2img", t2i), ("img2img", i2i)):
        for comp in comps:
            assert comp.elem_id.startswith(f"charadapter_{tab}_"), comp.elem_id
    ids = [b.elem_id for b in demo.blocks.values() if getattr(b, "elem_id", None)]
    assert len(ids) == len(set(ids))
    ours = [i for i in ids if i.startswith("charadapter_")]
    assert len(ours) == len(ids)  # nothing unprefixed, no gradio defaults left over
    assert "charadapter_txt2img_accordion" in ids and "charadapter_img2img_refresh" in ids
    rows = [b for b in demo.blocks.values() if "charadapter-region-row" in (getattr(b, "elem_classes", None) or [])]
    assert len(rows) == 2 * 3 * 4  # two WebUI tabs, three character tabs, four region rows each


def test_encoder_dropdown_shows_auto_for_empty():
    _, (comps,), _ = build()
    enc = by_name(comps)["encoder"]
    assert enc.choices == ["Auto", "clip_h.pth", "sdxl_models - image_encoder"]
    assert enc.value == "" and enc.get_config()["value"] == "Auto" and enc.get_block_name() == "dropdown"
    assert enc.preprocess("Auto") == "" and enc.preprocess("clip_h.pth") == "clip_h.pth"
    assert postprocess_update_dict(enc, gr.update(value=""))["value"] == "Auto"
    assert postprocess_update_dict(enc, gr.update(value="clip_h.pth"))["value"] == "clip_h.pth"
    model = by_name(comps)["model"]
    assert model.choices == list(LISTING.adapters) and model.value == ""


def test_refresh_button_rescans_and_updates_both_dropdowns():
    later = ModelListing(adapters={"new.safetensors": "/n.safetensors"}, encoders={"clip_g.pth": "/g.pth"})
    demo, (comps,), calls = build(refresh_fn=lambda: later)
    c = by_name(comps)
    button = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "charadapter_txt2img_refresh")
    assert button.value == "\U0001f504" and "tool" in button.elem_classes
    index, dep = next((i, d) for i, d in enumerate(demo.dependencies) if button._id in d["targets"])
    assert dep["trigger"] == "click" and dep["inputs"] == []
    pairs = [(c[f"{prefix}model"], c[f"{prefix}encoder"]) for prefix in ("", "character2_", "character3_")]
    assert dep["outputs"] == [d._id for pair in pairs for d in pair]  # every tab's lists
    updates = demo.fns[index].fn()
    assert calls["refresh"] == 1 and len(updates) == 6
    for model_update, encoder_update in zip(updates[::2], updates[1::2]):
        assert model_update["choices"] == ["new.safetensors"] and "value" not in model_update
        assert encoder_update["choices"] == ["Auto", "clip_g.pth"]
    for model, encoder in pairs:
        assert model.choices == ["new.safetensors"] and encoder.choices == ["Auto", "clip_g.pth"]


# ---------------------------------------------------------------- infotext


def _infotext(extra):
    """A generation-parameters text as modules/processing.py create_infotext writes it."""
    def quote(v):  # mirrors modules/infotext_utils.py (quote)
        v = str(v)
        return json.dumps(v, ensure_ascii=False) if ("," in v or ":" in v or "\n" in v) else v

    fields = {"Steps": 20, "Sampler": "Euler a", "CFG scale": 7, "Seed": 1, "Size": "512x512", **extra}
    return "a girl in a red hat\nNegative prompt: blurry\n" + ", ".join(f"{k}: {quote(v)}" for k, v in fields.items())


def _paste(fields, text):
    """Values connect_paste would set (None = left alone): the double's helper, else a mirror of it."""
    if HAVE_DOUBLE and os.path.isfile(os.path.join(DOUBLE, "modules", "infotext_utils.py")):
        from modules import infotext_utils

        return infotext_utils.paste_values(fields, text)
    params = {}  # mirrors modules/infotext_utils.py (re_param, parse_generation_parameters) for the last line
    for key, value in re.findall(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)', text.strip().split("\n")[-1]):
        params[key] = json.loads(value) if value[:1] == '"' and value[-1:] == '"' else value
    out = []
    for comp, key in fields:  # mirrors modules/infotext_utils.py (connect_paste.paste_func)
        v = key(params) if callable(key) else params.get(key)
        if v is None:
            out.append(None)
            continue
        valtype = type(comp.value)
        out.append(False if valtype == bool and v == "False" else float(v) if valtype == int else valtype(v))
    return out


def _after_paste(comps, values):
    """The components' values after a paste: None leaves one as it is, gr.update(value=...) sets it."""
    def value(comp, v):
        if isinstance(v, dict):  # gradio 3.41's gr.update(...)
            return v["value"] if "value" in v else comp.value
        return comp.value if v is None else v

    return [value(comp, v) for comp, v in zip(comps, values)]


def test_infotext_round_trip():
    _, (comps,), _ = build()
    fields = ui.infotext_fields(comps)
    original = Params.single(
        enabled=True, model="ip-adapter-plus_sd15.safetensors", encoder="", weight=1.15, start=0.1, end=0.85,
        fusion="hard", temperature=0.35, background=0.25, timestep=500, crop="box",
        regions=(Region("hat", "red hat", 1.2), Region("face", "face", 0.9), Region("jeans, torn", "jeans", 0.5)),
    ).validated()
    text = _infotext(original.to_infotext("0123456789"))
    values = _paste(fields, text)
    c = dict(zip(ARG_NAMES, values))
    assert c["enabled"] is True and c["image"] is None and c["show_masks"] is None
    assert c["region2_phrase"] == ""  # same as the reference phrase: the placeholder says so
    assert c["region4_reference_phrase"] == "" and c["region4_weight"] == 1.0  # unused slot cleared
    assert Params.from_args(_after_paste(comps, values)) == original


def test_infotext_with_named_encoder_and_one_region():
    _, (comps,), _ = build("img2img")
    original = Params.single(enabled=True, model="m.safetensors", encoder="clip_h.pth", regions=(Region("face", "her face", 1.0),)).validated()
    values = _paste(ui.infotext_fields(comps), _infotext(original.to_infotext("abc")))
    assert Params.from_args(_after_paste(comps, values)) == original


def test_infotext_without_the_adapter_switches_it_off_and_leaves_the_rest():
    _, (comps,), _ = build()
    values = _paste(ui.infotext_fields(comps), _infotext({}))
    assert values[0] is False
    assert values[1:] == [None] * (len(ARG_NAMES) - 1)


def test_invalid_infotext_changes_nothing_and_warns_once(caplog):
    _, (comps,), _ = build()
    bad = Params(enabled=True).to_infotext("abc")
    bad[f"{INFOTEXT_PREFIX} fusion"] = "sideways"
    with caplog.at_level(logging.WARNING, logger="charadapter.webui.ui"):
        values = _paste(ui.infotext_fields(comps), _infotext(bad))
    assert values == [None] * len(ARG_NAMES)
    warnings = [r for r in caplog.records if "infotext not pasted" in r.getMessage()]
    assert len(warnings) == 1 and "fusion" in warnings[0].getMessage()


def test_paste_field_names_match_the_field_keys():
    _, (t2i, i2i), _ = build("txt2img", "img2img")
    names = ui.paste_field_names()
    assert len(names) == len(set(names)) == len(ARG_NAMES)
    assert all(n.startswith(INFOTEXT_PREFIX) for n in names)
    for comps in (t2i, i2i):
        fields = ui.infotext_fields(comps)
        assert [str(key) for _, key in fields] == names and all(callable(key) for _, key in fields)
        # "Send to img2img" picks fields by name (modules/infotext_utils.py paste_fields_with_names)
        assert [comp for comp, key in fields if key in names] == list(comps)
    with pytest.raises(ValueError):
        ui.infotext_fields(t2i[:-1])


def test_paste_keys_work_as_webui_paste_fields():
    if not (HAVE_DOUBLE and os.path.isfile(os.path.join(DOUBLE, "modules", "infotext_utils.py"))):
        pytest.skip("WebUI test double absent")
    from modules.infotext_utils import PasteField

    _, (comps,), _ = build()
    for comp, key in ui.infotext_fields(comps):
        field = PasteField(comp, key)  # modules/infotext_utils.py add_paste_fields wraps every pair
        assert field.function is key and field.label == str(key) and field.component is comp


# ---------------------------------------------------------------- character tabs


def test_one_tab_is_the_single_character_panel_and_more_tabs_are_named():
    with gr.Blocks() as demo:
        one = ui.build_ui(False, lambda: LISTING, refresh_fn=lambda: LISTING, units=1)
    assert len(one) == 26 and not [b for b in demo.blocks.values() if isinstance(b, gr.Tabs)]
    assert Params.from_args([c.value for c in one]) == Params()
    with gr.Blocks() as demo:
        four = ui.build_ui(False, lambda: LISTING, refresh_fn=lambda: LISTING, units=4)
    assert len(four) == 26 + 3 * 19 and ui.units_of(four) == 4
    tabs = [b for b in demo.blocks.values() if isinstance(b, gr.Tab)]
    assert [t.label for t in tabs] == [f"Character {k}" for k in range(1, 5)]
    assert Params.from_args([c.value for c in four]) == Params()
    c = dict(zip(arg_names(4), four))
    assert c["character4_image"].elem_id == "charadapter_txt2img_character4_image"
    assert c["subject"].elem_id == "charadapter_txt2img_subject" and c["image"].elem_id == "charadapter_txt2img_image"
    fields = ui.infotext_fields(four)
    assert str(fields[-1][1]) == "Character-Adapter 4 region 4 weight" and str(fields[25][1]) == "Character-Adapter subject"


def test_infotext_of_two_characters_pastes_into_their_tabs():
    _, (comps,), _ = build()
    original = Params(enabled=True, characters=(
        Character(model="m.safetensors", subject="girl", regions=(Region("face", "her face", 1.0),)),
        Character(model="p.safetensors", encoder="clip_h.pth", weight=1.3, start=0.2, subject="knight",
                  regions=(Region("helmet", "helmet", 0.5), Region("armour", "steel armour", 1.0)), unit=3),
    )).validated()
    values = _paste(ui.infotext_fields(comps), _infotext(original.to_infotext(["h1", "h3"])))
    c = dict(zip(ARG_NAMES, values))
    assert c["subject"] == "girl" and c["region1_phrase"] == "her face" and c["region2_reference_phrase"] == ""
    assert c["character3_subject"] == "knight" and c["character3_weight"] == 1.3 and c["character3_start"] == 0.2
    assert c["character3_region2_phrase"] == "steel armour" and c["character3_encoder"] == "clip_h.pth"
    assert c["character2_subject"] is None and c["character2_weight"] is None  # tab 2 left alone ...
    assert isinstance(c["character2_image"], dict) and c["character2_image"]["value"] is None  # ... but switched off
    # with references dropped in tabs 1 and 3, the pasted panel is the original again
    after = _after_paste(comps, values)
    from PIL import Image

    after[ARG_NAMES.index("image")] = after[ARG_NAMES.index("character3_image")] = Image.new("RGB", (40, 40))
    pasted = Params.from_args(after)
    assert [(c.unit, c.subject, c.weight, c.regions) for c in pasted.characters] == [
        (c.unit, c.subject, c.weight, c.regions) for c in original.characters]
