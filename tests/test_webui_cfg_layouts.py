"""Every CFG batch layout of WebUI v1.10.1, through the script in the test double on the real tiny
ldm model: which rows each UNet call gets, and what the adapter was told about them.

The truth comes from the rows themselves: each row's text context (as attn2 receives it) is
matched against the embedding of every sub-prompt and negative prompt of the run, so a wrong
cond/uncond or image assignment cannot hide behind the plan that made it. Also here: fp16 /
bf16 UNets, and SDXL's calling convention on a stand-in (sgm itself is not installable).
"""

import contextlib
import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from charadapter import hooks as hooks_module
from charadapter import overlays as ca_overlays
from charadapter import reference as core_reference
from charadapter.errors import CharacterAdapterError
from charadapter.fusion import COND, UNCOND
from charadapter.layers import find_attn2_layers
from charadapter.webui import caches as ca_caches
from charadapter.webui import reference_pass as ca_reference_pass
from charadapter.webui import rows as ca_rows
from webui_host import (args_for, errors, generate, make_sd_model, ours, pixels, plain, processing,
                        script_callbacks, sd_models, shared, start_host)
from tiny_sd import TINY_CONTEXT_DIM

PHRASES = ("face", "upper body", "lower body")  # the default regions' generation phrases


# ---------------------------------------------------------------- what each UNet call got


class Rows:
    """Per UNet call, at its first attn2 (after every hook of ours ran its pre-hook): the rows'
    contexts, the token set each row got (COND / UNCOND) and the plan rows they were matched to."""

    def __init__(self, sd_model, script):
        self.controller = script.hooks.controller
        self.layer = find_attn2_layers(sd_model.model.diffusion_model)[0].module
        self.calls = []
        self._corrections = (None, 0)
        self._handle = self.layer.register_forward_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs, output):
        gen = self.controller.generation
        fusion = gen.fusion if gen is not None else None
        if fusion is None or not fusion.installed:
            return  # the reference pass, before sampling
        state = fusion.state
        mark = gen.row_check
        count = mark.corrected_calls if mark is not None else 0
        corrected = count > (self._corrections[1] if self._corrections[0] is mark else 0)
        self._corrections = (mark, count)
        self.calls.append(dict(
            context=kwargs["context"].detach().float().clone(), enabled=state.enabled,
            rows=list(state.rows) if state.enabled else None, plan=fusion.plan,
            plan_rows=list(fusion._call_rows),  # FusionSession's match of this call's rows to the plan
            in_window=fusion.in_window, weights=float(state.weights.abs().sum()),
            maps=state.token_groups is not None, layout=fusion.masks is not None, corrected=corrected))

    def close(self):
        self._handle.remove()


@contextlib.contextmanager
def recording(sd_model, script):
    rows = Rows(sd_model, script)
    try:
        yield rows
    finally:
        rows.close()


def embeddings(sd_model, texts):
    with torch.no_grad():
        conds = {text: sd_model.get_learned_conditioning([text]) for text in texts}
    return {t: (c["crossattn"] if isinstance(c, dict) else c)[0].float() for t, c in conds.items()}


def identify(row, known):
    """The one text whose embedding starts `row` (AND rows are padded by repeating their last token)."""
    found = [t for t, e in known.items() if row.shape[0] >= e.shape[0] and torch.allclose(row[:e.shape[0]], e, atol=1e-5)]
    assert len(found) == 1, f"row matches {found}"
    return found[0]


def expected_groups(sd_model, text):
    """Positions of each phrase in the host's chunks, found here without charadapter.tokens."""
    chunks, _ = sd_model.cond_stage_model.process_texts([text])
    flat = [t for chunk in chunks[0] for t in chunk.tokens]
    groups = []
    for phrase in PHRASES:
        ids = list(sd_model.cond_stage_model.tokenize([phrase])[0])
        starts = [i for i in range(len(flat) - len(ids) + 1) if flat[i:i + len(ids)] == ids]
        groups.append(tuple(sorted({s + k for s in starts for k in range(len(ids))})))
    return tuple(groups)


