"""Several characters through the script in the WebUI test double, on the real tiny ldm model:
two and three character tabs, batch, hires, AND, img2img and inpainting, faults that name the
character, Show masks, the cache (each reference segmented once), X/Y/Z and the HTTP API."""

import json

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from webui_host import generate, ours, pixels, plain, reference_image  # sets sys.path
from webui_api_host import ADAPTER_NAME, api_only_app, b64_png, install_listed_models
from charadapter.params import ARG_NAMES_ONE, UNIT_ARGS, Character, Params
from charadapter.webui import reference_pass as ca_reference_pass
from modules import errors, infotext_utils, processing, scripts

PROMPT = "a girl and a knight, face, upper body, lower body, standing"
SUBJECTS = ("girl", "knight", "dog")


def second_image():
    img = Image.new("RGB", (72, 96), (40, 40, 60))
    img.paste((250, 220, 200), (24, 4, 48, 28))
    img.paste((160, 160, 170), (10, 28, 62, 64))
    img.paste((90, 60, 30), (18, 64, 54, 94))
    return img


def third_image():
    img = Image.new("RGB", (80, 80), (200, 200, 120))
    img.paste((120, 80, 40), (10, 20, 70, 70))
    return img


IMAGES = (reference_image, second_image, third_image)


def characters(count, per_unit=None):
    """`count` characters in tabs 1..count; per_unit maps a unit to its overrides."""
    found = []
    for unit in range(1, count + 1):
        values = dict(image=IMAGES[unit - 1](), model="tiny-adapter", subject=SUBJECTS[unit - 1], unit=unit)
        values.update((per_unit or {}).get(unit, {}))
        found.append(Character(**values))
    return tuple(found)


def script_args(script, params):
    full = [0] * script.args_to
    units = 1 + (script.args_to - script.args_from - len(ARG_NAMES_ONE) - 1) // UNIT_ARGS  # the panel's tabs
    full[script.args_from:script.args_to] = params.to_args(units)
    assert len(full) == script.args_to
    return tuple(full)


def run(runner, script, count=2, shared=None, per_unit=None, prompt=PROMPT, **kwargs):
    """(p, processed, error) of one txt2img generation with `count` characters."""
    params = Params(enabled=True, characters=characters(count, per_unit), **(shared or {}))
    settings = dict(prompt=prompt, negative_prompt="", batch_size=1, steps=3, width=64, height=64,
                    sampler_name="Euler", seed=7)
    settings.update(kwargs)
    p = processing.StableDiffusionProcessingTxt2Img(**settings)
    p.scripts = runner
    p.script_args = script_args(script, params)
    try:
        return p, processing.process_images(p), None
    except Exception as error:  # noqa: BLE001 - the test inspects it
        error.__traceback__ = None
        return p, None, error


def no_errors():
    return not [m for _, m in errors.reported if "Character-Adapter" in m or "charadapter" in m]


def layout_spy(script, monkeypatch):
    """The layouts each generation ended with, read at postprocess (before the hooks go)."""
    controller = script.hooks.controller
    seen = []
    original = controller.postprocess

    def postprocess(p, processed):
        gen = controller.generation
        if gen is not None and gen.fusion is not None:
            seen.append((gen.fusion.counts, gen.fusion.masks))
        return original(p, processed)

    monkeypatch.setattr(controller, "postprocess", postprocess)
    return seen


# ---------------------------------------------------------------- txt2img


@pytest.mark.parametrize("count", [2, 3])
def test_characters_apply_each_and_leave_nothing(host, sd_model, monkeypatch, count):
    runner, script = host
    layouts = layout_spy(script, monkeypatch)
    p, processed, error = run(runner, script, count=count, prompt="a girl, a knight and a dog, face, upper body")
    assert error is None and no_errors()
    assert layouts[-1][0] == (3,) * count and layouts[-1][1].shape == (1, 3 * count + 1, 64)
    assert torch.allclose(layouts[-1][1].sum(dim=1), torch.ones(1, 64), atol=1e-5)
    info = p.extra_generation_params
    for unit in range(2, count + 1):
        assert info[f"Character-Adapter {unit} subject"] == SUBJECTS[unit - 1]
        assert len(info[f"Character-Adapter {unit} reference"]) == len(info["Character-Adapter reference"])
    _, one, _ = run(runner, script, count=1, prompt="a girl, a knight and a dog, face, upper body")
    assert not torch.equal(pixels(processed), pixels(one))
    # the last character's weight reaches the image
    _, lighter, _ = run(runner, script, count=count, per_unit={count: dict(weight=0.1)},
                        prompt="a girl, a knight and a dog, face, upper body")
    assert not torch.equal(pixels(processed), pixels(lighter))
    assert ours(sd_model.model.diffusion_model) == 0 and script.hooks.controller.generation is None


