"""Low-VRAM mode; mirrors modules/lowvram.py of v1.10.1.

--medvram: the VAE, the text encoder and the whole UNet wrapper (sd_model.model) each get a
forward-pre-hook that moves that part to the device and the previous one back to the CPU, so one
of them is on the device at a time; the VAE's encode/decode are wrapped instead (they are not
forward calls). --lowvram: the same, with the UNet's blocks (time_embed, each input block, the
middle block, each output block) moved one at a time. Code that calls
sd_model.model.diffusion_model directly bypasses the --medvram hook. In the double the device is
the CPU, so the moves change nothing; `module_in_gpu` tells which part the WebUI would have moved.
"""
from collections import namedtuple

import torch

from modules import devices, shared

module_in_gpu = None  # mirrors modules/lowvram.py (module_in_gpu)
cpu = torch.device("cpu")  # mirrors (cpu)

ModuleWithParent = namedtuple('ModuleWithParent', ['module', 'parent'], defaults=['None'])  # mirrors (ModuleWithParent)


def send_everything_to_cpu():  # mirrors modules/lowvram.py (send_everything_to_cpu)
    global module_in_gpu

    if module_in_gpu is not None:
        module_in_gpu.to(cpu)

    module_in_gpu = None


def is_needed(sd_model):  # mirrors modules/lowvram.py (is_needed)
    return shared.cmd_opts.lowvram or shared.cmd_opts.medvram or shared.cmd_opts.medvram_sdxl and hasattr(sd_model, 'conditioner')


def apply(sd_model):  # mirrors modules/lowvram.py (apply)
    enable = is_needed(sd_model)
    shared.parallel_processing_allowed = not enable

    if enable:
        setup_for_low_vram(sd_model, not shared.cmd_opts.lowvram)
    else:
        sd_model.lowvram = False


def setup_for_low_vram(sd_model, use_medvram):  # mirrors modules/lowvram.py (setup_for_low_vram)
    """Once per model: every part but the big ones goes to the device; each big part (VAE, text
    encoder, UNet wrapper or, with --lowvram, each UNet block) moves there on its own call."""
    if getattr(sd_model, 'lowvram', False):
        return
    sd_model.lowvram = True
    owner = {}  # a hooked submodule -> the part that moves with it

    def send_me_to_gpu(module, _):
        global module_in_gpu
        part = owner.get(module, module)
        if module_in_gpu is part:
            return
        if module_in_gpu is not None:
            module_in_gpu.to(cpu)
        part.to(devices.device)
        module_in_gpu = part

    vae = sd_model.first_stage_model
    encode, decode = vae.encode, vae.decode  # not forward calls: wrapped instead of hooked

    def encode_on_device(x):
        send_me_to_gpu(vae, None)
        return encode(x)

    def decode_on_device(z):
        send_me_to_gpu(vae, None)
        return decode(z)

    is_sdxl = hasattr(sd_model, 'conditioner')
    is_sd2 = not is_sdxl and hasattr(sd_model.cond_stage_model, 'model')
    big = [(sd_model, 'first_stage_model'), (sd_model, 'depth_model'), (sd_model, 'embedder'), (sd_model, 'model')]
    if hasattr(sd_model, 'medvram_fields'):
        big = sd_model.medvram_fields()
    else:
        big.append((sd_model, 'conditioner') if is_sdxl else (sd_model.cond_stage_model, 'model') if is_sd2
                   else (sd_model.cond_stage_model, 'transformer'))
    _to_device_without(sd_model, big)

    if hasattr(sd_model, "cond_stage_model") and hasattr(sd_model.cond_stage_model, "medvram_modules"):
        for entry in sd_model.cond_stage_model.medvram_modules():
            module, parent = (entry.module, entry.parent) if isinstance(entry, ModuleWithParent) else (entry, None)
            if module:
                module.register_forward_pre_hook(send_me_to_gpu)
                if parent:
                    owner[module] = parent
    elif is_sdxl:
        sd_model.conditioner.register_forward_pre_hook(send_me_to_gpu)
    elif is_sd2:
        text = sd_model.cond_stage_model
        for module in (text.model, text.model.token_embedding):
            module.register_forward_pre_hook(send_me_to_gpu)
            owner[module] = text
    else:
        text = sd_model.cond_stage_model
        text.transformer.register_forward_pre_hook(send_me_to_gpu)
        owner[text.transformer] = text

    vae.register_forward_pre_hook(send_me_to_gpu)
    vae.encode, vae.decode = encode_on_device, decode_on_device
    for extra in ('depth_model', 'embedder'):
        if getattr(sd_model, extra, None) is not None:
            getattr(sd_model, extra).register_forward_pre_hook(send_me_to_gpu)

    if use_medvram:
        sd_model.model.register_forward_pre_hook(send_me_to_gpu)
        return
    unet = sd_model.model.diffusion_model
    names = ('input_blocks', 'middle_block', 'output_blocks', 'time_embed')
    _to_device_without(sd_model.model, [(unet, name) for name in names])
    for module in [unet.time_embed, *unet.input_blocks, unet.middle_block, *unet.output_blocks]:
        module.register_forward_pre_hook(send_me_to_gpu)


def _to_device_without(root, fields):  # double-only helper of setup_for_low_vram
    """Move `root` to the device with the (owner, name) modules detached, so they stay on the CPU."""
    kept = [getattr(obj, name, None) for obj, name in fields]
    for obj, name in fields:
        setattr(obj, name, None)
    root.to(devices.device)
    for (obj, name), module in zip(fields, kept):
        setattr(obj, name, module)


def is_enabled(sd_model):  # mirrors modules/lowvram.py (is_enabled)
    return getattr(sd_model, 'lowvram', False)