def check_rows(rec, sd_model, prompts, negatives):
    """Every row of every recorded call: right token set, right image, right phrase positions in
    each image's first AND part and none in the others (a call whose rows cond_mark corrected was
    not in the plan: only its token sets count)."""
    subprompts = {i: [s.strip() for s in p.split(" AND ")] for i, p in enumerate(prompts)}
    texts = {t for subs in subprompts.values() for t in subs} | set(negatives)
    known = embeddings(sd_model, texts)
    images = {t: {i for i, subs in subprompts.items() if t in subs} for t in texts}
    uncond_image = {n: i for i, n in enumerate(negatives)}
    checked = 0
    for call in rec.calls:
        assert call["enabled"]
        for local, row in enumerate(call["plan_rows"]):
            text = identify(call["context"][local], known)
            if call["corrected"]:
                assert call["rows"][local] == (UNCOND if text in uncond_image else COND)
            elif text in uncond_image:
                assert call["rows"][local] == UNCOND and not call["plan"].is_cond[row]
                assert call["plan"].image[row] == uncond_image[text]
            else:
                assert call["rows"][local] == COND and call["plan"].is_cond[row]
                assert call["plan"].image[row] in images[text]
                plan = call["plan"]
                first_part = row == 0 or plan.image[row - 1] != plan.image[row]  # the layout reads AND part 1 only
                assert plan.token_groups[row] == (expected_groups(sd_model, text) if first_part else ())
            checked += 1
    return checked


def changed(a, b):
    return all((pixels(a, i) - pixels(b, i)).abs().max() > 0 for i in range(len(a.images)))


def no_errors():
    return not [m for _, m in errors.reported if "Character-Adapter" in m or "charadapter" in m]


# ---------------------------------------------------------------- layouts


@pytest.mark.parametrize("batch_cond_uncond", [True, False])
def test_and_prompts_with_two_images(host, sd_model, batch_cond_uncond):
    """Image 0 has 2 AND rows, image 1 has 3: rows c0a c0b c1a c1b c1c u0 u1; split calls of 2 rows
    (batch_cond_uncond off) mix cond and uncond rows."""
    runner, script = host
    shared.opts.batch_cond_uncond = batch_cond_uncond
    prompts = ["a face, upper body, lower body AND standing", "a face, upper body, lower body AND red AND blue"]
    negatives = ["blurry", "ugly"]
    kwargs = dict(prompt=prompts, negative_prompt=negatives, batch_size=2)
    before = plain(runner, script, **kwargs)
    with recording(sd_model, script) as rec:
        p, processed = generate(script, runner, **kwargs)
    assert [c["context"].shape[0] for c in rec.calls] == ([7, 7] if batch_cond_uncond else [2, 2, 2, 1] * 2)
    assert check_rows(rec, sd_model, prompts, negatives) == 14
    assert all(c["plan"].image == (0, 0, 1, 1, 1, 0, 1) for c in rec.calls)
    assert not [c for c in p.comments if "not in the prompt" in c]  # the first AND parts hold every phrase
    assert changed(processed, before) and no_errors()
    assert ours(sd_model.model.diffusion_model) == 0


@pytest.mark.parametrize("layout", ["skip early cfg", "ngms"])
def test_cond_only_unet_calls(host, sd_model, layout):
    """Skip Early CFG / NGMS drop the uncond rows after on_cfg_denoiser: the UNet gets cond rows only."""
    runner, script = host
    kwargs = dict(batch_size=2, negative_prompt=["blurry", "ugly"], steps=4)
    if layout == "ngms":
        kwargs["s_min_uncond"] = 100.0  # above every sigma: odd steps skip the uncond rows
    else:
        shared.opts.skip_early_cond = 0.5  # steps 0..2 of 4
    before = plain(runner, script, **kwargs)
    with recording(sd_model, script) as rec:
        p, processed = generate(script, runner, **kwargs)
    sizes = [c["context"].shape[0] for c in rec.calls]
    assert sizes == ([4, 2, 4, 2] if layout == "ngms" else [2, 2, 2, 4])
    assert ("NGMS" if layout == "ngms" else "Skip Early CFG") in p.extra_generation_params
    prompt = "a face, upper body, lower body, standing"
    assert check_rows(rec, sd_model, [prompt, prompt], kwargs["negative_prompt"]) == sum(sizes)
    assert all(c["in_window"] and c["weights"] > 0 for c in rec.calls)  # the term is added on cond-only calls
    assert changed(processed, before) and no_errors()
    assert ours(sd_model.model.diffusion_model) == 0


