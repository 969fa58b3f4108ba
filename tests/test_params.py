import base64
import io
import json
import math

import pytest
from dataclasses import replace
from PIL import Image

from charadapter.params import ARG_NAMES, ARG_NAMES_ONE, MAX_REGIONS, UI_DEFAULT_ARGS, ParamError, Params, Region


def png(size=(8, 6), colour=(200, 30, 30)):
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


PNG = png()


def api(**kwargs):
    data = {"image": PNG, "model": "ip-adapter_sd15.safetensors"}
    data.update(kwargs)
    return data


def test_defaults_name_three_regions():
    params = Params()
    assert [r.reference_phrase for r in params.first.regions] == ["face", "upper body", "lower body"]
    assert params.timestep == 650 and params.fusion == "soft" and params.crop == "strip"


def test_positional_round_trip():
    params = Params.from_dict(api(weight=0.5, regions=[
        {"reference_phrase": "face"},
        {"reference_phrase": "red jacket", "phrase": "jacket", "weight": 1.5},
    ]))
    args = params.to_args()
    assert len(args) == len(ARG_NAMES) == 13 + 3 * MAX_REGIONS + 1 + 2 * (7 + 3 * MAX_REGIONS)  # three tabs
    assert len(ARG_NAMES_ONE) == 25  # what a single-character panel sent: still its start
    assert Params.from_args(args[:25]) == params
    assert Params.from_args(args) == params


def test_empty_slots_are_skipped_and_phrase_defaults_to_reference():
    args = Params().to_args()
    names = list(ARG_NAMES)
    args[names.index("region2_reference_phrase")] = ""
    args[names.index("region3_phrase")] = "  "
    params = Params.from_args(args)
    assert [(r.reference_phrase, r.phrase) for r in params.first.regions] == [
        ("face", "face"), ("lower body", "lower body")]


def test_no_regions_means_global_adapter():
    params = Params.from_dict(api(regions=[]))
    assert params.first.regions == ()
    args = params.to_args()
    assert Params.from_args(args).first.regions == ()


def test_single_dict_arg_is_the_api_form():
    params = Params.from_args([api(fusion="HARD", crop="box", timestep=500)])
    assert params.enabled and params.fusion == "hard" and params.crop == "box"
    assert params.timestep == 500


def test_dict_in_the_first_slot_ignores_the_ui_defaults_after_it():
    """The WebUI API fills every slot with the UI defaults, then puts args[i] at args_from + i."""
    args = [api(weight=0.3, regions=[])] + list(UI_DEFAULT_ARGS[1:])
    params = Params.from_args(args)
    assert params.first.weight == 0.3 and params.first.regions == ()
    assert params.first.image.size == (8, 6) and params.first.image.mode == "RGB"


def test_short_positional_list_keeps_the_ui_defaults():
    params = Params.from_args([True, PNG, "ip-adapter_sd15.safetensors", "", 0.5])
    assert params.enabled and params.first.model == "ip-adapter_sd15.safetensors" and params.first.weight == 0.5
    assert params.first.regions == Params().first.regions and params.timestep == Params().timestep
    assert len(UI_DEFAULT_ARGS) == len(ARG_NAMES)


def test_base64_with_and_without_data_url_prefix_decode_alike():
    plain = Params.from_dict(api(image=PNG)).first.image
    url = Params.from_dict(api(image="data:image/png;base64," + PNG)).first.image
    wrapped = Params.from_dict(api(image="\n".join(PNG[i:i + 20] for i in range(0, len(PNG), 20)))).first.image
    assert plain.tobytes() == url.tobytes() == wrapped.tobytes()
    assert plain.getpixel((0, 0)) == (200, 30, 30)


def test_image_is_decoded_only_when_enabled():
    assert Params.from_dict({"enabled": False, "image": "not an image"}).first.image == "not an image"


def test_overrides_replace_settings_and_region_weights_in_order():
    params = Params.from_dict(api())
    cell = params.with_overrides({"weight": 0.0, "fusion": "hard", "region_weights": (0.5, 1.0, 0.0)})
    assert cell.first.weight == 0.0 and cell.fusion == "hard"
    assert [r.weight for r in cell.first.regions] == [0.5, 1.0, 0.0]
    assert [r.reference_phrase for r in cell.first.regions] == [r.reference_phrase for r in params.first.regions]
    assert params.with_overrides({}) is params


@pytest.mark.parametrize("overrides,field", [
    ({"weight": 3.0}, "weight"),
    ({"start": 1.0}, "start"),
    ({"timestep": 0}, "timestep"),
    ({"region_weights": (1.0,)}, "region weights"),
    ({"region_weights": (1.0, 1.0, -1.0)}, "regions[2].weight"),
    ({"crop": "box"}, "crop"),
])
def test_bad_overrides_name_their_field(overrides, field):
    with pytest.raises(ParamError) as info:
        Params.from_dict(api()).with_overrides(overrides)
    assert info.value.field == field


