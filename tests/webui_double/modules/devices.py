"""Devices and dtypes; mirrors modules/devices.py. The double runs on the CPU in float32 by default."""
import contextlib

import torch

cpu = torch.device("cpu")  # mirrors modules/devices.py (cpu)
device = cpu  # mirrors (device): set from --device-id / get_optimal_device() in the WebUI; tests may change it
device_interrogate = cpu
device_gfpgan = cpu
device_esrgan = cpu
device_codeformer = cpu
dtype = torch.float32  # mirrors (dtype): float16 in the WebUI unless --no-half / --precision full
dtype_vae = torch.float32  # mirrors (dtype_vae)
dtype_unet = torch.float32  # mirrors (dtype_unet)
dtype_inference = torch.float32  # mirrors (dtype_inference)
unet_needs_upcast = False  # mirrors (unet_needs_upcast): True with --upcast-sampling on a half UNet
fp8 = False  # mirrors (fp8): True when FP8 weight storage is on
force_fp16 = False  # mirrors (force_fp16)


def get_optimal_device_name():  # mirrors modules/devices.py (get_optimal_device_name)
    return "cuda" if torch.cuda.is_available() else "cpu"


def get_optimal_device():  # mirrors modules/devices.py (get_optimal_device)
    return torch.device(get_optimal_device_name())


def get_device_for(task):  # mirrors modules/devices.py (get_device_for)
    return device


def torch_gc():  # mirrors modules/devices.py (torch_gc): frees the CUDA cache
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def torch_npu_set_device():  # mirrors modules/devices.py (torch_npu_set_device)
    pass


def cond_cast_unet(input):  # mirrors modules/devices.py (cond_cast_unet)
    return input.to(dtype_unet) if unet_needs_upcast else input


def cond_cast_float(input):  # mirrors modules/devices.py (cond_cast_float)
    return input.float() if unet_needs_upcast else input


def autocast(disable=False):  # mirrors modules/devices.py (autocast): a no-op context when dtype is float32
    """torch.autocast("cuda") (float16) in the WebUI; the double autocasts on its device to `dtype`
    (float16 or bfloat16 on the CPU), so tests can run a half UNet the way the WebUI does."""
    if disable or dtype == torch.float32 or dtype_inference == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def without_autocast(disable=False):  # mirrors modules/devices.py (without_autocast)
    return torch.autocast("cuda", enabled=False) if torch.is_autocast_enabled() and not disable else contextlib.nullcontext()


class NansException(Exception):  # mirrors modules/devices.py (NansException)
    pass


def test_for_nans(x, where):  # mirrors modules/devices.py (test_for_nans)
    from modules import shared
    if shared.cmd_opts.disable_nan_check:
        return
    if torch.isnan(x[(0, ) * len(x.shape)]) and torch.all(torch.isnan(x)).item():
        raise NansException(f"A tensor with all NaNs was produced in {where}.")