def test_batch_count_two_draws_the_layout_over_the_last_batch(host, sd_model, monkeypatch):
    """The layout at postprocess is the last batch's: Show masks draws it over that batch's images."""
    runner, script = host
    drawn = []
    original = ca_overlays.mask_overlay
    monkeypatch.setattr(ca_overlays, "mask_overlay", lambda image, labels, **kw: drawn.append(image.copy()) or original(image, labels, **kw))
    with recording(sd_model, script) as rec:
        p, processed = generate(script, runner, n_iter=2, steps=2, negative_prompt="blurry", params=dict(show_masks=True))
    assert len(processed.images) == 4  # 2 batches of 1, the reference overlay, one layout
    assert len(drawn) == 1 and torch.equal(pixels(processed, 1), torch.from_numpy(np.asarray(drawn[0], dtype=np.float32)))
    assert check_rows(rec, sd_model, ["a face, upper body, lower body, standing"], ["blurry"]) == 8
    assert ours(sd_model.model.diffusion_model) == 0


LONG = "a face, " + "red " * 80 + "upper body, lower body"
BREAK = "a face BREAK (upper body:1.3), lower body"


@pytest.mark.parametrize("prompt, groups", [
    # chunk 0: a face , red x72 | chunk 1 (positions from 77): BOS red x8 upper body , lower body
    (LONG, ((2,), (86, 87), (89, 90))),
    # BREAK closes chunk 0 after "a face"; emphasis changes values, not positions
    (BREAK, ((2,), (78, 79), (81, 82))),
])
def test_long_prompts_break_and_emphasis(host, sd_model, prompt, groups):
    """154-token conds against a 77-token uncond: one cond call, then one uncond call (HOST_NOTES §7)."""
    runner, script = host
    before = plain(runner, script, prompt=prompt, negative_prompt="blurry")
    with recording(sd_model, script) as rec:
        p, processed = generate(script, runner, prompt=prompt, negative_prompt="blurry")
    assert [tuple(c["context"].shape[:2]) for c in rec.calls] == [(1, 154), (1, 77)] * 2
    assert expected_groups(sd_model, prompt) == groups
    assert check_rows(rec, sd_model, [prompt], ["blurry"]) == 4
    assert rec.calls[0]["maps"] and rec.calls[2]["layout"]  # maps from the cond call made a layout
    assert changed(processed, before) and no_errors()
    assert ours(sd_model.model.diffusion_model) == 0


# ---------------------------------------------------------------- calls outside the plan, cond_mark


def txt2img(runner, script, **kwargs):
    args = dict(prompt="a face, upper body, lower body, standing", negative_prompt=["blurry", "ugly"],
                batch_size=2, steps=2, width=64, height=64, sampler_name="Euler", seed=7)
    args.update(kwargs)
    p = processing.StableDiffusionProcessingTxt2Img(**args)
    p.scripts = runner
    p.script_args = args_for(script)
    return p


@pytest.mark.parametrize("controlnet", [True, False])
def test_an_extra_unet_call_gets_its_rows_from_the_rows_themselves(host, sd_model, controlnet):
    """Self-Attention Guidance (AG-w/sd_webui_SAG scripts/SAG.py) runs the UNet once more per step,
    from on_cfg_denoised, on the uncond rows: the plan has no such call. With ControlNet its fresh
    cond_mark says they are uncond; without it, their text context does."""
    from controlnet_double import ControlNetDouble

    runner, script = host
    unet = sd_model.model.diffusion_model
    step = {}
    script_callbacks.on_cfg_denoiser(lambda params: step.update(params=params))

    def extra_call(denoised):  # what SAG's denoised_callback does
        params = step["params"]
        cond = {"c_crossattn": [params.text_uncond], "c_concat": [params.image_cond[-2:]]}
        denoised.inner_model(params.x[-2:], params.sigma[-2:], cond=cond)

    script_callbacks.on_cfg_denoised(extra_call)
    p = txt2img(runner, script)
    cn = ControlNetDouble()
    if controlnet:
        cn.hook(p, unet)
    try:
        with recording(sd_model, script) as rec:
            processing.process_images(p)
    finally:
        cn.restore()
    assert [c["context"].shape[0] for c in rec.calls] == [4, 2, 4, 2]
    assert [c["corrected"] for c in rec.calls] == [False, True, False, True]  # the extra calls
    prompt = "a face, upper body, lower body, standing"
    assert check_rows(rec, sd_model, [prompt, prompt], ["blurry", "ugly"]) == 12
    assert [c["maps"] for c in rec.calls] == [True, False, True, False]  # no maps from rows of unknown prompt
    assert ours(unet) == 0 and "_original_forward" not in unet.__dict__ and no_errors()


