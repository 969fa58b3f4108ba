"""Low-VRAM mode; mirrors modules/lowvram.py (flags only: no module swapping in the double).

In the WebUI, --medvram registers a forward-pre-hook on sd_model.model (the DiffusionWrapper) that
moves the UNet to the GPU, and --lowvram one on each UNet block; the VAE's encode/decode are wrapped.
Code that calls sd_model.model.diffusion_model directly bypasses the medvram hook.
"""
from modules import shared


def is_needed(sd_model):  # mirrors modules/lowvram.py (is_needed)
    return shared.cmd_opts.lowvram or shared.cmd_opts.medvram or shared.cmd_opts.medvram_sdxl and hasattr(sd_model, 'conditioner')


def is_enabled(sd_model):  # mirrors modules/lowvram.py (is_enabled)
    return getattr(sd_model, 'lowvram', False)


def send_everything_to_cpu():  # mirrors modules/lowvram.py (send_everything_to_cpu)
    pass
