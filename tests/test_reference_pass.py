"""The reference pass: sized by area, bounded in memory whatever the reference's aspect, run the way
the WebUI runs its own passes under --medvram / --lowvram, and nothing of it left before sampling.

Memory is measured with charadapter.memprobe.LiveTensorBytes: the peak bytes of the tensors the pass
creates, counted op by op. It does not depend on the machine's load or on the allocator (RSS on a
shared 2-core machine moves by more than the tiny model's whole pass), and it sees every tensor
the pass makes: pixels, VAE and UNet activations, the captured maps.
"""

import math

import pytest
from PIL import Image

from webui_host import make_sd_model, reference_image, tiny_clip  # sets sys.path
from charadapter.memprobe import LiveTensorBytes
from charadapter.params import Params
from charadapter.reference import MAX_PASS_ASPECT, PASS_MULTIPLE, pass_size
from charadapter.webui import caches as ca_caches
from charadapter.webui import reference_pass as ca_reference_pass
from modules import devices, lowvram, sd_models, shared

# ---- pass_size ----------------------------------------------------------------------------------

SIZES = [(512, 512), (256, 512), (512, 256), (333, 1000), (128, 512), (100, 1000), (1000, 37), (768, 1024),
         (1920, 1080), (32, 32), (4000, 6000)]