def test_controlnet_hires_pass_with_unmarked_conds(host, sd_model):
    """ControlNet marks hr_c / hr_uc only if they exist when sampling starts; the hires pass computes
    them later, so its cond_mark is all ones (unmark_prompt_context of unmarked rows): not evidence."""
    from controlnet_double import ControlNetDouble

    runner, script = host
    unet = sd_model.model.diffusion_model
    p = txt2img(runner, script, steps=1, enable_hr=True, hr_scale=2, hr_upscaler="Latent", hr_second_pass_steps=1)
    cn = ControlNetDouble()
    cn.hook(p, unet)
    marks = []
    script_callbacks.on_cfg_denoised(lambda params: marks.append(unet.cond_mark.flatten().tolist()))
    try:
        with recording(sd_model, script) as rec:
            processing.process_images(p)
    finally:
        cn.restore()
    assert marks == [[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]]  # first pass, hires pass
    assert [tuple(c["context"].shape[:2]) for c in rec.calls] == [(4, 77), (4, 77)]
    assert not any(c["corrected"] for c in rec.calls)
    prompt = "a face, upper body, lower body, standing"
    assert check_rows(rec, sd_model, [prompt, prompt], ["blurry", "ugly"]) == 8
    assert ours(unet) == 0 and no_errors()


def test_a_stale_cond_mark_is_not_trusted(host, sd_model):
    """ControlNet never deletes cond_mark: one left from an earlier run (here claiming every row is
    uncond, with the batch size of the next calls) must change nothing."""
    runner, script = host
    unet = sd_model.model.diffusion_model
    before = processing.process_images(txt2img(runner, script))
    unet.cond_mark = torch.zeros(4, 1, 1, 1)
    try:
        with recording(sd_model, script) as rec:
            after = processing.process_images(txt2img(runner, script))
    finally:
        del unet.cond_mark
    assert all(c["rows"] == [COND, COND, UNCOND, UNCOND] for c in rec.calls)
    assert all(torch.equal(pixels(after, i), pixels(before, i)) for i in range(2))
    assert ours(unet) == 0


class MarkingUNet(nn.Module):
    """A UNet whose forward does what ControlNet's replacement does: with a marker token row in
    front of the text rows, strip it and set cond_mark; unmarked rows give a cond_mark of ones."""

    class Attn2(nn.Module):
        def forward(self, x, context=None):
            return x

    def __init__(self):
        super().__init__()
        self.attn2 = self.Attn2()

    def forward(self, x, context=None, mark=None):
        if mark is not None:  # a marked context
            self.cond_mark, context = mark.reshape(-1, 1, 1, 1), context[:, 1:]
        elif "_original_forward" in self.__dict__:  # ControlNet on, text rows unmarked
            self.cond_mark = torch.ones(x.shape[0], 1, 1, 1)
        return self.attn2(x, context=context)