def test_a_tab_without_an_image_is_off(host, sd_model):
    """Tab 2 filled in but without a reference: exactly the single-character image."""
    runner, script = host
    _, alone, _ = run(runner, script, count=1)
    _, with_empty_tab, error = run(runner, script, count=2, per_unit={2: dict(image=None, weight=2.0)})
    assert error is None
    assert torch.equal(pixels(alone), pixels(with_empty_tab))
    _, today = generate(script, runner, prompt=PROMPT, steps=3)  # today's 25 values, nothing else
    assert torch.equal(pixels(alone), pixels(today))


@pytest.mark.parametrize("count", [2, 3])
def test_batch_hires_and_and(host, sd_model, monkeypatch, count):
    runner, script = host
    layouts = layout_spy(script, monkeypatch)
    _, processed, error = run(runner, script, count=count, batch_size=2, enable_hr=True, hr_scale=2,
                              hr_upscaler="Latent", denoising_strength=0.5, hr_second_pass_steps=2,
                              prompt="a girl, a knight, a dog AND a knight, face, upper body, lower body")
    assert error is None and no_errors()
    assert len(processed.images) == 2 and processed.images[0].size == (128, 128)
    assert layouts[-1][1].shape == (2, 3 * count + 1, 16 * 16)  # the hires pass's grid, two images
    assert ours(sd_model.model.diffusion_model) == 0


def test_show_masks_gives_each_reference_and_the_layout_by_character(host, sd_model):
    runner, script = host
    p, processed, error = run(runner, script, count=2, shared=dict(show_masks=True), batch_size=2)
    assert error is None and no_errors()
    assert len(processed.images) == 2 + 2 + 2  # two results, two references with their regions, two layouts
    references = processed.images[2:4]
    assert references[0].size == reference_image().size and references[1].size == second_image().size
    layout = np.asarray(processed.images[4].convert("RGB"), dtype=np.int32)
    result = np.asarray(processed.images[0].convert("RGB"), dtype=np.int32)
    assert np.abs(layout[:64, :64] - result).max() > 0  # tinted
    lines, colors = show_masks_legend(p)
    assert len(lines) == 6 + 2 and lines[0].startswith("Character 1, face: ") and lines[3].startswith("Character 2, face")
    assert lines[6].startswith("Character 1, subject girl: in the prompt") and colors[0] != colors[3]
    assert layout.shape[0] > 64  # the legend below the picture
    # character 1's regions are shades of red, character 2's of green: the reference pictures show them
    ref1 = np.asarray(references[0], dtype=np.int32) - np.asarray(reference_image(), dtype=np.int32)
    ref2 = np.asarray(references[1], dtype=np.int32) - np.asarray(second_image(), dtype=np.int32)
    assert ref1[..., 0].sum() > ref1[..., 1].sum() and ref2[..., 1].sum() > ref2[..., 0].sum()


def show_masks_legend(p):
    """The legend lines and colours Show masks writes under the first layout picture of `p`'s run."""
    from charadapter.overlays import pair_colors
    from charadapter.webui.show_masks import legend

    params = Params(enabled=True, characters=characters(2))
    kinds = [v.split(": ")[1] for v in p.extra_generation_params["Character-Adapter located"].split(", ")]
    phrases = [v.split(": ")[0] for v in p.extra_generation_params["Character-Adapter located"].split(", ")]
    by_phrase = dict(zip(phrases, kinds))
    columns = [r.phrase for c in params.characters for r in c.regions] + [c.subject for c in params.characters]
    return legend(params, columns, [by_phrase[c] for c in columns], pair_colors([3, 3]))


