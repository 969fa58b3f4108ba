"""The HTTP API in the WebUI double: /sdapi/v1/txt2img|img2img with alwayson_scripts, and our model route.

The double's modules/api mirrors v1.10.1's Api.init_script_args: the request's args are copied over
the UI defaults from args_from on, so the script always receives all 64 values (three character tabs).
"""

import base64
import io
import json
import os

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from webui_host import ROOT, errors, generate, ours, pixels, reference_image, tiny_clip  # sets sys.path
from webui_api_host import ADAPTER_NAME, ENCODER_NAME, api_only_app, b64_png, install_listed_models
from charadapter.webui import caches as ca_caches
from charadapter.webui import reference_pass as ca_reference_pass
from charadapter.webui import settings as ca_settings
from charadapter.params import ARG_NAMES, Params
from charadapter.webui import api as ca_api, models, script as script_module
from modules import script_callbacks, scripts

SIZE = dict(steps=2, width=64, height=64, sampler_name="Euler", seed=7, negative_prompt="")
PROMPT = "a face, upper body, lower body, standing"


@pytest.fixture
def client(host, monkeypatch):
    runner, script = host
    install_listed_models(script, monkeypatch)
    app, api = api_only_app()
    with TestClient(app, raise_server_exceptions=False) as test_client:
        test_client.api = api
        yield test_client


def txt2img(client, args, **extra):
    payload = dict(prompt=PROMPT, **SIZE, alwayson_scripts={"Character-Adapter": {"args": args}})
    payload.update(extra)
    return client.post("/sdapi/v1/txt2img", json=payload)


def decoded(response, index=0):
    data = response.json()["images"][index]
    image = Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")
    return torch.from_numpy(np.asarray(image, dtype=np.float32))


def spy_args(monkeypatch):
    """Record the args tuple each from_args call gets (what the script receives)."""
    seen = []
    original = Params.from_args.__func__

    def from_args(cls, args):
        seen.append(tuple(args))
        return original(cls, args)

    monkeypatch.setattr(Params, "from_args", classmethod(from_args))
    return seen


# ---------------------------------------------------------------- accepted forms


def test_dict_arrives_first_among_ui_defaults_and_equals_the_ui_form(client, host, monkeypatch, sd_model):
    runner, script = host
    seen = spy_args(monkeypatch)
    response = txt2img(client, [{"image": b64_png(reference_image()), "model": ADAPTER_NAME}])
    assert response.status_code == 200, response.text
    args = seen[0]
    assert len(args) == len(ARG_NAMES) == 64
    ui_defaults = client.api.default_script_arg_txt2img[script.args_from:script.args_to]
    assert isinstance(args[0], dict) and list(args[1:]) == ui_defaults[1:]
    info = json.loads(response.json()["info"])
    assert info["extra_generation_params"]["Character-Adapter model"] == ADAPTER_NAME
    assert "Character-Adapter weight: 0.8" in info["infotexts"][0]
    # the same settings from the panel (the runtime's other cache key holds equal tiny weights)
    monkeypatch.setattr(script.hooks.controller, "resolve_model",
                        lambda kind, name: {"adapter": "tiny-adapter", "encoder": "tiny-encoder"}[kind])
    ca_caches.ENCODER_CACHE.put("tiny-encoder", tiny_clip())
    _, panel = generate(script, runner, **{k: v for k, v in SIZE.items() if k != "negative_prompt"})
    assert torch.equal(decoded(response), pixels(panel))
    assert ours(sd_model.model.diffusion_model) == 0


def test_short_positional_list_keeps_ui_defaults_and_data_url_works(client, monkeypatch):
    seen = spy_args(monkeypatch)
    image = b64_png(reference_image(), data_url=True)
    short = txt2img(client, [True, image, ADAPTER_NAME])
    as_dict = txt2img(client, [{"image": image, "model": ADAPTER_NAME}])
    plain = txt2img(client, [])
    assert short.status_code == as_dict.status_code == plain.status_code == 200, short.text
    assert len(seen[0]) == 64 and seen[0][:3] == (True, image, ADAPTER_NAME)
    assert torch.equal(decoded(short), decoded(as_dict))
    assert not torch.equal(decoded(short), decoded(plain))
    assert "Character-Adapter" not in json.loads(plain.json()["info"])["infotexts"][0]


