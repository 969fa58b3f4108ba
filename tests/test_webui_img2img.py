"""img2img and inpainting (whole picture and "only masked") through the script on the img2img tab
of the test double: on the real tiny ldm model, and on a tiny inpainting model (conditioning_key
"hybrid", 9 input channels) whose UNet also takes the mask and the masked image."""

import contextlib

import numpy as np
import pytest
import torch
from PIL import Image

from charadapter.webui import caches as ca_caches
from webui_host import (args_for, errors, ours, pixels, processing, scripts, start_host)

PROMPT = "a face, upper body, lower body, standing"


def init_image(side=96):
    img = Image.new("RGB", (side, side), (120, 140, 160))
    img.paste((220, 180, 150), (side * 5 // 16, side // 10, side * 5 // 8, side * 5 // 12))
    img.paste((60, 60, 180), (side // 5, side * 5 // 12, side * 4 // 5, side * 15 // 16))
    return img


def mask_image(side, box):
    mask = Image.new("L", (side, side), 0)
    mask.paste(255, box)
    return mask


def inside(side, box):
    where = np.zeros((side, side), dtype=bool)
    where[box[1]:box[3], box[0]:box[2]] = True
    return torch.from_numpy(where)


@pytest.fixture
def img2img_tab(host, monkeypatch):
    """The extension's img2img script instance (its own Controller), with the tiny weights."""
    runner = scripts.scripts_img2img
    runner.build_ui(is_img2img=True)
    (script,) = [s for s in runner.alwayson_scripts if s.title() == "Character-Adapter"]
    resolved = {"adapter": "tiny-adapter", "encoder": "tiny-encoder"}
    monkeypatch.setattr(script.hooks.controller, "resolve_model", lambda kind, name: resolved[kind])
    return runner, script


def img2img(runner, script, enabled=True, params=None, **kwargs):
    args = dict(init_images=[init_image()], prompt=PROMPT, negative_prompt="", batch_size=1, steps=4,
                width=64, height=64, sampler_name="Euler", seed=7, denoising_strength=0.75)
    args.update(kwargs)
    p = processing.StableDiffusionProcessingImg2Img(**args)
    p.scripts = runner
    full = list(args_for(script, **(params or {})))
    full[script.args_from] = enabled
    p.script_args = tuple(full)
    torch.manual_seed(0)  # Img2Img.init samples the VAE posterior with the global RNG, as the WebUI does
    return p, processing.process_images(p)


def no_errors():
    return not [m for _, m in errors.reported if "Character-Adapter" in m or "charadapter" in m]


def difference(a, b):
    """Per-pixel max abs difference (H, W) of two result images."""
    return (torch.from_numpy(np.asarray(a, dtype=np.float32)) - torch.from_numpy(np.asarray(b, dtype=np.float32))).abs().amax(-1)


def test_img2img_changes_the_image_and_leaves_nothing(img2img_tab, sd_model):
    runner, script = img2img_tab
    _, before = img2img(runner, script, enabled=False)
    p, processed = img2img(runner, script)
    assert no_errors() and "Character-Adapter reference" in p.extra_generation_params
    assert (pixels(processed) - pixels(before)).abs().max() > 0
    assert ours(sd_model.model.diffusion_model) == 0
    _, after = img2img(runner, script, enabled=False)
    assert torch.equal(pixels(after), pixels(before))


@pytest.mark.parametrize("only_masked, side, box", [
    (False, 64, (16, 8, 40, 32)),  # the whole picture is resized to 64x64 and sampled
    (True, 96, (24, 16, 56, 48)),  # the mask's box is cut out, sampled at 64x64, pasted back
])
def test_inpainting_changes_only_the_masked_area(img2img_tab, sd_model, only_masked, side, box):
    runner, script = img2img_tab
    kwargs = dict(init_images=[init_image(side)], mask=mask_image(side, box), inpaint_full_res=only_masked,
                  inpaint_full_res_padding=0)
    _, before = img2img(runner, script, enabled=False, **kwargs)
    p, processed = img2img(runner, script, params=dict(show_masks=True), **kwargs)
    assert no_errors()
    diff = difference(processed.images[0], before.images[0])
    masked = inside(side, box)
    assert diff[masked].max() > 0 and diff[~masked].max() == 0
    # show masks: the reference, then the layout over the result; "only masked" sampled a crop,
    # and its layout is drawn over that crop only
    assert len(processed.images) == 3
    result = processed.images[0]
    # the layout picture: the result tinted, over a legend strip (how each region was located)
    layout = difference(processed.images[2].crop((0, 0, result.width, result.height)), result)
    if only_masked:
        x, y, w, h = p.paste_to
        assert (x, y, x + w, y + h) == box
        assert layout[~masked].max() == 0 and layout[masked].max() > 0
    else:
        assert layout.max() > 0
    assert ours(sd_model.model.diffusion_model) == 0


# ---------------------------------------------------------------- an inpainting model


def make_inpainting_model():
    """tiny_sd's model with SD1 inpainting's two differences: conditioning_key "hybrid" and a UNet
    taking 4 latent + 1 mask + 4 masked-image channels (v1-inpainting-inference.yaml)."""
    from tiny_sd import LDM, _fill_zero_initialised, tiny_sd_config

    config = tiny_sd_config(seed=3)
    config.params.conditioning_key = "hybrid"
    config.params.unet_config.params.in_channels = 9
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        model = LDM.util.instantiate_from_config(config)
    _fill_zero_initialised(model.model.diffusion_model, 3)
    return model.eval()


@contextlib.contextmanager
def inpainting_host(tmp_path, monkeypatch):
    model = make_inpainting_model()
    started = start_host(model, tmp_path, monkeypatch)
    try:
        next(started)
        runner = scripts.scripts_img2img
        runner.build_ui(is_img2img=True)
        (script,) = [s for s in runner.alwayson_scripts if s.title() == "Character-Adapter"]
        resolved = {"adapter": "tiny-adapter", "encoder": "tiny-encoder"}
        monkeypatch.setattr(script.hooks.controller, "resolve_model", lambda kind, name: resolved[kind])
        yield model, runner, script
    finally:
        next(started, None)


def test_inpainting_model(tmp_path, monkeypatch):
    """The reference pass gives the 9-channel UNet everything-masked + a grey image (as the host's
    txt2img does); sampling gets the host's mask + masked image; the adapter changes the result."""
    with inpainting_host(tmp_path, monkeypatch) as (model, runner, script):
        unet = model.model.diffusion_model
        seen = []
        handle = unet.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
        try:
            kwargs = dict(init_images=[init_image(64)], mask=mask_image(64, (16, 8, 40, 32)), inpaint_full_res=False)
            _, before = img2img(runner, script, enabled=False, **kwargs)
            plain_calls = len(seen)
            _, processed = img2img(runner, script, **kwargs)
        finally:
            handle.remove()
        assert no_errors()
        reference_pass = seen[plain_calls]  # process() runs before any sampling call of this run
        assert reference_pass.shape[1] == 9 and torch.equal(reference_pass[:, 4], torch.ones_like(reference_pass[:, 4]))
        with torch.no_grad():  # channels 5..8: the latent of a grey picture at the reference size
            grey = model.get_first_stage_encoding(
                model.encode_first_stage(torch.zeros(1, 3, *[8 * s for s in reference_pass.shape[-2:]])).mode())
        assert torch.allclose(reference_pass[:, 5:], grey, atol=1e-5)
        sampling = seen[plain_calls + 1]
        assert sampling.shape[1] == 9 and 0 < float(sampling[:, 4].mean()) < 1  # the inpainting mask
        assert (pixels(processed) - pixels(before)).abs().max() > 0
        assert ours(unet) == 0
        ca_caches.SEGMENTATION_CACHE.clear()
        ca_caches.REFERENCE_CACHE.clear()
