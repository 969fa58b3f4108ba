"""Sampler registry; mirrors modules/sd_samplers.py (Euler and Heun only)."""
from modules import sd_samplers_kdiffusion

all_samplers = [*sd_samplers_kdiffusion.samplers_data_k_diffusion]  # mirrors modules/sd_samplers.py (all_samplers)
all_samplers_map = {x.name: x for x in all_samplers}  # mirrors (all_samplers_map)
samplers = all_samplers  # mirrors (samplers)
samplers_for_img2img = all_samplers  # mirrors (samplers_for_img2img)
samplers_map = {}  # mirrors (samplers_map)
for _sampler in all_samplers:
    samplers_map[_sampler.name.lower()] = _sampler.name
    for _alias in _sampler.aliases:
        samplers_map[_alias.lower()] = _sampler.name


def find_sampler_config(name):  # mirrors modules/sd_samplers.py (find_sampler_config): None -> the first, unknown -> None
    if name is not None:
        return all_samplers_map.get(name, None)
    return all_samplers[0]


def create_sampler(name, model):  # mirrors modules/sd_samplers.py (create_sampler)
    config = find_sampler_config(name)
    assert config is not None, f'bad sampler name: {name}'
    sampler = config.constructor(model)
    sampler.config = config
    return sampler


def fix_p_invalid_sampler_and_scheduler(p):  # mirrors modules/sd_samplers.py (fix_p_invalid_sampler_and_scheduler)
    if p.sampler_name not in all_samplers_map:
        p.sampler_name = all_samplers[0].name