def test_regions_empty_is_one_global_region_and_disabled_dict_is_plain(client):
    image = b64_png(reference_image())
    whole = txt2img(client, [{"image": image, "model": ADAPTER_NAME, "regions": []}])
    regional = txt2img(client, [{"image": image, "model": ADAPTER_NAME}])
    off = txt2img(client, [{"enabled": False}])
    plain = txt2img(client, [])
    assert {whole.status_code, regional.status_code, off.status_code, plain.status_code} == {200}
    assert not torch.equal(decoded(whole), decoded(regional))
    assert torch.equal(decoded(off), decoded(plain))
    info = json.loads(whole.json()["info"])["extra_generation_params"]
    assert info["Character-Adapter regions"] == "[]"


def test_img2img_route_takes_the_same_args(client):
    init = b64_png(Image.new("RGB", (64, 64), (120, 90, 60)))
    payload = dict(prompt=PROMPT, **SIZE, init_images=[init], denoising_strength=0.6)
    with_adapter = client.post("/sdapi/v1/img2img", json={
        **payload, "alwayson_scripts": {"character-adapter": {"args": [{"image": b64_png(reference_image()),
                                                                        "model": ADAPTER_NAME}]}}})
    without = client.post("/sdapi/v1/img2img", json=payload)
    assert with_adapter.status_code == without.status_code == 200, with_adapter.text
    assert not torch.equal(decoded(with_adapter), decoded(without))


# ---------------------------------------------------------------- malformed input: the request fails, naming the field

GOOD = {"image": None, "model": ADAPTER_NAME}  # image filled in per test
MALFORMED = [
    ({"nonsense": 1}, "nonsense"),
    ({"weight": "0.5"}, "weight"),
    ({"weight": 2.5}, "weight"),
    ({"weight": None}, "weight"),
    ({"start": 0.9, "end": 0.1}, "start"),
    ({"end": -1}, "end"),
    ({"temperature": 0}, "temperature"),
    ({"timestep": 1000}, "timestep"),
    ({"timestep": 12.5}, "timestep"),
    ({"fusion": "blend"}, "fusion"),
    ({"crop": "centre"}, "crop"),
    ({"enabled": "yes"}, "enabled"),
    ({"show_masks": "no"}, "show_masks"),
    ({"image": ""}, "image"),
    ({"image": "not base64 at all!"}, "image"),
    ({"image": "aGVsbG8gd29ybGQ="}, "image"),  # base64 of "hello world": not an image
    ({"image": "data:image/png;base64,"}, "image"),
    ({"image": "data:text/plain;base64,aGVsbG8="}, "image"),
    ({"image": "/etc/hostname"}, "image"),  # a path is never opened
    ({"image": "https://example.com/a.png"}, "image"),
    ({"image": 5}, "image"),
    ({"model": "../x.safetensors"}, "model"),
    ({"model": "/abs/ip-adapter.bin"}, "model"),
    ({"model": "not-listed.safetensors"}, "model"),
    ({"model": ["a"]}, "model"),
    ({"model": ""}, "model"),
    ({"encoder": "..\\clip"}, "encoder"),
    ({"encoder": "missing-encoder"}, "encoder"),
    ({"regions": {"reference_phrase": "face"}}, "regions"),
    ({"regions": [{"reference_phrase": "face", "weight": "1"}]}, "regions[0].weight"),
    ({"regions": [{"reference_phrase": "face", "size": 2}]}, "regions[0].size"),
    ({"regions": [{"phrase": "face"}]}, "regions[0].reference_phrase"),
    ({"regions": [{"reference_phrase": f"r{i}"} for i in range(5)]}, "regions"),
]


def our_log(caplog):
    """(level, message, exc_info) of every record our logger wrote."""
    return [(r.levelname, r.getMessage(), r.exc_info) for r in caplog.records if r.name == "character_adapter"]