def test_row_check_prefers_a_fresh_cond_mark_then_the_text_rows():
    from types import SimpleNamespace

    unet = MarkingUNet()
    state = SimpleNamespace(enabled=True, rows=None, batch=2, token_groups=[(1,)], planned=False)
    check = ca_rows.RowCheck(unet, [SimpleNamespace(module=unet.attn2, name="attn2")], state).install()
    cond, uncond = torch.randn(2, 77, 8), torch.randn(2, 77, 8)
    context = torch.cat([cond[:1], uncond[1:]])  # the rows say: cond, uncond
    marked = torch.cat([torch.full((2, 1, 8), 1024.0), context], dim=1)
    x = torch.zeros(2, 4, 8)
    try:
        check.begin_step(cond, uncond)
        state.rows = (COND, COND)
        unet(x, context=marked, mark=torch.tensor([0.0, 1.0]))  # a fresh mark wins over the text rows
        assert list(state.rows) == [UNCOND, COND] and state.token_groups is None and check.corrected_calls == 1
        state.rows, state.token_groups = (COND, COND), [(1,)]
        unet(x, context=context)  # the mark left from the last call is stale: the text rows decide
        assert list(state.rows) == [COND, UNCOND] and check.corrected_calls == 2
        unet(x, context=context)  # plan and rows agree: nothing to correct
        assert check.corrected_calls == 2
        unet.__dict__["_original_forward"] = None
        state.rows = (COND, UNCOND)
        unet(x, context=context)  # fresh, but from unmarked rows (ControlNet's hires pass): all ones, ignored
        assert unet.cond_mark.flatten().tolist() == [1.0, 1.0] and list(state.rows) == [COND, UNCOND]
        check.begin_step(cond, cond)  # prompt == negative: rows like both tell nothing
        state.rows = (UNCOND, UNCOND)
        unet(x, context=torch.cat([cond[:1], cond[1:]]))
        assert list(state.rows) == [UNCOND, UNCOND] and check.corrected_calls == 2
        check.begin_step(cond, uncond)
        state.rows, state.planned = (UNCOND, UNCOND), True  # the step's whole batch in plan order: trusted,
        unet(x, context=context)  # not read back (a device sync) even where the rows would disagree
        assert list(state.rows) == [UNCOND, UNCOND] and check.corrected_calls == 2
    finally:
        check.remove()
    assert ours(unet) == 0


# ---------------------------------------------------------------- half precision


def half_unet(sd_model, dtype):
    """The UNet in `dtype` as the WebUI runs it under autocast; GroupNorm stays float32, which CUDA
    autocast does by itself and CPU autocast does not (its group_norm refuses mixed dtypes)."""
    unet = sd_model.model.diffusion_model
    unet.to(dtype)
    unet.dtype = dtype
    for module in unet.modules():
        if isinstance(module, nn.GroupNorm):
            module.float()


@contextlib.contextmanager
def hosted(sd_model, tmp_path, monkeypatch):
    started = start_host(sd_model, tmp_path, monkeypatch)
    try:
        yield next(started)
    finally:
        next(started, None)


def cpu_runs_under_autocast(dtype: torch.dtype) -> bool:
    """Whether this torch autocasts the CPU to `dtype` and has its matmul (float16: not torch 2.1)."""
    try:
        with torch.autocast("cpu", dtype=dtype):
            torch.nn.functional.linear(torch.ones(1, 2, dtype=dtype), torch.ones(1, 2, dtype=dtype))
    except RuntimeError:
        return False
    return True


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_unet(tmp_path, monkeypatch, dtype):
    """Our term follows the host's dtype: no dtype errors, attn2 outputs stay half and finite (the
    mask maths runs in float32 even under the sampler's autocast), the image changes."""
    from modules import devices

    if not cpu_runs_under_autocast(dtype):
        pytest.skip(f"torch {torch.__version__} runs no {dtype} model on the CPU")
    model = make_sd_model()
    half_unet(model, dtype)
    for name in ("dtype", "dtype_unet", "dtype_inference"):
        monkeypatch.setattr(devices, name, dtype)
    deltas, outputs, handles = [], set(), []
    original_term = hooks_module.add_region_term

    def spy_term(out, q, *args, **kwargs):
        result = original_term(out, q, *args, **kwargs)
        deltas.append((q.dtype, result.dtype))
        return result

    def watch_outputs(params):  # registered after our hooks: sees what they returned
        if not handles:
            for layer in find_attn2_layers(model.model.diffusion_model):
                handles.append(layer.module.register_forward_hook(
                    lambda m, a, out: outputs.add((out.dtype, bool(torch.isfinite(out).all())))))

    monkeypatch.setattr(hooks_module, "add_region_term", spy_term)
    with hosted(model, tmp_path, monkeypatch) as (runner, script):
        before = plain(runner, script)
        script_callbacks.on_cfg_denoiser(watch_outputs)
        try:
            _, processed = generate(script, runner)
        finally:
            for handle in handles:
                handle.remove()
        assert no_errors()
    assert deltas and set(deltas) == {(dtype, dtype)}
    assert outputs == {(dtype, True)}
    assert changed(processed, before)
    assert ours(model.model.diffusion_model) == 0


