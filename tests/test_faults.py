"""Fault injection (issue 5.2): a failure at any stage of a generation leaves nothing behind.

Through the Script in the WebUI test double on the real tiny ldm model, an exception is raised
at each stage: model loading, encoding, segmentation, the first sampling step, mid-sampling
(from the host's attn2 and from our own hook), the hires pass, our per-step callback,
postprocess; then an interrupt / skip, and a model swap between runs and at the hires pass.
After each, right away (no later run start to tidy up):

- no hook of ours on any UNet, the Controller holds no generation, and every FusionSession and
  its key/value tensors are gone after gc (only the bounded caches may keep tensors);
- the next plain generation is bit-identical to the one a separate Python process makes, which
  never imported the extension (computed once, in parallel with the first tests).
"""

import gc
import json
import os
import subprocess
import sys
import weakref

import numpy as np
import pytest
import torch

from charadapter import overlays as ca_overlays
from charadapter.cache import BoundedCache
from charadapter.errors import CharacterAdapterError
from charadapter.layers import find_attn2_layers
from charadapter.webui import caches as ca_caches
from charadapter.webui import controller as ca_controller
from charadapter.webui import reference_pass as ca_reference_pass
from tiny_sd import make_tiny_sd
from webui_host import (ROOT, args_for, errors, ours, plain, processing, sd_models, shared)

# the plain generation compared with the fresh process (same values as webui_host.plain's defaults)
PLAIN = dict(prompt="a face, upper body, lower body, standing", negative_prompt="", batch_size=1, steps=2,
             width=64, height=64, sampler_name="Euler", seed=7)
SEED_A, SEED_B = 3, 11  # webui_host.make_sd_model is make_tiny_sd(seed=3)
_REAL_DECODE = processing.decode_latent_batch

_FRESH = r"""
import json, os, sys
import numpy as np, torch
root, out, threads, plain = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
torch.set_num_threads(threads)
sys.path[:0] = [os.path.join(root, "tests"), os.path.join(root, "tests", "webui_double")]
from modules import paths, processing, sd_models, shared
from tiny_sd import make_tiny_sd
paths.set_data_path(out)
shared.reset_for_tests()
images = {}
for name, seed in (("a", int(sys.argv[5])), ("b", int(sys.argv[6]))):
    sd_models.register_model(make_tiny_sd(seed=seed))
    p = processing.StableDiffusionProcessingTxt2Img(**plain)
    images[name] = np.asarray(processing.process_images(p).images[0])
assert not any(name.startswith("charadapter") for name in sys.modules), "the extension was imported"
np.savez(os.path.join(out, "plain.npz"), **images)
"""


class _Fresh:
    """The plain images of a process that never imported the extension, started early."""

    def __init__(self, folder):
        self.folder = str(folder)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _FRESH, ROOT, self.folder, str(torch.get_num_threads()), json.dumps(PLAIN),
             str(SEED_A), str(SEED_B)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self._images = None

    def __getitem__(self, name):
        if self._images is None:
            output, _ = self.proc.communicate(timeout=300)
            assert self.proc.returncode == 0, output
            with np.load(os.path.join(self.folder, "plain.npz")) as data:
                self._images = {k: data[k] for k in data.files}
        return self._images[name]


@pytest.fixture(scope="module", autouse=True)
def fresh(tmp_path_factory):
    """Started before the module's models are built, so both run side by side."""
    runner = _Fresh(tmp_path_factory.mktemp("fresh"))
    yield runner
    if runner.proc.poll() is None:
        runner.proc.kill()
        runner.proc.communicate()


@pytest.fixture(scope="module")
def model_b():
    return make_tiny_sd(seed=SEED_B)


@pytest.fixture
def spy(monkeypatch):
    """Weak references to every Generation, FusionSession and key/value tensor the run makes."""
    refs = []

    class SpyGeneration(ca_controller.Generation):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            refs.append(weakref.ref(self))

    class SpyFusion(ca_controller.FusionSession):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            refs.append(weakref.ref(self))
            refs.extend(weakref.ref(t) for pair in self.state.kv for t in pair)

    monkeypatch.setattr(ca_controller, "Generation", SpyGeneration)
    monkeypatch.setattr(ca_controller, "FusionSession", SpyFusion)
    return refs


_PROBES = []  # handles of the test's own hooks; removed before the plain generation is compared


def _remove_probes():
    while _PROBES:
        _PROBES.pop().remove()


@pytest.fixture
def probes():
    """Add a test-owned hook (not ours: no marker) that counts or breaks UNet calls."""
    def add(module, hook, pre=False):
        _PROBES.append(module.register_forward_pre_hook(hook) if pre else module.register_forward_hook(hook))

    yield add
    _remove_probes()