def assert_refused(response, field, caplog, capsys, what):
    """A refused input: 422, the message naming the field, nothing generated, one plain log line."""
    body = response.json()
    problems = []
    if response.status_code != 422 or "images" in body:
        problems.append((what, response.status_code, body))
    elif body["error"] != "CharacterAdapterError" or f"Character-Adapter: {field}:" not in body["errors"] \
            or body["detail"] != body["errors"]:
        problems.append((what, body))
    logged = our_log(caplog)
    if len(logged) != 1 or logged[0][0] != "ERROR" or logged[0][2] or "\n" in logged[0][1] \
            or f"Character-Adapter: {field}:" not in logged[0][1]:
        problems.append((what, "log", logged))
    if [m for kind, m in errors.reported if kind == "report"]:
        problems.append((what, "the host reported it", errors.reported[:]))
    if "Traceback" in capsys.readouterr().err:
        problems.append((what, "a traceback was printed"))
    caplog.clear()
    errors.reported.clear()
    return problems


def test_malformed_requests_answer_422_naming_their_field_with_one_log_line(client, monkeypatch, sd_model, caplog,
                                                                            capsys):
    """One client for all cases (each request fails at the first UNet call, so this stays cheap)."""
    opened = []
    monkeypatch.setattr(ca_reference_pass, "load_ip_adapter", lambda path: opened.append(path))
    image = b64_png(reference_image())
    unet = sd_model.model.diffusion_model
    problems = []
    capsys.readouterr()
    caplog.clear()
    errors.reported.clear()
    for override, field in MALFORMED:
        response = txt2img(client, [{**GOOD, "image": image, **override}])
        problems += assert_refused(response, field, caplog, capsys, override)
        if ours(unet) != 0:  # the failed run leaves nothing on the model
            problems.append((override, "hooks", ours(unet)))
    assert not problems, problems
    assert opened == []  # no model file was opened: names are looked up in the listing, never joined into paths
    assert txt2img(client, []).status_code == 200
    assert ours(unet) == 0


def test_a_failure_that_is_not_the_callers_fault_stays_500_with_its_traceback(client, monkeypatch, caplog, capsys):
    """Our bug (here: an error inside the segmentation pass) or an out-of-memory: 500, traceback logged
    by us and by the host's handler, as for any other failure."""
    image = b64_png(reference_image())
    for fault in (RuntimeError("injected bug"), MemoryError("injected out of memory")):
        def broken(*args, fault=fault):
            raise fault

        monkeypatch.setattr(ca_reference_pass, "segment", broken)
        ca_caches.REFERENCE_CACHE.clear()
        capsys.readouterr()
        caplog.clear()
        errors.reported.clear()
        response = txt2img(client, [{"image": image, "model": ADAPTER_NAME}])
        body = response.json()
        assert response.status_code == 500 and "images" not in body, body
        assert body["error"] == "CharacterAdapterError" and str(fault) in body["errors"], body
        assert [m for kind, m in errors.reported if kind == "report"][0].startswith("API error: POST")
        assert "Traceback" in capsys.readouterr().err  # the host's handler printed it
        assert any("Traceback" in message and str(fault) in message for _, message, _ in our_log(caplog))


XYZ_FILE = os.path.join(ROOT, "tests", "webui_double", "scripts", "xyz_grid.py")


@pytest.fixture
def xyz_client(host, monkeypatch):
    """The API with the WebUI's X/Y/Z plot loaded before our script, as the WebUI orders them."""
    scripts.load_scripts([(os.path.dirname(os.path.dirname(XYZ_FILE)), XYZ_FILE),
                          (ROOT, os.path.join(ROOT, "scripts", "character_adapter.py"))])
    scripts.scripts_txt2img.build_ui(is_img2img=False)
    (script,) = [s for s in scripts.scripts_txt2img.alwayson_scripts if s.title() == "Character-Adapter"]
    install_listed_models(script, monkeypatch)
    app, api = api_only_app()
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