def test_each_reference_is_segmented_and_encoded_once(host, monkeypatch):
    runner, script = host
    passes = []
    segment = ca_reference_pass.segment
    monkeypatch.setattr(ca_reference_pass, "segment", lambda *a: passes.append(a[1].size) or segment(*a))
    encodes = []
    encode = ca_reference_pass.RegionEncoder.encode
    monkeypatch.setattr(ca_reference_pass.RegionEncoder, "encode",
                        lambda self, crops: encodes.append(len(crops)) or encode(self, crops))
    assert run(runner, script, count=2)[2] is None
    assert sorted(passes) == sorted([reference_image().size, second_image().size]) and len(encodes) == 2
    assert run(runner, script, count=2, per_unit={2: dict(weight=1.5)})[2] is None  # cached: nothing again
    same = {2: dict(image=reference_image())}  # both tabs hold one reference: one pass for both
    assert run(runner, script, count=2, per_unit=same)[2] is None
    assert len(passes) == 2 and len(encodes) == 2


# ---------------------------------------------------------------- faults


@pytest.mark.parametrize("bad,message", [
    (dict(image=Image.new("RGB", (12, 12))), "Character-Adapter: Character 2: "),
    (dict(subject=""), "Character-Adapter: Character 2: subject: required"),
    (dict(weight=5.0), "Character-Adapter: Character 2: weight: must be between"),
])
def test_one_units_bad_input_stops_the_run_naming_it(host, sd_model, bad, message):
    runner, script = host
    p, processed, error = run(runner, script, count=3, per_unit={2: bad})
    assert processed is None and error is not None and message in str(error), error
    assert message in "".join(p.comments)
    assert ours(sd_model.model.diffusion_model) == 0 and script.hooks.controller.generation is None
    assert run(runner, script, count=2)[2] is None  # the next run is fine


def test_a_subject_the_prompt_lacks_is_located_from_the_phrase(host, monkeypatch):
    """As for region phrases (issue 14): the knight's figure comes from the phrase's own tokens,
    the infotext says so, and nothing is reported missing."""
    runner, script = host
    layouts = layout_spy(script, monkeypatch)
    p, processed, error = run(runner, script, count=2, prompt="a girl, face, upper body, lower body")
    assert error is None and no_errors()
    located = p.extra_generation_params["Character-Adapter located"]
    assert "girl: in the prompt" in located and "knight: from the phrase" in located
    assert located.count("face:") == 1  # a region phrase both characters use is listed once
    assert not [c for c in p.comments if "could not be located" in c]
    assert layouts[-1][1].shape == (1, 7, 64)


# ---------------------------------------------------------------- img2img / inpainting


@pytest.mark.parametrize("masked", [False, True])
def test_img2img_and_inpainting_with_two_characters(host, sd_model, monkeypatch, masked):
    runner = scripts.scripts_img2img
    runner.build_ui(is_img2img=True)
    (script,) = [s for s in runner.alwayson_scripts if s.title() == "Character-Adapter"]
    resolved = {"adapter": "tiny-adapter", "encoder": "tiny-encoder"}
    monkeypatch.setattr(script.hooks.controller, "resolve_model", lambda kind, name: resolved[kind])
    init = Image.new("RGB", (64, 64), (120, 140, 160))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (8, 8, 40, 56))
    results = {}
    for enabled in (False, True):
        params = Params(enabled=enabled, characters=characters(2))
        p = processing.StableDiffusionProcessingImg2Img(
            init_images=[init], mask=mask if masked else None, inpaint_full_res=False, prompt=PROMPT,
            negative_prompt="", batch_size=1, steps=3, width=64, height=64, sampler_name="Euler", seed=7,
            denoising_strength=0.75)
        p.scripts = runner
        p.script_args = script_args(script, params)
        torch.manual_seed(0)
        results[enabled] = processing.process_images(p)
    assert no_errors()
    diff = (pixels(results[True]) - pixels(results[False])).abs().amax(-1)
    assert diff.max() > 0
    if masked:
        outside = torch.ones(64, 64, dtype=torch.bool)
        outside[8:56, 8:40] = False
        assert diff[outside].max() == 0
    assert ours(sd_model.model.diffusion_model) == 0


