"""The WebUI test double behaves as v1.10.1 does (cited per test). CPU, no downloads."""
import os
import sys
import types
import zipfile

import pytest
import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "webui_double"))

from modules import errors, processing, prompt_parser, script_callbacks, scripts, sd_hijack, sd_models, shared  # noqa: E402
from clip_tokenizer import build_clip_tokenizer  # noqa: E402


# ---------------------------------------------------------------- fakes

class TokenIdTransformer(nn.Module):
    """Text-encoder stand-in: channel 0 carries the token id, channel 1 is 1, so rows can be identified."""

    def forward(self, input_ids=None, output_hidden_states=False):
        z = torch.zeros(input_ids.shape + (4,))
        z[..., 0] = input_ids.float()
        z[..., 1] = 1.0
        return types.SimpleNamespace(last_hidden_state=z, hidden_states=[z])


class RecordingModel(nn.Module):
    """sd_model stand-in that records every apply_model batch and predicts zero noise."""

    cond_stage_key = "txt"
    dtype = torch.float32  # LatentDiffusion's (a LightningModule) dtype property

    def __init__(self, tokenizer, on_apply=None):
        super().__init__()
        self.model = nn.Module()
        self.model.conditioning_key = "crossattn"
        self.model.diffusion_model = nn.Identity()
        self.cond_stage_model = nn.Module()
        self.cond_stage_model.tokenizer = tokenizer
        self.cond_stage_model.transformer = TokenIdTransformer()
        betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
        self.register_buffer("alphas_cumprod", torch.cumprod(1 - betas, 0))
        self.calls = []
        self.on_apply = on_apply

    def get_learned_conditioning(self, c):
        return self.cond_stage_model(c)

    def apply_model(self, x, t, cond):
        if self.on_apply is not None:
            self.on_apply(x, t, cond)
        self.calls.append({"n": x.shape[0], "hw": tuple(x.shape[2:]), "c": cond["c_crossattn"][0].clone()})
        return torch.zeros_like(x)

    def decode_first_stage(self, z):
        return torch.zeros(z.shape[0], 3, z.shape[2] * 8, z.shape[3] * 8)

    def encode_first_stage(self, x):
        return torch.zeros(x.shape[0], 4, x.shape[2] // 8, x.shape[3] // 8)

    def get_first_stage_encoding(self, z):
        return z


BOS, EOS, COMMA = 49406, 49407, 267


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_clip_tokenizer(str(tmp_path_factory.mktemp("clip_tokenizer")))


@pytest.fixture
def model(tokenizer):
    shared.reset_for_tests()
    errors.reported.clear()
    script_callbacks.clear_callbacks()
    scripts.load_scripts([])
    m = sd_models.register_model(RecordingModel(tokenizer))
    yield m
    script_callbacks.clear_callbacks()
    shared.reset_for_tests()


def txt2img(**kwargs):
    args = dict(prompt="a cat", negative_prompt="", batch_size=1, steps=2, width=64, height=64, sampler_name="Euler", seed=1)
    args.update(kwargs)
    return processing.StableDiffusionProcessingTxt2Img(**args)


def row_first_tokens(c):
    """Token id at position 1 (first prompt token) of each cond row."""
    return [int(v) for v in c[:, 1, 0]]


# ---------------------------------------------------------------- prompt parsing and chunking

def test_parse_prompt_attention_matches_the_docstring_examples():
    """modules/prompt_parser.py (parse_prompt_attention) doctests."""
    ppa = prompt_parser.parse_prompt_attention
    assert ppa('normal text') == [['normal text', 1.0]]
    assert ppa('an (important) word') == [['an ', 1.0], ['important', 1.1], [' word', 1.0]]
    assert ppa('(unbalanced') == [['unbalanced', 1.1]]
    assert ppa('\\(literal\\]') == [['(literal]', 1.0]]
    assert ppa('(unnecessary)(parens)') == [['unnecessaryparens', 1.1]]
    got = ppa('a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).')
    want = [['a ', 1.0], ['house', 1.5730000000000004], [' ', 1.1], ['on', 1.0], [' a ', 1.1], ['hill', 0.55], [', sun, ', 1.1], ['sky', 1.4641000000000006], ['.', 1.1]]
    assert [t for t, _ in got] == [t for t, _ in want]
    assert [w for _, w in got] == pytest.approx([w for _, w in want], abs=1e-12)
    assert ppa('a BREAK b') == [['a', 1.0], ['BREAK', -1], ['b', 1.0]]


def test_tokenize_line_chunks_break_emphasis_and_comma_backtrack(model):
    """modules/sd_hijack_clip.py (TextConditionalModel.tokenize_line)."""
    clip = sd_hijack.model_hijack.clip
    chunks, count = clip.tokenize_line("a photo, red jacket")
    assert count == 5 and len(chunks) == 1
    assert chunks[0].tokens[:7] == [BOS, 320, 1125, COMMA, 736, 6164, EOS]
    assert len(chunks[0].tokens) == 77 and set(chunks[0].tokens[6:]) == {EOS}

    chunks, count = clip.tokenize_line("a cat BREAK red jacket")
    assert len(chunks) == 2 and count == 75 + 2
    assert chunks[1].tokens[1:4] == [736, 6164, EOS]

    chunks, _ = clip.tokenize_line("a (red:1.5) jacket")
    assert chunks[0].multipliers[:5] == pytest.approx([1.0, 1.0, 1.5, 1.0, 1.0])

    shared.opts.emphasis = "None"  # brackets and BREAK become literal text
    chunks, count = clip.tokenize_line("a cat BREAK red")
    assert len(chunks) == 1 and count == 4
    shared.opts.emphasis = "Original"

    # 73 words, a comma, then 3 words: the chunk is full after 'red'; at 'blue' the text after the comma
    # (within comma_padding_backtrack=20 tokens) moves to chunk 2 and chunk 1 is padded with EOS
    words = " ".join(["cat"] * 73) + ", red blue green"
    chunks, count = clip.tokenize_line(words)
    assert len(chunks) == 2 and count == 75 + 3
    assert chunks[0].tokens[74:77] == [COMMA, EOS, EOS]
    assert chunks[1].tokens[1:5] == [736, 1746, 1901, EOS]
    shared.opts.comma_padding_backtrack = 0  # no backtrack: the chunk is cut at exactly 75 tokens
    chunks, count = clip.tokenize_line(words)
    assert chunks[0].tokens[74:77] == [COMMA, 736, EOS] and chunks[1].tokens[1:4] == [1746, 1901, EOS] and count == 75 + 2


def test_long_prompt_conditioning_concatenates_chunks_on_the_token_axis(model):
    """modules/sd_hijack_clip.py (TextConditionalModel.forward): chunk k fills tokens 77k .. 77k+76."""
    c = model.get_learned_conditioning(["a cat BREAK red jacket", "a dog"])
    assert c.shape == (2, 154, 4)
    assert c[0, 77, 0] == BOS and c[0, 78, 0] == 736
    assert c[1, 77, 0] == BOS and c[1, 78, 0] == EOS  # shorter prompt padded with an empty chunk


# ---------------------------------------------------------------- CFG batch layout

def test_cfg_rows_are_cond_then_uncond_and_and_adds_rows(model):
    """modules/sd_samplers_cfg_denoiser.py (CFGDenoiser.forward): AND sub-prompts are extra cond rows, image by image."""
    seen = []
    script_callbacks.on_cfg_denoiser(lambda params: seen.append((params.x.shape[0], params.text_cond.shape[0], params.text_uncond.shape[0])))
    processing.process_images(txt2img(prompt=["cat AND dog:0.5", "red"], negative_prompt="bad", batch_size=2, steps=1))
    assert seen == [(5, 3, 2)]
    (call,) = model.calls
    assert call["n"] == 5  # [cat, dog | red | bad, bad]
    assert row_first_tokens(call["c"]) == [2368, 1929, 736, 2103, 2103]


def test_skip_early_cfg_drops_uncond_rows_after_the_callback(model):
    """CFGDenoiser.forward: on_cfg_denoiser sees cond+uncond rows; Skip Early CFG then drops the uncond rows."""
    shared.opts.skip_early_cond = 0.5
    seen = []
    script_callbacks.on_cfg_denoiser(lambda params: seen.append(params.x.shape[0]))
    p = txt2img(batch_size=2, steps=4)
    processing.process_images(p)
    assert seen == [4, 4, 4, 4]
    assert [c["n"] for c in model.calls] == [2, 2, 2, 4]  # steps 0..2 have step/total <= 0.5
    assert p.extra_generation_params["Skip Early CFG"] == 0.5


def test_batch_cond_uncond_off_splits_into_calls_of_batch_size(model):
    """CFGDenoiser.forward: with batch_cond_uncond False, calls take `batch_size` consecutive rows (cond and uncond can mix)."""
    shared.opts.batch_cond_uncond = False
    processing.process_images(txt2img(prompt=["cat AND dog", "red"], negative_prompt="bad", batch_size=2, steps=1))
    assert [row_first_tokens(c["c"]) for c in model.calls] == [[2368, 1929], [736, 2103], [2103]]


def test_unequal_token_lengths_split_cond_and_uncond_calls(model):
    """CFGDenoiser.forward: cond 154 tokens vs uncond 77 -> cond rows in one call, uncond rows in another."""
    processing.process_images(txt2img(prompt="cat BREAK dog", negative_prompt="bad", batch_size=2, steps=1))
    assert [(c["n"], c["c"].shape[1]) for c in model.calls] == [(2, 154), (2, 77)]


def test_pad_cond_uncond_pads_with_the_empty_prompt_and_makes_one_call(model):
    """CFGDenoiser.pad_cond_uncond: uncond gets copies of the '' conditioning appended; one call of 154 tokens."""
    shared.opts.pad_cond_uncond = True
    p = txt2img(prompt="cat BREAK dog", negative_prompt="bad", steps=1)
    processing.process_images(p)
    (call,) = model.calls
    assert call["n"] == 2 and call["c"].shape[1] == 154
    assert call["c"][1, 77, 0] == BOS and call["c"][1, 78, 0] == EOS
    assert p.extra_generation_params["Pad conds"] is True


# ---------------------------------------------------------------- callback order and hooks

def test_cfg_callbacks_fire_around_the_model_call_and_sampling_step_lags(model):
    """script_callbacks order inside CFGDenoiser.forward; Sampler.callback_state sets sampling_step after each step."""
    events = []
    model.on_apply = lambda x, t, cond: events.append("unet")
    script_callbacks.on_cfg_denoiser(lambda params: events.append(("denoiser", params.sampling_step, params.denoiser.step)))
    script_callbacks.on_cfg_denoised(lambda params: events.append("denoised"))
    script_callbacks.on_cfg_after_cfg(lambda params: events.append("after_cfg"))
    processing.process_images(txt2img(steps=3))
    assert events == [
        ("denoiser", 0, 0), "unet", "denoised", "after_cfg",
        ("denoiser", 0, 1), "unet", "denoised", "after_cfg",
        ("denoiser", 1, 2), "unet", "denoised", "after_cfg",
    ]


class Recorder(scripts.Script):
    """Records every hook with its args; can raise in one hook."""

    def __init__(self, log, fail_in=None, tag="A"):
        self.log, self.fail_in, self.tag = log, fail_in, tag

    def title(self):
        return "Recorder " + self.tag

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def _rec(self, name, args, **extra):
        self.log.append((self.tag, name, args, extra))
        if name == self.fail_in:
            raise RuntimeError(f"boom in {name}")

    def process(self, p, *args):
        self._rec("process", args)

    def before_process_batch(self, p, *args, **kwargs):
        self._rec("before_process_batch", args)

    def process_batch(self, p, *args, **kwargs):
        self._rec("process_batch", args)

    def process_before_every_sampling(self, p, *args, **kwargs):
        self._rec("process_before_every_sampling", args, x=tuple(kwargs["x"].shape), keys=sorted(kwargs))

    def before_hr(self, p, *args):
        self._rec("before_hr", args)

    def postprocess_batch(self, p, *args, **kwargs):
        self._rec("postprocess_batch", args)

    def postprocess_image(self, p, pp, *args):
        self._rec("postprocess_image", args)

    def postprocess(self, p, processed, *args):
        self._rec("postprocess", args)


def make_runner(*script_objects):
    """A ScriptRunner holding these alwayson scripts with consecutive args slices starting at 1."""
    runner = scripts.ScriptRunner()
    start = 1
    for s, n_args in script_objects:
        s.filename, s.alwayson = f"{s.title()}.py", True
        s.args_from, s.args_to = start, start + n_args
        start += n_args
        runner.scripts.append(s)
        runner.alwayson_scripts.append(s)
    return runner


def test_hooks_run_in_order_with_their_args_slice_and_hires_resamples(model):
    """modules/processing.py (process_images_inner, Txt2Img.sample / sample_hr_pass); ScriptRunner slices p.script_args."""
    log = []
    p = txt2img(enable_hr=True, hr_scale=2, hr_upscaler="Latent", denoising_strength=0.5, steps=2, hr_second_pass_steps=2)
    p.scripts = make_runner((Recorder(log, tag="A"), 2), (Recorder(log, tag="B"), 1))
    p.script_args = (0, "a1", "a2", "b1")
    processing.process_images(p)
    names = [(tag, name) for tag, name, _, _ in log]
    order = ["process", "before_process_batch", "process_batch", "process_before_every_sampling", "before_hr", "process_before_every_sampling", "postprocess_batch", "postprocess_image", "postprocess"]
    assert names == [(t, n) for n in order for t in "AB"]
    assert {args for tag, _, args, _ in log if tag == "A"} == {("a1", "a2")}
    assert {args for tag, _, args, _ in log if tag == "B"} == {("b1",)}
    sampling = [extra for tag, name, _, extra in log if tag == "A" and name == "process_before_every_sampling"]
    assert [s["x"] for s in sampling] == [(1, 4, 8, 8), (1, 4, 16, 16)]
    assert sampling[0]["keys"] == ["c", "noise", "uc", "x"]
    assert p.width == 64  # p.width/height stay the first-pass size; the hires size is hr_upscale_to_x/y
    assert (p.hr_upscale_to_x, p.hr_upscale_to_y) == (128, 128)
    assert [c["hw"] for c in model.calls] == [(8, 8), (8, 8), (16, 16), (16, 16)]


def test_an_exception_in_a_hook_is_logged_and_generation_continues(model):
    """modules/scripts.py (ScriptRunner.process etc.): try / errors.report / next script."""
    log = []
    p = txt2img()
    p.scripts = make_runner((Recorder(log, fail_in="process", tag="A"), 0), (Recorder(log, tag="B"), 0))
    p.script_args = (0,)
    processed = processing.process_images(p)
    assert len(processed.images) == 1
    assert ("B", "process") in [(t, n) for t, n, _, _ in log]
    assert ("A", "postprocess") in [(t, n) for t, n, _, _ in log]
    assert any(kind == "report" and "Error running process" in msg for kind, msg in errors.reported)


def test_an_exception_inside_the_unet_skips_postprocess(model):
    """process_images_inner has no try/finally around sampling: postprocess never runs."""
    log = []

    def explode(x, t, cond):
        raise RuntimeError("unet failed")

    model.on_apply = explode
    p = txt2img()
    p.scripts = make_runner((Recorder(log), 0))
    p.script_args = (0,)
    with pytest.raises(RuntimeError, match="unet failed"):
        processing.process_images(p)
    assert "postprocess" not in [n for _, n, _, _ in log]


def test_comments_are_frozen_when_processed_is_built(model):
    """modules/processing.py (Processed.__init__ copies p.comments; postprocess runs after)."""
    class Commenter(scripts.Script):
        def title(self):
            return "Commenter"

        def show(self, is_img2img):
            return scripts.AlwaysVisible

        def process(self, p, *args):
            p.comment("from process")

        def postprocess(self, p, processed, *args):
            p.comment("from postprocess")

    p = txt2img()
    p.scripts = make_runner((Commenter(), 0))
    p.script_args = (0,)
    processed = processing.process_images(p)
    assert processed.comments == "from process\n"
    assert "comments" not in processed.js()


def test_img2img_only_masked_crops_and_samples_at_p_size(model):
    """Img2Img.init (inpaint_full_res) crops the mask's region and processes it at p.width x p.height."""
    from PIL import Image
    init = Image.new("RGB", (128, 128), "gray")
    mask = Image.new("L", (128, 128), 0)
    mask.paste(255, (16, 16, 48, 48))
    log = []
    p = processing.StableDiffusionProcessingImg2Img(init_images=[init], mask=mask, inpaint_full_res=True, inpaint_full_res_padding=0,
                                                    prompt="cat", width=64, height=64, steps=2, denoising_strength=0.5, sampler_name="Euler", seed=1)
    p.scripts = make_runner((Recorder(log), 0))
    p.script_args = (0,)
    processing.process_images(p)
    assert p.paste_to == (16, 16, 32, 32)
    sampling = [extra for _, name, _, extra in log if name == "process_before_every_sampling"]
    assert sampling[0]["x"] == (1, 4, 8, 8)
    assert p.extra_generation_params["Inpaint area"] == "Only masked"


def test_inpainting_models_get_the_mask_and_the_masked_image(model):
    """processing.py (img2img_image_conditioning -> inpainting_image_conditioning): for conditioning_key
    'hybrid' the UNet's c_concat is [mask (latent size), latent of the image with the masked part removed]."""
    from PIL import Image
    model.model.conditioning_key = "hybrid"
    concat = []
    model.on_apply = lambda x, t, cond: concat.append(cond["c_concat"][0].clone())
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    p = processing.StableDiffusionProcessingImg2Img(init_images=[Image.new("RGB", (64, 64), "gray")], mask=mask, inpaint_full_res=False,
                                                    prompt="cat", width=64, height=64, steps=2, denoising_strength=0.5, sampler_name="Euler", seed=1)
    processing.process_images(p)
    assert concat and concat[0].shape == (2, 5, 8, 8)  # cond + uncond rows
    assert concat[0][:, 0, :, :4].eq(1).all() and concat[0][:, 0, :, 4:].eq(0).all()
    txt = txt2img(steps=1)
    concat.clear()
    processing.process_images(txt)  # txt2img_image_conditioning: all masked, a grey image
    assert concat[0].shape == (2, 5, 8, 8) and concat[0][:, 0].eq(1).all()


def test_apply_model_casts_to_the_unet_dtype_under_autocast(model, monkeypatch):
    """modules/sd_hijack_unet.py (apply_model), patched onto LatentDiffusion.apply_model at import: x, t and
    every cond tensor go to devices.dtype_unet, and the call runs under devices.autocast()."""
    from modules import devices
    seen = []
    # torch < 2.4 (the WebUI's 2.1): is_autocast_enabled takes no device and answers for CUDA only
    cpu_autocast = (lambda: torch.is_autocast_enabled("cpu")) if torch.__version__ >= (2, 4) else torch.is_autocast_cpu_enabled
    model.on_apply = lambda x, t, cond: seen.append((x.dtype, t.dtype, cond["c_crossattn"][0].dtype, cpu_autocast()))
    for name in ("dtype", "dtype_unet", "dtype_inference"):
        monkeypatch.setattr(devices, name, torch.bfloat16)
    model.apply_model(torch.zeros(1, 4, 8, 8), torch.tensor([10]), {"c_crossattn": [torch.zeros(1, 77, 4)]})
    assert seen == [(torch.bfloat16, torch.bfloat16, torch.bfloat16, True)]


# ---------------------------------------------------------------- API, callbacks, xyz, safe load

def test_api_places_alwayson_args_at_args_from(model):
    """modules/api/api.py (Api.init_script_args): positional copy, extras ignored, a dict lands in the first slot."""
    from modules.api.api import Api
    runner = make_runner((Recorder([], tag="A"), 3))
    defaults = [0, True, 0.5, "x"]
    request = types.SimpleNamespace(script_args=[], alwayson_scripts={"recorder a": {"args": [False, 0.9, "y", "extra"]}})
    assert Api().init_script_args(request, defaults, None, None, runner) == [0, False, 0.9, "y"]
    request.alwayson_scripts = {"Recorder A": {"args": [{"enabled": True}]}}
    assert Api().init_script_args(request, defaults, None, None, runner) == [0, {"enabled": True}, 0.5, "x"]


def test_remove_current_script_callbacks_removes_only_this_files_callbacks(model):
    """modules/script_callbacks.py (remove_current_script_callbacks) keys on the registering file."""
    script_callbacks.on_cfg_denoiser(lambda params: None)
    assert script_callbacks.callback_map["callbacks_cfg_denoiser"][0].script == __file__
    script_callbacks.remove_current_script_callbacks()
    assert script_callbacks.callback_map["callbacks_cfg_denoiser"] == []


def test_extension_finds_xyz_module_and_adds_an_axis_before_ui(model):
    """scripts/xyz_grid.py is loaded as module 'xyz_grid.py'; axis dropdowns index a snapshot taken in ui()."""
    here = os.path.join(os.path.dirname(__file__), "webui_double")
    scripts.load_scripts([(here, os.path.join(here, "scripts", "xyz_grid.py"))])
    (data,) = [d for d in scripts.scripts_data if d.script_class.__module__ == "xyz_grid.py"]
    xyz = data.module
    assert "xyz_grid.py" not in sys.modules
    xyz.axis_options.append(xyz.AxisOption("[Test] Weight", float, xyz.apply_field("test_weight")))

    runner = scripts.scripts_txt2img
    runner.build_ui(is_img2img=False)
    (script,) = runner.selectable_scripts
    index = [o.label for o in script.current_axis_options].index("[Test] Weight")
    assert script.args_to - script.args_from == 18

    weights = []

    class ReadsWeight(Recorder):
        def process(self, p, *args):
            weights.append(getattr(p, "test_weight", None))

    p = txt2img(steps=1)
    p.scripts = make_runner((ReadsWeight([]), 0))
    p.script_args = (0,)
    result = script.run(p, index, "0.25, 0.75", [], 0, "", [], 0, "", [], True, False, False, False, False, False, False, 0, False)
    assert weights == [0.25, 0.75] and len(result.images) == 2
    assert not hasattr(p, "test_weight")  # each cell ran on copy(p)


def test_safe_load_rejects_files_written_by_recent_torch(model, tmp_path):
    """modules/safe.py (check_zip_filenames): '.format_version' is not an allowed entry -> load returns None."""
    from modules import safe
    path = str(tmp_path / "w.bin")
    torch.save({"w": torch.zeros(2)}, path)
    with zipfile.ZipFile(path) as z:
        archive = z.namelist()[0].split("/")[0]
        recent = f"{archive}/.format_version" in z.namelist()
    if not recent:  # older torch (the WebUI's 2.1) writes no such entry: the WebUI loads its files...
        with safe.installed():
            assert torch.load(path, map_location="cpu", weights_only=True)["w"].shape == (2,)
        with zipfile.ZipFile(path, "a") as z:  # ...and refuses them once the entry recent torch writes is there
            z.writestr(f"{archive}/.format_version", b"1")
    with safe.installed():
        assert torch.load(path, map_location="cpu", weights_only=True) is None
    assert any("Error verifying pickled file" in msg for _, msg in errors.reported)
    assert torch.load(path, weights_only=True)["w"].shape == (2,)


def test_controlnet_double_marks_conds_and_sets_cond_mark(model):
    """sd-webui-controlnet scripts/hook.py: marker row in c/uc (T+1), stripped before the UNet blocks, cond_mark per row."""
    from ldm.modules.diffusionmodules.openaimodel import UNetModel
    from controlnet_double import ControlNetDouble
    unet = UNetModel(image_size=8, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[1], num_res_blocks=1,
                     channel_mult=[1], num_heads=2, use_spatial_transformer=True, transformer_depth=1, context_dim=4,
                     use_checkpoint=False, legacy=False)
    model.model.diffusion_model = unet
    model.on_apply = lambda x, t, cond: unet(x, t, context=torch.cat(cond["c_crossattn"], 1))
    seen = {"denoiser": [], "attn2": [], "mark": []}
    script_callbacks.on_cfg_denoiser(lambda params: seen["denoiser"].append((params.text_cond.shape[1], params.text_uncond.shape[1])))
    attn2 = [m.attn2 for m in unet.modules() if hasattr(m, "attn2")]

    def record(mod, args, kwargs, out):
        seen["attn2"].append(kwargs["context"].shape[1])
        seen["mark"].append(unet.cond_mark.flatten().tolist())

    attn2[0].register_forward_hook(record, with_kwargs=True)
    ip_calls = []
    p = txt2img(batch_size=2, steps=1, negative_prompt="bad")
    cn = ControlNetDouble()
    cn.hook(p, unet, ip_adapter_term=lambda attn, x, q: ip_calls.append(q.shape) or 0.0)
    assert "forward" in attn2[0].__dict__
    processing.process_images(p)
    cn.restore()
    assert seen["denoiser"] == [(78, 78)]
    assert seen["attn2"] == [77] and seen["mark"] == [[1.0, 1.0, 0.0, 0.0]]
    assert len(ip_calls) == len(attn2)
    assert hasattr(unet, "cond_mark") and "_original_forward" not in unet.__dict__  # stale cond_mark stays behind