AREAS = [512 * 512, 1024 * 1024 // 2, 1024 * 1024, 64 * 128, 300 * 300]


@pytest.mark.parametrize("area", AREAS)
@pytest.mark.parametrize("size", SIZES)
def test_pass_size_fits_the_area_in_multiples_of_64(size, area):
    w, h = pass_size(size, area)
    assert w % PASS_MULTIPLE == 0 and h % PASS_MULTIPLE == 0 and w >= 64 and h >= 64
    assert w * h <= area
    aspect = min(max(size[0] / size[1], 1 / MAX_PASS_ASPECT), MAX_PASS_ASPECT)
    # the closest 64-multiple aspect that fits: within one 64 px step of each side
    assert abs(math.log(w / h / aspect)) <= math.log((min(w, h) + 64) / min(w, h)) + 1e-9
    assert w * h >= 0.6 * area or min(w, h) == 64  # not needlessly small


def test_pass_sizes_of_the_families():
    """What the README states: SD1.5 at its native area, SDXL at half of its own."""
    sd15, sdxl = ca_reference_pass.PASS_AREA["sd15"], ca_reference_pass.PASS_AREA["sdxl"]
    assert [pass_size(s, sd15) for s in [(512, 512), (256, 512), (128, 512)]] == [(512, 512), (320, 640), (256, 1024)]
    assert [pass_size(s, sdxl) for s in [(512, 512), (256, 512), (128, 512)]] == [(704, 704), (512, 1024), (320, 1280)]


def test_thin_references_are_squeezed_to_one_to_four():
    assert pass_size((100, 1000), 512 * 512) == pass_size((128, 512), 512 * 512) == (256, 1024)
    assert pass_size((1000, 37), 512 * 512) == (1024, 256)


def test_pass_size_refuses_an_area_below_one_tile():
    with pytest.raises(ValueError, match="cannot size"):
        pass_size((64, 64), 63 * 63)


# ---- memory -------------------------------------------------------------------------------------

BUDGET = 256 * 256  # the tiny model's pass area for these tests (latent 32x32 for a square)


def figure(width, height):
    """A reference of this size: a face, a red jacket and blue trousers on green, like reference_image."""
    image = reference_image().resize((64, 96))
    canvas = Image.new("RGB", (width, height), (90, 160, 90))
    scale = min(width / 64, height / 96)
    figure_image = image.resize((max(1, int(64 * scale)), max(1, int(96 * scale))))
    canvas.paste(figure_image, ((width - figure_image.width) // 2, (height - figure_image.height) // 2))
    return canvas


def pass_args():
    """The pass's settings of the panel's defaults: the first character's reference phrases, the timestep."""
    params = Params.single(enabled=True, image=reference_image(), model="tiny-adapter").validated()
    return [r.reference_phrase for r in params.first.regions], params.timestep


def measured_pass(sd_model, image, monkeypatch, area=BUDGET):
    """Run the pass alone; (peak bytes, bytes still alive after it, latent h*w of each UNet call)."""
    monkeypatch.setitem(ca_reference_pass.PASS_AREA, "sd15", area)
    unet = sd_model.model.diffusion_model
    calls = []
    handle = unet.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[-2] * args[0].shape[-1]))
    try:
        with LiveTensorBytes() as probe:
            result = ca_reference_pass.segment(sd_model, image, *pass_args())
            after = probe.current
    finally:
        handle.remove()
    assert result.masks.shape[0] == 3
    return probe.peak, after, calls


def test_pass_memory_does_not_grow_with_the_references_aspect(host, sd_model, monkeypatch):
    """1:1, 1:2 and 1:4 references: the same area budget, the same peak (within the 64 px steps);
    a pass of twice the area (what a 1:2 reference got before: short side kept, long side doubled)
    shows the probe sees the area. Each UNet call stays within the budget."""
    peaks = {}
    for name, size in {"1:1": (256, 256), "1:2": (256, 512), "1:4": (256, 1024)}.items():
        peak, after, calls = measured_pass(sd_model, figure(*size), monkeypatch)
        assert calls and max(calls) <= BUDGET // 64, (name, calls)
        assert after <= 0.02 * peak, f"{name}: {after} of {peak} bytes still held after the pass"
        peaks[name] = peak
    doubled, _, _ = measured_pass(sd_model, figure(256, 512), monkeypatch, area=2 * BUDGET)
    print("pass peak KiB:", {k: v // 1024 for k, v in peaks.items()}, "twice the area:", doubled // 1024)
    assert max(peaks.values()) <= 1.15 * peaks["1:1"], peaks
    assert doubled >= 1.6 * peaks["1:2"], (doubled, peaks)


def test_the_pass_leaves_nothing_on_the_hooks_state(host, sd_model, monkeypatch):
    """The maps the hooks captured (on the device) are dropped once copied out."""
    from charadapter import reference as core_reference

    states = []
    original = core_reference.plan_region_hooks
    monkeypatch.setattr(core_reference, "plan_region_hooks",
                        lambda session, unet, layers, state: states.append(state) or original(session, unet, layers, state))
    measured_pass(sd_model, figure(256, 512), monkeypatch)
    (state,) = states
    assert not state.grid_maps and not state._queue and not state._targets


def test_device_cache_is_emptied_after_the_pass(host, sd_model, monkeypatch):
    calls = []
    monkeypatch.setattr(devices, "torch_gc", lambda: calls.append("gc"))
    ca_reference_pass.segment(sd_model, reference_image(), *pass_args())
    assert calls == ["gc"]


# ---- --medvram / --lowvram ------------------------------------------------------------------------


@pytest.fixture
def low_vram_model(host, monkeypatch, request):
    """A fresh tiny model loaded under --medvram or --lowvram (lowvram.apply hooks it at load)."""
    monkeypatch.setattr(shared.cmd_opts, request.param, True)
    model = make_sd_model()
    sd_models.register_model(model)
    assert model.lowvram
    yield request.param, model
    lowvram.send_everything_to_cpu()
    monkeypatch.undo()


@pytest.mark.parametrize("low_vram_model", ["medvram", "lowvram"], indirect=True)
def test_the_pass_moves_parts_through_the_hosts_low_vram_hooks(low_vram_model, host, monkeypatch):
    """The WebUI moves the VAE on encode_first_stage and the UNet (or each block) on its own
    forward; our pass calls both through the model, so each is on the device when it runs. The
    image encoder then gets the device to itself and goes back to the CPU."""
    flag, model = low_vram_model
    runner, script = host
    seen = []
    vae, unet = model.first_stage_model, model.model.diffusion_model
    watched = [vae.encoder, unet.input_blocks[0], unet.middle_block]
    handles = [m.register_forward_pre_hook(lambda m, a: seen.append((m, lowvram.module_in_gpu))) for m in watched]
    clip = tiny_clip()
    ca_caches.ENCODER_CACHE.put("tiny-encoder", clip)
    moves = []
    original_to = clip.to
    monkeypatch.setattr(clip, "to", lambda *a, **k: moves.append((a[0], lowvram.module_in_gpu)) or original_to(*a, **k))
    try:
        from test_webui_models import prepare

        prepare(script)
    finally:
        for handle in handles:
            handle.remove()
    in_gpu = {id(m): g for m, g in seen}
    assert in_gpu[id(vae.encoder)] is vae
    expected_unet = model.model if flag == "medvram" else None
    assert in_gpu[id(unet.input_blocks[0])] is (expected_unet or unet.input_blocks[0])
    assert in_gpu[id(unet.middle_block)] is (expected_unet or unet.middle_block)
    assert moves == [(devices.device, None), ("cpu", None)]  # everything else was sent to the CPU first
