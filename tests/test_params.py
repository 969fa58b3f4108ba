import json
import math

import pytest

from charadapter.params import ARG_NAMES, MAX_REGIONS, ParamError, Params, Region


def api(**kwargs):
    data = {"image": "iVBORw0KGgo="}
    data.update(kwargs)
    return data


def test_defaults_name_three_regions():
    params = Params()
    assert [r.reference_phrase for r in params.regions] == ["face", "upper body", "lower body"]
    assert params.timestep == 650 and params.fusion == "soft" and params.crop == "strip"


def test_positional_round_trip():
    params = Params.from_dict(api(weight=0.5, regions=[
        {"reference_phrase": "face"},
        {"reference_phrase": "red jacket", "phrase": "jacket", "weight": 1.5},
    ]))
    args = params.to_args()
    assert len(args) == len(ARG_NAMES) == 13 + 3 * MAX_REGIONS
    assert Params.from_args(args) == params


def test_empty_slots_are_skipped_and_phrase_defaults_to_reference():
    args = Params().to_args()
    names = list(ARG_NAMES)
    args[names.index("region2_reference_phrase")] = ""
    args[names.index("region3_phrase")] = "  "
    params = Params.from_args(args)
    assert [(r.reference_phrase, r.phrase) for r in params.regions] == [
        ("face", "face"), ("lower body", "lower body")]


def test_no_regions_means_global_adapter():
    params = Params.from_dict(api(regions=[]))
    assert params.regions == ()
    args = params.to_args()
    assert Params.from_args(args).regions == ()


def test_single_dict_arg_is_the_api_form():
    params = Params.from_args([api(fusion="HARD", crop="box", timestep=500)])
    assert params.enabled and params.fusion == "hard" and params.crop == "box"
    assert params.timestep == 500


def test_no_args_is_disabled_default():
    assert Params.from_args([]).enabled is False


def test_infotext_round_trip_through_strings():
    params = Params.from_dict(api(weight=0.7, start=0.1, end=0.9, fusion="hard",
                                  temperature=0.25, background=0.3, timestep=400,
                                  regions=[{"reference_phrase": "face, smiling", "weight": 0.5}]))
    info = {k: str(v) for k, v in params.to_infotext("abc123").items()}
    assert info["Character-Adapter reference"] == "abc123"
    back = Params.from_infotext(info)
    assert back == Params(**{**params.__dict__, "image": None})


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
    ({"image": None}, "image"),
    ({"image": 12}, "image"),
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


def test_wrong_positional_count_is_an_error():
    with pytest.raises(ParamError, match="expected 25 positional values"):
        Params.from_args([True, None, "m"])


def test_image_required_only_when_enabled():
    with pytest.raises(ParamError, match="image"):
        Params.from_dict({"enabled": True})
    assert Params.from_dict({"enabled": False}).enabled is False


def test_regions_json_in_infotext_keeps_commas_and_quotes():
    params = Params(regions=(Region('a "quoted", phrase', "x", 1.0),)).validated()
    encoded = params.to_infotext("h")["Character-Adapter regions"]
    assert json.loads(encoded) == [['a "quoted", phrase', "x", 1.0]]
    assert not math.isnan(params.weight)


def test_auto_encoder_means_the_matching_one():
    assert Params.from_dict(api(encoder="Auto")).encoder == ""
    assert Params.from_dict(api(encoder="clip_h.pth")).encoder == "clip_h.pth"