# ---------------------------------------------------------------- X/Y/Z


def test_xyz_weight_axis_of_character_2(host, sd_model, monkeypatch):
    import os

    from webui_host import ROOT

    xyz_file = os.path.join(ROOT, "tests", "webui_double", "scripts", "xyz_grid.py")
    scripts.load_scripts([(os.path.dirname(os.path.dirname(xyz_file)), xyz_file),
                          (ROOT, os.path.join(ROOT, "scripts", "character_adapter.py"))])
    runner = scripts.scripts_txt2img
    runner.build_ui(is_img2img=False)
    (grid,) = runner.selectable_scripts
    (script,) = [s for s in runner.alwayson_scripts if s.title() == "Character-Adapter"]
    monkeypatch.setattr(script.hooks.controller, "resolve_model",
                        lambda kind, name: {"adapter": "tiny-adapter", "encoder": "tiny-encoder"}[kind])
    labels = [o.label for o in grid.current_axis_options]
    axis = labels.index("[Character-Adapter] Character 2 weight")

    def grid_run(panel, text):
        p = processing.StableDiffusionProcessingTxt2Img(prompt=PROMPT, negative_prompt="", batch_size=1, steps=2,
                                                        width=64, height=64, sampler_name="Euler", seed=7)
        p.scripts = runner
        full = [0] * max(script.args_to, grid.args_to)
        full[0] = runner.selectable_scripts.index(grid) + 1
        full[script.args_from:script.args_to] = panel.to_args()
        full[grid.args_from:grid.args_to] = [axis, text, [], 0, "", [], 0, "", [], True, False, False, False,
                                             False, False, False, 0, False]
        p.script_args = tuple(full)
        return runner.run(p, *p.script_args)

    processed = grid_run(Params(enabled=True, characters=characters(2)), "0, 1.5")
    assert len(processed.images) == 2
    infos = [infotext_utils.parse_generation_parameters(t) for t in processed.infotexts]
    assert [i["Character-Adapter 2 weight"] for i in infos] == ["0.0", "1.5"]
    assert [i["Character-Adapter weight"] for i in infos] == ["0.8", "0.8"]
    assert not torch.equal(pixels(processed, 0), pixels(processed, 1))
    with pytest.raises(Exception, match="Character 2: weight"):
        grid_run(Params(enabled=True, characters=characters(2)), "0.5, 3")
    with pytest.raises(Exception, match="Character 2: weight"):  # that tab has no reference
        grid_run(Params.single(enabled=True, image=reference_image(), model="tiny-adapter"), "0.5")
    assert ours(sd_model.model.diffusion_model) == 0


# ---------------------------------------------------------------- the HTTP API


@pytest.fixture
def client(host, monkeypatch):
    runner, script = host
    install_listed_models(script, monkeypatch)
    app, _ = api_only_app()
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


def txt2img(client, args):
    return client.post("/sdapi/v1/txt2img", json=dict(
        prompt=PROMPT, steps=2, width=64, height=64, sampler_name="Euler", seed=7, negative_prompt="",
        alwayson_scripts={"Character-Adapter": {"args": args}}))


def test_api_with_one_dict_per_character(client, sd_model):
    first = {"image": b64_png(reference_image()), "model": ADAPTER_NAME, "subject": "girl"}
    second = {"image": b64_png(second_image()), "model": ADAPTER_NAME, "subject": "knight", "weight": 1.2,
              "regions": [{"reference_phrase": "face"}, {"reference_phrase": "upper body"}]}
    two = txt2img(client, [first, second])
    one = txt2img(client, [first])
    assert two.status_code == one.status_code == 200, two.text
    assert two.json()["images"][0] != one.json()["images"][0]
    info = json.loads(two.json()["info"])["extra_generation_params"]
    assert info["Character-Adapter 2 weight"] == 1.2 and info["Character-Adapter 2 subject"] == "knight"
    assert json.loads(info["Character-Adapter 2 regions"]) == [["face", "face", 1.0], ["upper body", "upper body", 1.0]]
    bad = txt2img(client, [first, {**second, "fusion": "hard"}])  # a refused input: 422, naming the key
    assert bad.status_code == 422 and "images" not in bad.json()
    assert "Character-Adapter: args[1].fusion:" in bad.json()["errors"]
    unlisted = txt2img(client, [first, {**second, "model": "not-listed.safetensors"}])
    assert unlisted.status_code == 422 and "Character-Adapter: Character 2: model:" in unlisted.json()["errors"]
    assert ours(sd_model.model.diffusion_model) == 0