def attempt(script, runner, **kwargs):
    """One txt2img generation with the adapter on: (p, processed, error)."""
    overrides = kwargs.pop("params", {})
    args = dict(PLAIN)
    args.update(kwargs)
    p = processing.StableDiffusionProcessingTxt2Img(**args)
    p.scripts = runner
    p.script_args = args_for(script, **overrides)
    try:
        return p, processing.process_images(p), None
    except Exception as error:  # noqa: BLE001 - the test inspects it
        error.__traceback__ = None  # frames of the failed run must not keep its tensors alive
        return p, None, error


def runtime_caches():
    """Every bounded cache of the extension (webui/caches.py), by name."""
    return {name: cache for name, cache in vars(ca_caches).items() if isinstance(cache, BoundedCache)}


def sampling_calls(x):
    """UNet calls of sampling (cond + uncond rows), not the one-row reference segmentation pass."""
    return x.shape[0] == 2


def assert_nothing_left(script, refs, *models):
    controller = script.hooks.controller
    assert controller.generation is None
    assert controller.error is None and controller._error_hooks is None
    for model in models:
        assert ours(model.model.diffusion_model) == 0
    gc.collect()
    alive = [r() for r in refs if r() is not None]
    assert not alive, f"{len(alive)} objects of the failed run are still referenced: {[type(a).__name__ for a in alive]}"


def assert_plain_is_fresh(runner, script, fresh, name="a"):
    _remove_probes()
    image = np.asarray(plain(runner, script, **PLAIN).images[0])
    assert np.array_equal(image, fresh[name]), "the plain image differs from a process that never used the extension"


# ---- before sampling: models, encoder, segmentation -----------------------------------------


def _fail(message):
    def raise_(*args, **kwargs):
        raise RuntimeError(message)
    return raise_


STAGES = ["load_ip_adapter", "load_clip_vision", "encode", "segment_reference", "segmentation_unet"]


@pytest.mark.parametrize("stage", STAGES)
def test_fault_while_preparing_stops_the_run_and_leaves_nothing(host, sd_model, spy, probes, monkeypatch, fresh,
                                                                  stage):
    runner, script = host
    resolved = {"adapter": "tiny-adapter", "encoder": "tiny-encoder"}
    if stage == "load_ip_adapter":
        resolved["adapter"] = "unreadable-adapter"  # not in the cache: the loader runs
        monkeypatch.setattr(ca_reference_pass, "load_ip_adapter", _fail("injected fault: adapter file unreadable"))
    elif stage == "load_clip_vision":
        resolved["encoder"] = "unreadable-encoder"
        monkeypatch.setattr(ca_reference_pass, "load_clip_vision", _fail("injected fault: encoder file unreadable"))
    elif stage == "encode":
        monkeypatch.setattr(ca_reference_pass.RegionEncoder, "encode", _fail("injected fault: CLIP encoding"))
    elif stage == "segment_reference":
        monkeypatch.setattr(ca_reference_pass, "segment_reference", _fail("injected fault: segmentation"))
    else:  # inside the UNet, while the segmentation pass's hooks are on it
        def break_segmentation(module, args, output):
            if args[0].shape[0] == 1:
                raise RuntimeError("injected fault: segmentation pass")
        probes(sd_model.model.diffusion_model.middle_block, break_segmentation)
    monkeypatch.setattr(script.hooks.controller, "resolve_model", lambda kind, name: resolved[kind])
    completed = []
    probes(sd_model.model.diffusion_model, lambda module, args, output: completed.append(args[0].shape[0]))
    for name, cache in runtime_caches().items():
        if name not in ("ADAPTER_CACHE", "ENCODER_CACHE"):  # the host's tiny weights stay
            cache.clear()  # a cached reference would skip the stage under test
    cached = {name: set(cache._items) for name, cache in runtime_caches().items()}

    p, processed, error = attempt(script, runner)

    # the run stops with the cause, instead of going on silently without the adapter
    assert isinstance(error, CharacterAdapterError), repr(error)
    assert "injected fault" in str(error) and str(error).startswith("Character-Adapter")
    assert any("injected fault" in comment for comment in p.comments)
    assert not [rows for rows in completed if rows == 2], "a sampling step ran"
    # nothing half-made is cached; only a finished segmentation may stay when the image encoder failed
    # after it (it is loaded after the UNet pass, so the two never share memory)
    grown = {name: set(cache._items) - cached[name] for name, cache in runtime_caches().items()}
    assert {name: keys for name, keys in grown.items() if keys} == {} or (
        stage in ("encode", "load_clip_vision")
        and set(n for n, keys in grown.items() if keys) == {"SEGMENTATION_CACHE"}), grown
    assert_nothing_left(script, spy, sd_model)
    assert_plain_is_fresh(runner, script, fresh)