# ---------------------------------------------------------------- SDXL calling convention (stand-in)


class SgmCrossAttention(nn.Module):
    """Mixin for ldm's CrossAttention with sgm's forward signature (sgm/modules/attention.py)."""

    calls_with_extra_kwargs = 0

    def forward(self, x, context=None, mask=None, additional_tokens=None, n_times_crossframe_attn_in_self=0):
        SgmCrossAttention.calls_with_extra_kwargs += 1
        return super().forward(x, context=context, mask=mask)


class SgmBlock(nn.Module):
    """Mixin for ldm's BasicTransformerBlock that calls attn2 the way sgm's does."""

    def forward(self, x, context=None, additional_tokens=None, n_times_crossframe_attn_in_self=0):
        x = self.attn1(self.norm1(x), context=context if self.disable_self_attn else None,
                       additional_tokens=additional_tokens) + x
        x = self.attn2(self.norm2(x), context=context, additional_tokens=additional_tokens) + x
        return self.ff(self.norm3(x)) + x


class OpenAIWrapper(nn.Module):
    """sgm/modules/diffusionmodules/wrappers.py (OpenAIWrapper): the dict cond becomes keyword arguments."""

    conditioning_key = "crossattn"  # set by sd_models_xl.extend_sdxl

    def __init__(self, diffusion_model):
        super().__init__()
        self.diffusion_model = diffusion_model

    def forward(self, x, t, c):
        x = torch.cat((x, *c.get("concat", [])), dim=1)
        return self.diffusion_model(x, timesteps=t, context=c.get("crossattn"), y=c.get("vector"))


class TinySDXL(nn.Module):
    """What the extension sees of an SDXL DiffusionEngine after the WebUI's sd_models_xl patches:
    dict conditioning {"crossattn", "vector"}, apply_model -> OpenAIWrapper, a scaled-latent VAE.
    The tokenizer side is the first embedder's (CLIP-L) as in sd_models_xl; widths are tiny."""

    cond_stage_key = "txt"

    def __init__(self, ldm_model):
        super().__init__()
        unet = ldm_model.model.diffusion_model
        width = unet.time_embed[-1].out_features
        gen = torch.Generator().manual_seed(11)
        unet.num_classes = "sequential"  # SDXL's UNet takes the vector as y through label_emb
        unet.label_emb = nn.Sequential(nn.Sequential(nn.Linear(TINY_CONTEXT_DIM, width), nn.SiLU(), nn.Linear(width, width)))
        with torch.no_grad():
            for p in unet.label_emb.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
        for module in list(unet.modules()):
            if type(module).__name__ == "BasicTransformerBlock":
                module.__class__ = type("SgmBasicTransformerBlock", (SgmBlock, type(module)), {})
                for attn in (module.attn1, module.attn2):
                    attn.__class__ = type("SgmCrossAttention", (SgmCrossAttention, type(attn)), {})
        self.ldm = ldm_model
        self.model = OpenAIWrapper(unet)
        self.cond_stage_model = ldm_model.cond_stage_model
        self.register_buffer("alphas_cumprod", ldm_model.alphas_cumprod.clone())
        self.latent_channels = 4

    def get_learned_conditioning(self, batch):  # sd_models_xl.get_learned_conditioning
        crossattn = self.cond_stage_model(batch)
        return {"crossattn": crossattn, "vector": crossattn.mean(dim=1)}

    def apply_model(self, x, t, cond):  # sd_models_xl.apply_model (no 9-channel UNet here)
        return self.model(x, t, cond)

    def encode_first_stage(self, x):  # sgm's DiffusionEngine.encode_first_stage: scaled
        return self.ldm.scale_factor * self.ldm.encode_first_stage(x).mode()

    def get_first_stage_encoding(self, x):  # sd_models_xl: identity
        return x

    def decode_first_stage(self, z):
        return self.ldm.decode_first_stage(z)


