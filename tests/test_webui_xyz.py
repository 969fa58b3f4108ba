"""X/Y/Z plot axes in the WebUI double: registration, per-cell values, infotext, cache.

The double's scripts/xyz_grid.py mirrors v1.10.1 (AxisOption signature, the `axis_options` list
copied by ui(), one shallow copy(p) per cell); see test_double_mirrors_v1_10_1_axis_option.
"""

import inspect
import json
import os

import pytest
import torch

from webui_host import ROOT, errors, ours, pixels, plain, reference_image  # sets sys.path
from webui_api_host import ADAPTER_NAME, install_listed_models
from charadapter.webui import reference_pass as ca_reference_pass
from charadapter.params import Params, Region
from charadapter.webui import xyz as ca_xyz
from charadapter.webui import refusal
from modules import infotext_utils, processing, script_callbacks, scripts

XYZ_FILE = os.path.join(ROOT, "tests", "webui_double", "scripts", "xyz_grid.py")
OUR_FILE = os.path.join(ROOT, "scripts", "character_adapter.py")
LABELS = ["[Character-Adapter] " + name for name in (
    "Weight", "Start", "End", "Fusion mode", "Temperature", "Segmentation timestep", "Region weights",
    "IP-Adapter model", "Character 2 weight", "Character 3 weight")]  # one weight axis per further tab (3 by default)


def load(order):
    """scripts.load_scripts as the WebUI does it (the WebUI's own scripts/ first), then the txt2img UI."""
    files = {"xyz": (os.path.dirname(os.path.dirname(XYZ_FILE)), XYZ_FILE), "ours": (ROOT, OUR_FILE)}
    scripts.load_scripts([files[name] for name in order])
    runner = scripts.scripts_txt2img
    runner.build_ui(is_img2img=False)
    (grid,) = runner.selectable_scripts
    found = [s for s in runner.alwayson_scripts if s.title() == "Character-Adapter"]
    return runner, grid, (found[0] if found else None)


def xyz_module():
    return ca_xyz.find_xyz_module()


@pytest.fixture
def grid_host(host, monkeypatch):
    """The double with the WebUI's xyz_grid.py and our script loaded in the WebUI's order."""
    runner, grid, script = load(["xyz", "ours"])
    monkeypatch.setattr(script.hooks.controller, "resolve_model",
                        lambda kind, name: {"adapter": "tiny-adapter", "encoder": "tiny-encoder"}[kind])
    return runner, grid, script


def test_double_mirrors_v1_10_1_axis_option():
    """scripts/xyz_grid.py at v1.10.1: AxisOption(label, type, apply, format_value=format_value_add_label,
    confirm=None, cost=0.0, choices=None, prepare=None); AxisOptionImg2Img/Txt2Img add is_img2img."""
    load(["xyz"])
    module = xyz_module()
    params = list(inspect.signature(module.AxisOption.__init__).parameters.values())
    assert [(p.name, p.default) for p in params] == [
        ("self", inspect.Parameter.empty), ("label", inspect.Parameter.empty), ("type", inspect.Parameter.empty),
        ("apply", inspect.Parameter.empty), ("format_value", module.format_value_add_label), ("confirm", None),
        ("cost", 0.0), ("choices", None), ("prepare", None)]
    assert module.AxisOptionImg2Img("x", str, None).is_img2img is True
    assert module.AxisOptionTxt2Img("x", str, None).is_img2img is False


def test_axes_are_added_at_import_once_and_survive_reload(grid_host):
    runner, grid, script = grid_host
    labels = [o.label for o in grid.current_axis_options]  # the copy ui() took: what the dropdowns index
    assert [label for label in labels if label.startswith("[Character-Adapter]")] == LABELS
    script_callbacks.before_ui_callback()
    ca_xyz.add_axes()
    assert [o.label for o in xyz_module().axis_options].count(LABELS[0]) == 1
    runner, grid, script = load(["xyz", "ours"])  # "Reload UI": a fresh xyz module, our package still imported
    script_callbacks.before_ui_callback()
    assert [o.label for o in grid.current_axis_options].count(LABELS[0]) == 1
    assert not [m for _, m in errors.reported if "Character-Adapter" in m]


def test_axes_wait_for_before_ui_when_xyz_loads_later(host):
    load(["ours", "xyz"])
    assert not [o for o in xyz_module().axis_options if o.label in LABELS]
    script_callbacks.before_ui_callback()  # webui.py calls it before ui.create_ui()
    assert [o.label for o in xyz_module().axis_options if o.label in LABELS] == LABELS
    runner = scripts.scripts_txt2img
    runner.build_ui(is_img2img=False)
    (grid,) = runner.selectable_scripts
    assert LABELS[-1] in [o.label for o in grid.current_axis_options]


def grid_args(grid, x=("Nothing", "", []), y=("Nothing", "", []), z=("Nothing", "", [])):
    labels = [o.label for o in grid.current_axis_options]
    values = []
    for label, text, dropdown in (x, y, z):
        values += [labels.index(label), text, list(dropdown)]
    return values + [True, False, False, False, False, False, False, 0, False]