def test_paste_puts_each_character_in_its_tab(host):
    """The infotext of characters 1 and 3 pastes into tabs 1 and 3; tab 2 (off then) loses its image."""
    runner, script = host
    params = Params(enabled=True, characters=characters(3, {2: dict(image=None)}))
    text = "a girl\nSteps: 3, Sampler: Euler, " + ", ".join(
        f"{k}: {infotext_utils.quote(v)}" for k, v in Params(enabled=True, characters=tuple(
            c for c in params.characters if c.image is not None)).validated().to_infotext(["h1", "h3"]).items())
    fields = script.infotext_fields
    values = infotext_utils.paste_values(fields, text)
    names = [str(key) for _, key in fields]
    got = dict(zip(names, values))
    assert got["Character-Adapter 3 subject"] == "dog" and got["Character-Adapter subject"] == "girl"
    assert got["Character-Adapter 3 model"] == "tiny-adapter" and got["Character-Adapter 3 weight"] == 0.8
    cleared = got["Character-Adapter 2 reference image"]  # gr.update(value=None): that tab is switched off
    assert isinstance(cleared, dict) and "value" in cleared and cleared["value"] is None
    assert got["Character-Adapter reference image"] is None  # a used tab keeps its image
    assert got["Character-Adapter 2 subject"] is None  # the rest of an unused tab is left alone


# ---------------------------------------------------------------- a 4-token and a 16-token adapter


def tiny_plus_adapter(layers):
    """A tiny IP-Adapter Plus: a Resampler (one 64-wide head, as the published files have) giving 16
    tokens from the tiny encoder's 32-wide hidden states, and its own to_k_ip / to_v_ip."""
    from charadapter.checkpoint import AdapterSpec, IPAdapterWeights
    from fake_weights import Filler, resampler_state
    from tiny_sd import TINY_CONTEXT_DIM

    filler = Filler(seed=21)
    image_proj = resampler_state(in_dim=32, dim=32, out_dim=TINY_CONTEXT_DIM, num_queries=16, depth=1, heads=1,
                                 dim_head=64, ff_mult=2, f=filler)
    gen = torch.Generator().manual_seed(22)
    kv = [(torch.randn(l.inner_dim, TINY_CONTEXT_DIM, generator=gen) * 0.3,
           torch.randn(l.inner_dim, TINY_CONTEXT_DIM, generator=gen) * 0.3) for l in layers]
    spec = AdapterSpec(variant="sd15_plus", arch="sd15", plus=True, num_tokens=16, context_dim=TINY_CONTEXT_DIM,
                       clip_dim=32, encoder="ViT-H-14", num_layers=len(layers), projection="resampler")
    return IPAdapterWeights(spec=spec, image_proj=image_proj, layers=kv, source="tiny-plus")


def test_a_base_and_a_plus_adapter_in_one_generation(host, sd_model, monkeypatch):
    """Character 1 with 4 tokens, character 2 with 16: one batched term (the 4 tokens repeated)."""
    from charadapter.layers import find_attn2_layers
    from charadapter.webui import caches as ca_caches

    runner, script = host
    ca_caches.ADAPTER_CACHE.put("tiny-plus", tiny_plus_adapter(find_attn2_layers(sd_model.model.diffusion_model)))
    monkeypatch.setattr(script.hooks.controller, "resolve_model",
                        lambda kind, name: "tiny-encoder" if kind == "encoder" else name)
    tokens = []
    original = script.hooks.controller._begin_pass

    def spy(p, x):
        original(p, x)
        gen = script.hooks.controller.generation
        tokens.append(gen.fusion.state.kv[0][0].shape)

    monkeypatch.setattr(script.hooks.controller, "_begin_pass", spy)
    _, mixed, error = run(runner, script, per_unit={2: dict(model="tiny-plus")})
    assert error is None and no_errors()
    assert tokens[-1][:3] == (6, 2, 16)  # (pairs, token sets, tokens)
    _, base_only, _ = run(runner, script)
    assert not torch.equal(pixels(mixed), pixels(base_only))
    assert ours(sd_model.model.diffusion_model) == 0


