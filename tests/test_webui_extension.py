"""The extension end to end in the WebUI test double, on a real tiny ldm LatentDiffusion."""

import pytest
import torch

from charadapter.errors import CharacterAdapterError
from charadapter.params import Region
from charadapter.webui import caches as ca_caches
from charadapter.webui import reference_pass as ca_reference_pass
from webui_host import errors, generate, ours, pixels, plain


def test_adapter_changes_the_image_and_leaves_nothing(host, sd_model):
    runner, script = host
    before = plain(runner, script)
    p, processed = generate(script, runner)
    assert not [m for k, m in errors.reported if "Character-Adapter" in m or "charadapter" in m], errors.reported
    assert (pixels(processed) - pixels(before)).abs().max() > 0
    assert "Character-Adapter reference" in p.extra_generation_params
    assert ours(sd_model.model.diffusion_model) == 0
    after = plain(runner, script)
    assert torch.equal(pixels(after), pixels(before))


def test_weight_zero_is_the_plain_image(host):
    runner, script = host
    before = plain(runner, script)
    _, processed = generate(script, runner, params=dict(weight=0.0))
    assert torch.equal(pixels(processed), pixels(before))


def test_batch_hires_and_show_masks(host, sd_model):
    runner, script = host
    p, processed = generate(script, runner, batch_size=2, enable_hr=True, hr_scale=2, hr_upscaler="Latent",
                            params=dict(show_masks=True))
    # 2 images + reference overlay + 2 layout overlays
    assert len(processed.images) == 5
    assert ours(sd_model.model.diffusion_model) == 0


def test_global_region_and_hard_mode(host):
    runner, script = host
    one = (Region("face", "face"),)
    _, soft = generate(script, runner, steps=4, params=dict(regions=one, temperature=1.0))
    _, hard = generate(script, runner, steps=4, params=dict(regions=one, fusion="hard"))
    _, whole = generate(script, runner, steps=4, params=dict(regions=()))
    images = [pixels(soft), pixels(hard), pixels(whole)]
    assert not torch.equal(images[0], images[1]) and not torch.equal(images[0], images[2])
    assert not torch.equal(images[1], images[2])


def test_error_stops_generation_instead_of_silently_skipping(host, sd_model, monkeypatch):
    runner, script = host
    monkeypatch.setattr(script.hooks.controller, "resolve_model",
                        lambda kind, name: (_ for _ in ()).throw(CharacterAdapterError("no such model")))
    with pytest.raises(CharacterAdapterError, match="no such model"):
        generate(script, runner)
    # the host skips postprocess after a crash: the guard on the CFG denoiser removed the error hook
    assert ours(sd_model.model.diffusion_model) == 0
    monkeypatch.undo()
    before = plain(runner, script)
    assert ours(sd_model.model.diffusion_model) == 0
    assert before.images


def test_adapter_sweep_segments_the_reference_once(host, sd_model, monkeypatch):
    """Masks depend on the model and the phrases, not the adapter: a second adapter re-encodes only."""
    from charadapter.layers import find_attn2_layers
    from webui_host import tiny_adapter

    runner, script = host
    second = tiny_adapter(find_attn2_layers(sd_model.model.diffusion_model), seed=11)
    ca_caches.ADAPTER_CACHE.put("tiny-adapter-2", second)
    paths = {"tiny-adapter": "tiny-adapter", "second": "tiny-adapter-2"}
    monkeypatch.setattr(script.hooks.controller, "resolve_model",
                        lambda kind, name: paths[name] if kind == "adapter" else "tiny-encoder")
    passes = []
    segment = ca_reference_pass.segment
    monkeypatch.setattr(ca_reference_pass, "segment", lambda *a, **k: passes.append(1) or segment(*a, **k))
    _, first = generate(script, runner)
    _, other = generate(script, runner, params=dict(model="second"))
    assert len(passes) == 1
    assert len(ca_caches.REFERENCE_CACHE) == 2
    assert not torch.equal(pixels(first), pixels(other))