# ---- during sampling ---------------------------------------------------------------------------


def _break_at_sampling_call(probes, sd_model, call, where):
    """Raise at the `call`-th sampling UNet call, from the UNet itself or one attn2's forward hook."""
    unet = sd_model.model.diffusion_model
    seen = []

    def count(module, args):
        if sampling_calls(args[0]):
            seen.append(tuple(args[0].shape[-2:]))

    def breaker(*_):
        if len(seen) == call:
            raise RuntimeError(f"injected fault: sampling call {call}")

    probes(unet, count, pre=True)
    if where == "unet":
        probes(unet.input_blocks[1], breaker)
    else:
        probes(find_attn2_layers(unet)[3].module, breaker)
    return seen


@pytest.mark.parametrize("call, where", [(1, "unet"), (2, "attn2")], ids=["first-step", "mid-sampling"])
def test_fault_during_sampling_leaves_nothing(host, sd_model, spy, probes, fresh, call, where):
    runner, script = host
    _break_at_sampling_call(probes, sd_model, call, where)
    _, processed, error = attempt(script, runner, steps=3)
    assert isinstance(error, RuntimeError) and f"sampling call {call}" in str(error)
    assert len(spy) > 2, "the run did not reach sampling"
    assert_nothing_left(script, spy, sd_model)
    assert_plain_is_fresh(runner, script, fresh)


def test_fault_in_our_own_hook_leaves_nothing(host, sd_model, spy, probes, monkeypatch, fresh):
    runner, script = host
    from charadapter import hooks

    real, calls = hooks.add_region_term, []
    probes(sd_model.model.diffusion_model, lambda module, args: calls.append(sampling_calls(args[0])), pre=True)

    def failing(*args, **kwargs):
        if sum(calls) == 2:  # in the second sampling step
            raise torch.cuda.OutOfMemoryError("injected fault: out of memory in the region term")
        return real(*args, **kwargs)

    monkeypatch.setattr(hooks, "add_region_term", failing)
    _, _, error = attempt(script, runner, steps=3)
    assert isinstance(error, torch.cuda.OutOfMemoryError), repr(error)
    assert_nothing_left(script, spy, sd_model)
    assert_plain_is_fresh(runner, script, fresh)


def test_fault_in_the_hires_pass_leaves_nothing(host, sd_model, spy, probes, fresh):
    runner, script = host
    unet = sd_model.model.diffusion_model
    latents = []

    def breaker(module, args, output):
        if latents[-1] == (16, 16):  # the hires latent; the first pass is 8x8
            raise RuntimeError("injected fault: hires pass")

    probes(unet, lambda module, args: latents.append(tuple(args[0].shape[-2:])), pre=True)
    probes(unet.output_blocks[2], breaker)
    _, _, error = attempt(script, runner, enable_hr=True, hr_scale=2, hr_upscaler="Latent", denoising_strength=0.6)
    assert isinstance(error, RuntimeError) and "hires pass" in str(error)
    assert latents.count((8, 8)) == PLAIN["steps"], "the first pass did not complete"
    assert_nothing_left(script, spy, sd_model)
    assert_plain_is_fresh(runner, script, fresh)


def test_fault_in_our_step_callback_stops_the_run(host, sd_model, spy, monkeypatch, fresh):
    """on_cfg_denoiser errors are swallowed by the host: sampling must not go on with a stale plan."""
    runner, script = host
    real, calls = ca_controller.row_plan, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected fault: row plan")
        return real(*args, **kwargs)

    monkeypatch.setattr(ca_controller, "row_plan", failing)
    _, _, error = attempt(script, runner, steps=3)
    assert isinstance(error, CharacterAdapterError) and "injected fault: row plan" in str(error), repr(error)
    assert_nothing_left(script, spy, sd_model)
    assert_plain_is_fresh(runner, script, fresh)


# ---- after sampling, interrupts ----------------------------------------------------------------


def test_fault_after_sampling_is_cleared_by_the_next_run_start(host, sd_model, spy, monkeypatch, fresh):
    """A VAE decode failure (out of memory, NaNs) comes after the last denoiser call, outside the
    guard, and the host skips postprocess: the next generation's start (every txt2img / img2img
    run calls our `process`, enabled or not) removes what is left before anything samples."""
    runner, script = host
    monkeypatch.setattr(processing, "decode_latent_batch", _fail("injected fault: VAE decode"))
    _, _, error = attempt(script, runner)
    assert isinstance(error, RuntimeError) and "VAE decode" in str(error)
    monkeypatch.setattr(processing, "decode_latent_batch", _REAL_DECODE)
    assert_plain_is_fresh(runner, script, fresh)
    assert_nothing_left(script, spy, sd_model)



