"""Sampler plumbing; mirrors modules/sd_samplers_common.py."""
import inspect
from collections import namedtuple

import torch

from modules import devices, shared

SamplerDataTuple = namedtuple('SamplerData', ['name', 'constructor', 'aliases', 'options'])  # mirrors modules/sd_samplers_common.py


class SamplerData(SamplerDataTuple):  # mirrors modules/sd_samplers_common.py (SamplerData)
    def total_steps(self, steps):
        """Expected denoiser calls: twice the steps for second-order samplers."""
        if self.options.get("second_order", False):
            steps = steps * 2
        return steps


def setup_img2img_steps(p, steps=None):  # mirrors modules/sd_samplers_common.py (setup_img2img_steps)
    """(schedule length, steps actually run - 1); an explicit `steps` (hires pass) stretches the schedule."""
    if shared.opts.img2img_fix_steps or steps is not None:
        requested_steps = (steps or p.steps)
        steps = int(requested_steps / min(p.denoising_strength, 0.999)) if p.denoising_strength > 0 else 0
        t_enc = requested_steps - 1
    else:
        steps = p.steps
        t_enc = int(min(p.denoising_strength, 0.999) * steps)
    return steps, t_enc


approximation_indexes = {"Full": 0, "Approx NN": 1, "Approx cheap": 2, "TAESD": 3}  # mirrors modules/sd_samplers_common.py


def samples_to_images_tensor(sample, approximation=None, model=None):  # mirrors modules/sd_samplers_common.py; full VAE only
    """Latents -> images in [-1, 1] with the model's VAE."""
    if model is None:
        model = shared.sd_model
    return model.decode_first_stage(sample.to(devices.dtype_vae))


def decode_first_stage(model, x):  # mirrors modules/sd_samplers_common.py (decode_first_stage)
    x = x.to(devices.dtype_vae)
    return samples_to_images_tensor(x, approximation_indexes.get(shared.opts.sd_vae_decode_method, 0), model)


def images_tensor_to_samples(image, approximation=None, model=None):  # mirrors modules/sd_samplers_common.py; full VAE only
    """Images in [0, 1] -> latents, one image at a time when there are several (as the WebUI does)."""
    if model is None:
        model = shared.sd_model
    image = image.to(shared.device or devices.device, dtype=devices.dtype_vae)
    image = image * 2 - 1
    if len(image) > 1:
        return torch.stack([model.get_first_stage_encoding(model.encode_first_stage(torch.unsqueeze(img, 0)))[0] for img in image])
    return model.get_first_stage_encoding(model.encode_first_stage(image))


def store_latent(decoded):  # mirrors modules/sd_samplers_common.py (store_latent); no previews in the double
    shared.state.current_latent = decoded


class InterruptedException(BaseException):  # mirrors modules/sd_samplers_common.py (InterruptedException): BaseException, caught by launch_sampling
    pass


class Sampler:  # mirrors modules/sd_samplers_common.py (Sampler)
    def __init__(self, funcname):
        self.funcname = funcname
        self.func = funcname
        self.extra_params = []
        self.sampler_noises = None
        self.stop_at = None
        self.eta = None
        self.config = None
        self.last_latent = None
        self.s_min_uncond = None
        self.s_churn = 0.0
        self.s_tmin = 0.0
        self.s_tmax = float('inf')
        self.s_noise = 1.0
        self.eta_option_field = 'eta_ancestral'
        self.eta_infotext_field = 'Eta'
        self.eta_default = 1.0
        self.conditioning_key = getattr(shared.sd_model.model, 'conditioning_key', 'crossattn')
        self.p = None
        self.model_wrap_cfg = None
        self.sampler_extra_args = None
        self.options = {}

    def callback_state(self, d):  # mirrors (Sampler.callback_state): runs AFTER each step's model call(s)
        step = d['i']
        if self.stop_at is not None and step > self.stop_at:
            raise InterruptedException
        shared.state.sampling_step = step
        shared.total_tqdm.update()

    def launch_sampling(self, steps, func):  # mirrors (Sampler.launch_sampling): an interrupt returns the last latent
        self.model_wrap_cfg.steps = steps
        self.model_wrap_cfg.total_steps = self.config.total_steps(steps)
        shared.state.sampling_steps = steps
        shared.state.sampling_step = 0
        try:
            return func()
        except InterruptedException:
            return self.last_latent

    def number_of_needed_noises(self, p):  # mirrors (Sampler.number_of_needed_noises)
        return p.steps

    def initialize(self, p) -> dict:  # mirrors (Sampler.initialize): resets the denoiser's call counter
        self.p = p
        self.model_wrap_cfg.p = p
        self.model_wrap_cfg.mask = p.mask if hasattr(p, 'mask') else None
        self.model_wrap_cfg.nmask = p.nmask if hasattr(p, 'nmask') else None
        self.model_wrap_cfg.step = 0
        self.model_wrap_cfg.image_cfg_scale = getattr(p, 'image_cfg_scale', None)
        self.eta = p.eta if p.eta is not None else getattr(shared.opts, self.eta_option_field, 0.0)
        self.s_min_uncond = getattr(p, 's_min_uncond', 0.0)
        extra_params_kwargs = {}
        for param_name in self.extra_params:
            if hasattr(p, param_name) and param_name in inspect.signature(self.func).parameters:
                extra_params_kwargs[param_name] = getattr(p, param_name)
        return extra_params_kwargs

    def sample(self, p, x, conditioning, unconditional_conditioning, steps=None, image_conditioning=None):  # mirrors (Sampler.sample)
        raise NotImplementedError()

    def sample_img2img(self, p, x, noise, conditioning, unconditional_conditioning, steps=None, image_conditioning=None):  # mirrors (Sampler.sample_img2img)
        raise NotImplementedError()

    def add_infotext(self, p):  # mirrors (Sampler.add_infotext)
        if self.model_wrap_cfg.padded_cond_uncond:
            p.extra_generation_params["Pad conds"] = True
        if self.model_wrap_cfg.padded_cond_uncond_v0:
            p.extra_generation_params["Pad conds v0"] = True
