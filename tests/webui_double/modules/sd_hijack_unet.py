"""UNet input casts; mirrors modules/sd_hijack_unet.py (apply_model only).

The WebUI patches `ldm.models.diffusion.ddpm.LatentDiffusion.apply_model` (and sgm's
`OpenAIWrapper.forward`) unconditionally with `CondFunc` at import: the inputs are cast to
`devices.dtype_unet` and the UNet runs under `devices.autocast()`. So any caller of
`sd_model.apply_model` (the samplers, an extension's own UNet pass) gets a half UNet with
matching inputs. The double patches the class of each registered model (`register_model`)
instead of ldm's class by name, so it never imports ldm itself.
"""
import torch

from modules import devices


def apply_model(orig_func, self, x_noisy, t, cond, **kwargs):  # mirrors modules/sd_hijack_unet.py (apply_model)
    if isinstance(cond, dict):
        for y in cond.keys():
            if isinstance(cond[y], list):
                cond[y] = [x.to(devices.dtype_unet) if isinstance(x, torch.Tensor) else x for x in cond[y]]
            else:
                cond[y] = cond[y].to(devices.dtype_unet) if isinstance(cond[y], torch.Tensor) else cond[y]
    with devices.autocast():
        result = orig_func(self, x_noisy.to(devices.dtype_unet), t.to(devices.dtype_unet), cond, **kwargs)
        if devices.unet_needs_upcast:
            return result.float()
        return result


def hijack_apply_model(cls):  # double-only: what CondFunc('...LatentDiffusion.apply_model', apply_model) does, for `cls`
    """Wrap apply_model once, on the class of cls's MRO that defines it (idempotent)."""
    owner = next((klass for klass in cls.__mro__ if "apply_model" in klass.__dict__), None)
    original = owner.__dict__["apply_model"] if owner is not None else None
    if original is None or getattr(original, "_double_hijacked", False):
        return

    def patched(self, x_noisy, t, cond, **kwargs):
        return apply_model(original, self, x_noisy, t, cond, **kwargs)

    patched._double_hijacked = True
    patched.__wrapped__ = original
    owner.apply_model = patched