def xyz_request(client, label, text, panel):
    """script_name "x/y/z plot" with one X axis, as tools/real_webui/api_checks.py sends it."""
    (grid,) = scripts.scripts_txt2img.selectable_scripts
    labels = [o.label for o in grid.current_axis_options]
    option = grid.current_axis_options[labels.index(label)]
    dropdown = [text] if option.choices is not None else []  # axes with choices read the dropdown
    axes = [labels.index(label), text, dropdown, labels.index("Nothing"), "", [], labels.index("Nothing"), "", []]
    return txt2img(client, panel, script_name="x/y/z plot",
                   script_args=axes + [True, False, False, False, False, False, False, 0, False])


def test_refused_xyz_values_and_an_off_panel_answer_422(xyz_client, caplog, capsys):
    panel = [{"image": b64_png(reference_image()), "model": ADAPTER_NAME}]
    capsys.readouterr()
    caplog.clear()
    errors.reported.clear()
    problems = []
    for label, text, args, field in (("[Character-Adapter] Weight", "0.5, 7", panel, "weight"),
                                     ("[Character-Adapter] Region weights", "1 x 1", panel, "region weights"),
                                     ("[Character-Adapter] Region weights", "1 1", panel, "region weights"),
                                     ("[Character-Adapter] IP-Adapter model", "nope.safetensors", panel, "model")):
        problems += assert_refused(xyz_request(xyz_client, label, text, args), field, caplog, capsys, (label, text))
    off = xyz_request(xyz_client, "[Character-Adapter] Weight", "0.5", [])
    assert off.status_code == 422 and "the Character-Adapter panel is off" in off.json()["errors"], off.json()
    assert len(our_log(caplog)) == 1 and "Traceback" not in capsys.readouterr().err
    assert not problems, problems
    assert xyz_request(xyz_client, "[Character-Adapter] Weight", "0.5", panel).status_code == 200


def test_handler_gives_the_refusal_its_status_and_message_on_the_routes_of_the_app(client):
    """The double's api_middleware is v1.10.1's: the refusal type reaches it as an HTTPException."""
    from charadapter.webui import refusal

    app = client.app

    @app.get("/test-refusal")
    def refused():
        raise refusal.CharacterAdapterError("Character-Adapter: weight: must be between 0.0 and 2.0, got 3")

    response = client.get("/test-refusal")
    assert response.status_code == 422
    assert response.json() == {"error": "CharacterAdapterError", "detail": "Character-Adapter: weight: must be "
                               "between 0.0 and 2.0, got 3", "body": "", "errors": "Character-Adapter: weight: "
                               "must be between 0.0 and 2.0, got 3"}
    assert not errors.reported


def test_at_least_twenty_malformed_inputs():
    assert len(MALFORMED) >= 20 and len({f for _, f in MALFORMED}) >= 15


# ---------------------------------------------------------------- model listing route


def test_models_route_lists_the_names_the_keys_accept(client):
    response = client.get("/character-adapter/models")
    assert response.status_code == 200
    assert response.json() == {"adapters": [ADAPTER_NAME], "encoders": [ENCODER_NAME]}
    assert client.get("/character-adapter/models", params={"refresh": "true"}).json()["adapters"] == [ADAPTER_NAME]


def test_models_route_is_added_once_per_app_and_callbacks_once_per_load(client, host):
    app = client.app
    script_callbacks.app_started_callback(None, app)  # a second call must not add a second route
    assert [r.path for r in app.routes].count(ca_api.MODELS_ROUTE) == 1

    def registered():
        return [c for c in script_callbacks.callback_map["callbacks_app_started"] if c.callback is ca_api.on_app_started]

    assert len(registered()) == 1
    script_module.register_callbacks()  # called again without a reload in between
    assert len(registered()) == 1
    scripts.load_scripts([(ROOT, os.path.join(ROOT, "scripts", "character_adapter.py"))])  # "Reload UI"
    assert len(registered()) == 1
    assert [c.callback for c in script_callbacks.callback_map["callbacks_ui_settings"]].count(ca_settings.add_settings) == 1
    assert not [m for k, m in errors.reported if "character" in m.lower()]