def test_fault_in_postprocess_keeps_the_images_and_leaves_nothing(host, sd_model, spy, monkeypatch, fresh):
    runner, script = host
    monkeypatch.setattr(ca_overlays, "mask_overlay", _fail("injected fault: mask overlay"))
    _, processed, error = attempt(script, runner, params=dict(show_masks=True))
    assert error is None
    assert len(processed.images) == 1  # the generated image; the failed overlays are not added
    assert any("injected fault: mask overlay" in message for _, message in errors.reported)
    assert_nothing_left(script, spy, sd_model)
    assert_plain_is_fresh(runner, script, fresh)


@pytest.mark.parametrize("flag", ["interrupted", "skipped"])
def test_interrupt_mid_sampling_leaves_nothing(host, sd_model, spy, probes, fresh, flag):
    runner, script = host
    calls = []

    def press(module, args, output):  # the user presses Interrupt / Skip during the first step
        if sampling_calls(args[0]):
            calls.append(1)
            setattr(shared.state, flag, True)

    probes(sd_model.model.diffusion_model, press)
    try:
        _, processed, error = attempt(script, runner, steps=3, enable_hr=True, hr_scale=2, hr_upscaler="Latent")
    finally:
        shared.state.begin()  # what the UI does before the next job
    assert error is None and len(processed.images) == 1
    assert len(calls) == 1, "sampling went on after the interrupt"
    assert_nothing_left(script, spy, sd_model)
    assert_plain_is_fresh(runner, script, fresh)


# ---- model swaps -------------------------------------------------------------------------------


def test_model_swap_between_runs(host, sd_model, model_b, spy, probes, fresh):
    runner, script = host
    _, processed, error = attempt(script, runner)
    assert error is None
    sd_models.register_model(model_b)
    try:
        assert_plain_is_fresh(runner, script, fresh, "b")
        _break_at_sampling_call(probes, model_b, 1, "attn2")  # a crash on B ...
        _, _, error = attempt(script, runner)
        assert isinstance(error, RuntimeError)
        assert_nothing_left(script, spy, sd_model, model_b)
    finally:
        sd_models.register_model(sd_model)  # ... then back to A: B's hooks must not wait for a run on B
    assert_plain_is_fresh(runner, script, fresh, "a")
    sd_models.register_model(model_b)
    try:
        assert_plain_is_fresh(runner, script, fresh, "b")
    finally:
        sd_models.register_model(sd_model)


_UNSET = object()


def _swap_at_hires(monkeypatch, model, sdxl=False):
    """The hires pass loads another checkpoint (hr_checkpoint_name): only Txt2Img.sample calls
    reload_model_weights(info=...) (the per-batch call passes nothing), so that call swaps."""

    def reload(sd_model=None, info=_UNSET, forced_reload=False):
        if info is not _UNSET:
            sd_models.register_model(model)
            if sdxl:
                model.is_sd1, model.is_sdxl = False, True
        return shared.sd_model

    monkeypatch.setattr(sd_models, "reload_model_weights", reload)


def test_model_swap_at_the_hires_pass(host, sd_model, model_b, spy, monkeypatch, fresh):
    runner, script = host
    used = []
    real_install = ca_controller.FusionSession.install

    def install(self):
        used.append(self.unet)
        return real_install(self)

    monkeypatch.setattr(ca_controller.FusionSession, "install", install)
    _swap_at_hires(monkeypatch, model_b)
    try:
        _, processed, error = attempt(script, runner, enable_hr=True, hr_scale=2, hr_upscaler="Latent")
        assert error is None and len(processed.images) == 1
        assert shared.sd_model is model_b, "the double did not swap the model"
        assert [u is sd_model.model.diffusion_model for u in used] == [True, False]
        assert used[1] is model_b.model.diffusion_model  # the hires pass had the adapter, on B
        assert_nothing_left(script, spy, sd_model, model_b)
    finally:
        monkeypatch.undo()
        sd_models.register_model(sd_model)
    assert_plain_is_fresh(runner, script, fresh, "a")


def test_hires_checkpoint_of_another_family_stops_the_run(host, sd_model, model_b, spy, monkeypatch, fresh):
    runner, script = host
    _swap_at_hires(monkeypatch, model_b, sdxl=True)
    try:
        _, _, error = attempt(script, runner, enable_hr=True, hr_scale=2, hr_upscaler="Latent")
        assert isinstance(error, CharacterAdapterError), repr(error)
        assert "SD15 adapter" in str(error) and "SDXL" in str(error)
        assert_nothing_left(script, spy, sd_model, model_b)
    finally:
        monkeypatch.undo()
        sd_models.register_model(sd_model)  # register_model resets the family flags
    assert_plain_is_fresh(runner, script, fresh, "a")