def test_settings_choose_how_many_tabs(host):
    """Settings → Character-Adapter → character tabs, read when the UI is built (Reload UI)."""
    import os

    from charadapter.webui import settings as ca_settings
    from modules import shared
    from webui_host import ROOT

    runner, script = host
    assert script.args_to - script.args_from == 64  # the default: 3 tabs
    script_callbacks_module = __import__("modules.script_callbacks", fromlist=["ui_settings_callback"])
    script_callbacks_module.ui_settings_callback()  # the WebUI builds its Settings page
    info = shared.opts.data_labels[ca_settings.SETTING_UNITS]
    assert info.default == 3 and info.component_args == {"minimum": 1, "maximum": 8, "step": 1}
    for units, count in ((1, 26), (2, 45)):
        shared.opts.data[ca_settings.SETTING_UNITS] = units
        scripts.load_scripts([(ROOT, os.path.join(ROOT, "scripts", "character_adapter.py"))])
        runner = scripts.scripts_txt2img
        runner.build_ui(is_img2img=False)
        (script,) = [s for s in runner.alwayson_scripts if s.title() == "Character-Adapter"]
        assert script.args_to - script.args_from == count
        assert len(script.paste_field_names) == count
    shared.opts.data[ca_settings.SETTING_UNITS] = "nonsense"
    assert ca_settings.character_units() == 3
    for key in (ca_settings.SETTING_UNITS, ca_settings.SETTING_EXTRA_FOLDERS, ca_settings.SETTING_SEGMENTATION_CACHE,
                ca_settings.SETTING_ADAPTERS_LOADED):
        shared.opts.data_labels.pop(key, None)
        shared.opts.data.pop(key, None)


def test_token_counts_that_do_not_divide_are_refused_naming_the_character(host, sd_model, monkeypatch):
    """A 6-token adapter beside a 4-token one (as a Full-Face adapter's 257 would be): refused before sampling."""
    from charadapter.checkpoint import AdapterSpec, IPAdapterWeights
    from charadapter.layers import find_attn2_layers
    from charadapter.webui import caches as ca_caches
    from tiny_sd import TINY_CONTEXT_DIM
    from webui_host import CLIP_DIM

    runner, script = host
    layers = find_attn2_layers(sd_model.model.diffusion_model)
    gen = torch.Generator().manual_seed(9)
    image_proj = {"proj.weight": torch.randn(6 * TINY_CONTEXT_DIM, CLIP_DIM, generator=gen) * 0.3,
                  "proj.bias": torch.zeros(6 * TINY_CONTEXT_DIM),
                  "norm.weight": torch.ones(TINY_CONTEXT_DIM), "norm.bias": torch.zeros(TINY_CONTEXT_DIM)}
    kv = [(torch.randn(l.inner_dim, TINY_CONTEXT_DIM, generator=gen), torch.randn(l.inner_dim, TINY_CONTEXT_DIM,
                                                                                 generator=gen)) for l in layers]
    spec = AdapterSpec(variant="sd15", arch="sd15", plus=False, num_tokens=6, context_dim=TINY_CONTEXT_DIM,
                       clip_dim=CLIP_DIM, encoder="ViT-H-14", num_layers=len(layers))
    ca_caches.ADAPTER_CACHE.put("tiny-six", IPAdapterWeights(spec=spec, image_proj=image_proj, layers=kv,
                                                             source="tiny-six"))
    monkeypatch.setattr(script.hooks.controller, "resolve_model",
                        lambda kind, name: "tiny-encoder" if kind == "encoder" else name)
    p, processed, error = run(runner, script, per_unit={2: dict(model="tiny-six")})
    assert processed is None and "Character-Adapter: Character 1: model: tiny-adapter gives 4 image tokens" in str(error)
    assert "Character 2's tiny-six gives 6" in str(error) and getattr(error, "status_code", None) == 422
    assert ours(sd_model.model.diffusion_model) == 0