def run_grid(runner, grid, script, axes, panel=None, **kwargs):
    settings = dict(prompt="a face, upper body, lower body, standing", negative_prompt="", batch_size=1, steps=2,
                    width=64, height=64, sampler_name="Euler", seed=7)
    settings.update(kwargs)
    p = processing.StableDiffusionProcessingTxt2Img(**settings)
    p.scripts = runner
    full = [0] * max(script.args_to, grid.args_to)
    full[0] = runner.selectable_scripts.index(grid) + 1
    params = panel or Params.single(enabled=True, image=reference_image(), model="tiny-adapter")
    full[script.args_from:script.args_to] = params.to_args()
    full[grid.args_from:grid.args_to] = grid_args(grid, **axes)
    p.script_args = tuple(full)
    return p, runner.run(p, *p.script_args)


def test_cells_get_their_values_weight_zero_is_plain_and_one_segmentation_per_reference(grid_host, monkeypatch,
                                                                                           sd_model):
    runner, grid, script = grid_host
    passes = []
    segment = ca_reference_pass.segment
    monkeypatch.setattr(ca_reference_pass, "segment", lambda *a, **k: passes.append(1) or segment(*a, **k))
    _, processed = run_grid(runner, grid, script, dict(
        x=(LABELS[0], "0, 0.5", []),                            # Weight
        y=(LABELS[3], "", ["soft", "hard"]),                    # Fusion mode (a choices axis: dropdown values)
        z=(LABELS[6], '"1, 1, 1", 0.5 1 0', [])))               # Region weights: quoted commas or spaces
    assert len(processed.images) == 8
    assert len(passes) == 1  # one reference, one segmentation pass for the whole grid
    cell = {(w, f, r): i for i, (r, f, w) in enumerate(
        (r, f, w) for r in ("1.0", "0.5") for f in ("soft", "hard") for w in ("0.0", "0.5"))}
    for (weight, fusion, region), index in cell.items():
        info = infotext_utils.parse_generation_parameters(processed.infotexts[index])
        assert info["Character-Adapter weight"] == weight and info["Character-Adapter fusion"] == fusion
        expected = [1.0, 1.0, 1.0] if region == "1.0" else [0.5, 1.0, 0.0]
        assert [w for _, _, w in json.loads(info["Character-Adapter regions"])] == expected
    reference = plain(runner, script)
    for region in ("1.0", "0.5"):
        for fusion in ("soft", "hard"):
            assert torch.equal(pixels(processed, cell[("0.0", fusion, region)]), pixels(reference))
            assert not torch.equal(pixels(processed, cell[("0.5", fusion, region)]), pixels(reference))
    assert not torch.equal(pixels(processed, cell[("0.5", "soft", "1.0")]), pixels(processed, cell[("0.5", "hard", "1.0")]))
    assert not torch.equal(pixels(processed, cell[("0.5", "soft", "1.0")]), pixels(processed, cell[("0.5", "soft", "0.5")]))
    assert ours(sd_model.model.diffusion_model) == 0


def test_window_temperature_and_timestep_axes_reach_the_generation(grid_host):
    runner, grid, script = grid_host
    _, processed = run_grid(runner, grid, script, dict(
        x=(LABELS[1], "0, 0.5", []), y=(LABELS[4], "0.1, 2", []), z=(LABELS[5], "650, 300", [])))
    assert len(processed.images) == 8
    infos = processed.infotexts
    assert "Character-Adapter window: 0.5-1.0" in infos[1] and "Character-Adapter window: 0.0-1.0" in infos[0]
    assert "Character-Adapter temperature: 2.0" in infos[2] and "Character-Adapter timestep: 300" in infos[4]
    assert len({pixels(processed, i).numpy().tobytes() for i in range(8)}) == 8  # every cell differs (sums can collide)


def test_bad_values_and_an_off_panel_stop_the_grid_before_it_starts(grid_host):
    """Each is a refused input (HTTP 422 through the API: test_webui_api), its message names the field."""
    runner, grid, script = grid_host
    for axis, text, message in ((LABELS[0], "0.5, 3", "weight: must be between"),
                                (LABELS[6], "1 1", "region weights: 2 weight"),  # 3 regions in the panel
                                (LABELS[6], "1 x 1", "region weights: expected a number"),
                                (LABELS[0], "0.5", "panel is off")):
        with pytest.raises(refusal.CharacterAdapterError, match=message) as err:
            run_grid(runner, grid, script, dict(x=(axis, text, [])), panel=Params() if "off" in message else None)
        assert err.value.status_code == 422 and str(err.value).startswith("Character-Adapter")


def test_model_axis_lists_the_adapters_and_reaches_the_infotext(grid_host, monkeypatch):
    runner, grid, script = grid_host
    install_listed_models(script, monkeypatch)
    (option,) = [o for o in grid.current_axis_options if o.label == LABELS[7]]
    assert option.choices() == [ADAPTER_NAME]
    panel = Params.single(enabled=True, image=reference_image(), model=ADAPTER_NAME, regions=(Region("face", "face"),))
    _, processed = run_grid(runner, grid, script, dict(x=(LABELS[7], "", [ADAPTER_NAME])), panel=panel)
    assert f"Character-Adapter model: {ADAPTER_NAME}" in processed.infotexts[0]
    with pytest.raises(Exception, match="model"):
        run_grid(runner, grid, script, dict(x=(LABELS[7], "", ["../x.safetensors"])), panel=panel)
