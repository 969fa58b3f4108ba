"""Small facts read from the running WebUI: its UNet, device, memory mode, status line, model family.

`modules` is imported inside each function, so importing this file needs no WebUI.
"""

import contextlib
from typing import Optional

import torch

from ..checkpoint import IPAdapterWeights
from ..errors import MismatchError


def unet_of(sd_model) -> Optional[torch.nn.Module]:
    """The loaded model's UNet (ldm and sgm both keep it at model.diffusion_model), or None."""
    model = getattr(sd_model, "model", None)
    return getattr(model, "diffusion_model", None)


def device() -> torch.device:
    from modules import devices

    return devices.device


def low_vram(sd_model) -> bool:
    """--medvram / --lowvram (or --medvram-sdxl on SDXL): only the running part may stay on the GPU."""
    from modules import lowvram, shared

    flags = shared.cmd_opts
    return bool(lowvram.is_enabled(sd_model) or getattr(flags, "lowvram", False) or getattr(flags, "medvram", False)
                or (getattr(flags, "medvram_sdxl", False) and getattr(sd_model, "is_sdxl", False)))


@contextlib.contextmanager
def progress(text: str):
    """Show `text` as the WebUI's status line while the block runs, then what was there before."""
    from modules import shared

    state = shared.state
    previous = getattr(state, "textinfo", None)
    state.textinfo = text
    try:
        yield
    finally:
        state.textinfo = previous


def check_architecture(sd_model, weights: IPAdapterWeights) -> None:
    """An SDXL adapter on an SD1.5 model (or the reverse) stops with a clear message."""
    model_arch = "sdxl" if getattr(sd_model, "is_sdxl", False) else "sd15"
    if getattr(sd_model, "is_sd2", False):
        model_arch = "sd2"
    if model_arch != weights.spec.arch:
        raise MismatchError(
            f"Character-Adapter: {weights.source} is an {weights.spec.arch.upper()} adapter but the loaded "
            f"checkpoint is {model_arch.upper()}: choose a matching IP-Adapter model"
        )
