"""k-diffusion samplers; mirrors modules/sd_samplers_kdiffusion.py with our own Euler and Heun loops.

k_diffusion is not installed here: CompVisDenoiser below is our stand-in for
k_diffusion.external.CompVisDenoiser (eps model; sigma <-> fractional timestep by log-sigma
interpolation), which is what calls `sd_model.apply_model(x * c_in, t, cond=...)`.
"""
import torch

from modules import sd_samplers_common, sd_samplers_cfg_denoiser, shared


class CompVisDenoiser(torch.nn.Module):  # mirrors k_diffusion/external.py (CompVisDenoiser / DiscreteEpsDDPMDenoiser)
    def __init__(self, model, quantize=False):
        super().__init__()
        self.inner_model = model
        alphas_cumprod = model.alphas_cumprod.detach().float().cpu()
        self.register_buffer('sigmas', ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5)
        self.register_buffer('log_sigmas', self.sigmas.log())
        self.quantize = quantize

    def sigma_to_t(self, sigma, quantize=None):
        """Fractional DDPM timestep whose log-sigma matches (linear interpolation between neighbours)."""
        quantize = self.quantize if quantize is None else quantize
        log_sigma = sigma.float().log().cpu()
        dists = log_sigma - self.log_sigmas[:, None]
        if quantize:
            return dists.abs().argmin(dim=0).view(sigma.shape).to(sigma.device)
        low_idx = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=self.log_sigmas.shape[0] - 2)
        high_idx = low_idx + 1
        low, high = self.log_sigmas[low_idx], self.log_sigmas[high_idx]
        w = ((low - log_sigma) / (low - high)).clamp(0, 1)
        t = (1 - w) * low_idx + w * high_idx
        return t.view(sigma.shape).to(sigma.device)

    def t_to_sigma(self, t):
        """Sigma at a fractional timestep (log-linear between neighbours)."""
        t = t.float()
        low_idx, high_idx, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * self.log_sigmas[low_idx] + w * self.log_sigmas[high_idx]).exp()

    def get_sigmas(self, n=None):
        """n sigmas uniform in timestep from the largest down to t=0, plus a final 0."""
        t_max = len(self.sigmas) - 1
        t = torch.linspace(t_max, 0, n)
        return torch.cat([self.t_to_sigma(t), t.new_zeros([1])])

    def forward(self, input, sigma, **kwargs):
        c_out = (-sigma)[:, None, None, None]
        c_in = (1 / (sigma ** 2 + 1) ** 0.5)[:, None, None, None]
        eps = self.inner_model.apply_model(input * c_in, self.sigma_to_t(sigma), **kwargs)
        return input + eps * c_out


def sample_euler(model, x, sigmas, extra_args=None, callback=None, disable=None):  # our own stand-in for k_diffusion.sampling.sample_euler (no churn)
    """Euler steps on the probability-flow ODE; one model call per step."""
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({'x': x, 'i': i, 'sigma': sigmas[i], 'sigma_hat': sigmas[i], 'denoised': denoised})
        d = (x - denoised) / sigmas[i]
        x = x + d * (sigmas[i + 1] - sigmas[i])
    return x


def sample_heun(model, x, sigmas, extra_args=None, callback=None, disable=None):  # our own stand-in for k_diffusion.sampling.sample_heun (no churn)
    """Heun steps: two model calls per step except the last (sigma_next == 0)."""
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        d = (x - denoised) / sigmas[i]
        if callback is not None:
            callback({'x': x, 'i': i, 'sigma': sigmas[i], 'sigma_hat': sigmas[i], 'denoised': denoised})
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            denoised_2 = model(x_2, sigmas[i + 1] * s_in, **extra_args)
            d_2 = (x_2 - denoised_2) / sigmas[i + 1]
            x = x + (d + d_2) / 2 * dt
    return x


samplers_k_diffusion = [  # mirrors modules/sd_samplers_kdiffusion.py (samplers_k_diffusion), two entries
    ('Euler', sample_euler, ['k_euler'], {}),
    ('Heun', sample_heun, ['k_heun'], {"second_order": True}),
]


class CFGDenoiserKDiffusion(sd_samplers_cfg_denoiser.CFGDenoiser):  # mirrors modules/sd_samplers_kdiffusion.py (CFGDenoiserKDiffusion)
    @property
    def inner_model(self):
        if self.model_wrap is None:
            denoiser_constructor = getattr(shared.sd_model, 'create_denoiser', None)
            if denoiser_constructor is not None:
                self.model_wrap = denoiser_constructor()
            else:
                self.model_wrap = CompVisDenoiser(shared.sd_model, quantize=shared.opts.enable_quantization)
        return self.model_wrap


class KDiffusionSampler(sd_samplers_common.Sampler):  # mirrors modules/sd_samplers_kdiffusion.py (KDiffusionSampler)
    def __init__(self, funcname, sd_model, options=None):
        super().__init__(funcname)
        self.extra_params = []
        self.options = options or {}
        self.func = funcname
        self.model_wrap_cfg = CFGDenoiserKDiffusion(self)
        self.model_wrap = self.model_wrap_cfg.inner_model

    def get_sigmas(self, p, steps):  # mirrors (KDiffusionSampler.get_sigmas): 'Automatic' scheduler only
        return self.model_wrap.get_sigmas(steps).cpu()

    def sample_img2img(self, p, x, noise, conditioning, unconditional_conditioning, steps=None, image_conditioning=None):  # mirrors (KDiffusionSampler.sample_img2img)
        steps, t_enc = sd_samplers_common.setup_img2img_steps(p, steps)
        sigmas = self.get_sigmas(p, steps)
        sigma_sched = sigmas[steps - t_enc - 1:]
        xi = x + noise * sigma_sched[0]
        self.initialize(p)
        self.model_wrap_cfg.init_latent = x
        self.last_latent = x
        self.sampler_extra_args = {
            'cond': conditioning,
            'image_cond': image_conditioning,
            'uncond': unconditional_conditioning,
            'cond_scale': p.cfg_scale,
            's_min_uncond': self.s_min_uncond,
        }
        samples = self.launch_sampling(t_enc + 1, lambda: self.func(self.model_wrap_cfg, xi, extra_args=self.sampler_extra_args, disable=False, callback=self.callback_state, sigmas=sigma_sched))
        self.add_infotext(p)
        return samples

    def sample(self, p, x, conditioning, unconditional_conditioning, steps=None, image_conditioning=None):  # mirrors (KDiffusionSampler.sample)
        steps = steps or p.steps
        sigmas = self.get_sigmas(p, steps)
        x = x * sigmas[0]
        self.initialize(p)
        self.last_latent = x
        self.sampler_extra_args = {
            'cond': conditioning,
            'image_cond': image_conditioning,
            'uncond': unconditional_conditioning,
            'cond_scale': p.cfg_scale,
            's_min_uncond': self.s_min_uncond,
        }
        samples = self.launch_sampling(steps, lambda: self.func(self.model_wrap_cfg, x, extra_args=self.sampler_extra_args, disable=False, callback=self.callback_state, sigmas=sigmas))
        self.add_infotext(p)
        return samples


samplers_data_k_diffusion = [  # mirrors modules/sd_samplers_kdiffusion.py (samplers_data_k_diffusion)
    sd_samplers_common.SamplerData(label, lambda model, funcname=funcname: KDiffusionSampler(funcname, model), aliases, options)
    for label, funcname, aliases, options in samplers_k_diffusion
]