def test_sdxl_calling_convention(tmp_path, monkeypatch):
    """Dict conds, attn2 with extra keyword arguments, the SDXL reference size and arch check."""
    model = make_sd_model()
    sizes = []
    original_size = core_reference.pass_size
    monkeypatch.setattr(core_reference, "pass_size", lambda size, area, **kw: sizes.append(area) or original_size(size, area, **kw))
    with hosted(model, tmp_path, monkeypatch) as (runner, script):
        xl = sd_models.register_model(TinySDXL(model), arch="sdxl")  # the text encoder stays hijacked
        monkeypatch.setitem(ca_reference_pass.PASS_AREA, "sdxl", 64 * 128)
        monkeypatch.setitem(ca_reference_pass.PASS_AREA, "sd15", 128 * 128)
        sd15 = ca_caches.ADAPTER_CACHE.get("tiny-adapter")
        spec = dataclasses.replace(sd15.spec, arch="sdxl", variant="sdxl", encoder="ViT-bigG-14")
        ca_caches.ADAPTER_CACHE.put("tiny-adapter", dataclasses.replace(sd15, spec=spec))
        before = plain(runner, script, negative_prompt="blurry")
        SgmCrossAttention.calls_with_extra_kwargs = 0
        with recording(xl, script) as rec:
            p, processed = generate(script, runner, negative_prompt="blurry")
        assert no_errors() and SgmCrossAttention.calls_with_extra_kwargs > 0
        assert sizes == [64 * 128]
        prompt = "a face, upper body, lower body, standing"
        assert check_rows(rec, xl, [prompt], ["blurry"]) == 4
        assert changed(processed, before)
        assert ours(xl.model.diffusion_model) == 0
        ca_caches.ADAPTER_CACHE.put("tiny-adapter", sd15)
        ca_caches.SEGMENTATION_CACHE.clear()
        with pytest.raises(CharacterAdapterError, match="SD15 adapter but the loaded checkpoint is SDXL"):
            generate(script, runner)


def test_sdxl_locates_regions_the_prompt_does_not_name(tmp_path, monkeypatch):
    """SDXL's dict conditioning: the phrase rows come from "crossattn" (both encoders' channels)."""
    from charadapter import fusion as ca_fusion
    from charadapter.webui import prompts as ca_prompts

    model = make_sd_model()
    seen = []
    original_remove = ca_fusion.FusionSession.remove
    monkeypatch.setattr(ca_fusion.FusionSession, "remove",
                        lambda self: seen.append((self.masks, self.state.bank)) or original_remove(self))
    with hosted(model, tmp_path, monkeypatch) as (runner, script):
        xl = sd_models.register_model(TinySDXL(model), arch="sdxl")
        monkeypatch.setitem(ca_reference_pass.PASS_AREA, "sdxl", 64 * 128)
        sd15 = ca_caches.ADAPTER_CACHE.get("tiny-adapter")
        spec = dataclasses.replace(sd15.spec, arch="sdxl", variant="sdxl", encoder="ViT-bigG-14")
        ca_caches.ADAPTER_CACHE.put("tiny-adapter", dataclasses.replace(sd15, spec=spec))
        prompt = "a knight riding a horse at dusk"
        before = plain(runner, script, prompt=prompt)
        p, processed = generate(script, runner, prompt=prompt, steps=3)
        assert no_errors()
        assert p.extra_generation_params["Character-Adapter located"] == (
            "face: from the phrase, upper body: from the phrase, lower body: from the phrase")
        (masks, bank), = seen
        with torch.no_grad():
            upper = xl.get_learned_conditioning(["upper body"])["crossattn"][0]  # (77, C)
        assert torch.equal(bank[1:3], upper[1:3].float())  # face is one token, then upper body's two
        regions = masks[:, 1:]
        assert ((regions.amax(dim=2) - regions.amin(dim=2)) > 0.3).all()
        assert changed(processed, before)
        assert ours(xl.model.diffusion_model) == 0
        ca_caches.ADAPTER_CACHE.put("tiny-adapter", sd15)
        assert ca_prompts.phrase_token_count(xl, "face") == 1