def test_no_args_is_disabled_default():
    assert Params.from_args([]).enabled is False


def test_infotext_round_trip_through_strings():
    params = Params.from_dict(api(weight=0.7, start=0.1, end=0.9, fusion="hard",
                                  temperature=0.25, background=0.3, timestep=400,
                                  regions=[{"reference_phrase": "face, smiling", "weight": 0.5}]))
    info = {k: str(v) for k, v in params.to_infotext("abc123").items()}
    assert info["Character-Adapter reference"] == "abc123"
    back = Params.from_infotext(info)
    assert back == Params(**{**params.__dict__, "characters": (replace(params.first, image=None),)})


def test_infotext_without_our_keys_is_none():
    assert Params.from_infotext({"Steps": "20"}) is None


MALFORMED = [
    ({"nonsense": 1}, "nonsense"),
    ({"weight": "0.5"}, "weight"),
    ({"weight": float("nan")}, "weight"),
    ({"weight": float("inf")}, "weight"),
    ({"weight": -0.1}, "weight"),
    ({"weight": 3}, "weight"),
    ({"weight": True}, "weight"),
    ({"start": 0.8, "end": 0.2}, "start"),
    ({"start": 0.5, "end": 0.5}, "start"),
    ({"end": 1.5}, "end"),
    ({"timestep": 0}, "timestep"),
    ({"timestep": 1000}, "timestep"),
    ({"timestep": 650.5}, "timestep"),
    ({"fusion": "medium"}, "fusion"),
    ({"fusion": 1}, "fusion"),
    ({"crop": "centre"}, "crop"),
    ({"temperature": 0}, "temperature"),
    ({"background": 1.5}, "background"),
    ({"enabled": "yes"}, "enabled"),
    ({"show_masks": 1}, "show_masks"),
    ({"model": "../x"}, "model"),
    ({"model": "/etc/passwd"}, "model"),
    ({"encoder": "..\\clip"}, "encoder"),
    ({"model": 5}, "model"),
    ({"model": ""}, "model"),
    ({"image": None}, "image"),
    ({"image": 12}, "image"),
    ({"image": ""}, "image"),
    ({"image": "   "}, "image"),
    ({"image": "!!!"}, "image"),
    ({"image": "aGVsbG8="}, "image"),
    ({"image": "data:image/png;base64,"}, "image"),
    ({"image": "data:image/png," + PNG}, "image"),
    ({"image": "README.md"}, "image"),
    ({"image": "http://localhost/a.png"}, "image"),
    ({"image": PNG[: len(PNG) // 2]}, "image"),
    ({"regions": [{"reference_phrase": "face", "weight": "1"}]}, "regions[0].weight"),
    ({"regions": "face"}, "regions"),
    ({"regions": [{"reference_phrase": ""}]}, "regions[0].reference_phrase"),
    ({"regions": [{"phrase": "face"}]}, "regions[0].reference_phrase"),
    ({"regions": [{"reference_phrase": "face", "colour": "red"}]}, "regions[0].colour"),
    ({"regions": [{"reference_phrase": "face", "weight": -1}]}, "regions[0].weight"),
    ({"regions": [{"reference_phrase": "x" * 201}]}, "regions[0].reference_phrase"),
    ({"regions": [{"reference_phrase": "face"}, {"reference_phrase": "Face"}]},
     "regions[1].reference_phrase"),
    ({"regions": [{"reference_phrase": f"r{i}"} for i in range(5)]}, "regions"),
    ({"regions": [7]}, "regions[0]"),
]


@pytest.mark.parametrize("override,field", MALFORMED)
def test_malformed_api_input_names_its_field(override, field):
    with pytest.raises(ParamError) as info:
        Params.from_dict(api(**override))
    assert info.value.field == field
    assert field in str(info.value)


def test_too_many_positional_values_is_an_error():
    with pytest.raises(ParamError, match="expected at most 159 positional values"):
        Params.from_args(Params().to_args(8) + [1])


def test_image_required_only_when_enabled():
    with pytest.raises(ParamError, match="image"):
        Params.from_dict({"enabled": True})
    assert Params.from_dict({"enabled": False}).enabled is False


def test_regions_json_in_infotext_keeps_commas_and_quotes():
    params = Params.single(regions=(Region('a "quoted", phrase', "x", 1.0),)).validated()
    encoded = params.to_infotext("h")["Character-Adapter regions"]
    assert json.loads(encoded) == [['a "quoted", phrase', "x", 1.0]]
    assert not math.isnan(params.first.weight)


def test_auto_encoder_means_the_matching_one():
    assert Params.from_dict(api(encoder="Auto")).first.encoder == ""
    assert Params.from_dict(api(encoder="clip_h.pth")).first.encoder == "clip_h.pth"
