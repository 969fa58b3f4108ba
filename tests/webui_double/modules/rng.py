"""Seeded noise; mirrors modules/rng.py (ImageRNG) with CPU torch generators only (no subseeds / resize)."""
import torch

from modules import devices


class ImageRNG:  # mirrors modules/rng.py (ImageRNG)
    def __init__(self, shape, seeds, subseeds=None, subseed_strength=0.0, seed_resize_from_h=0, seed_resize_from_w=0):
        self.shape = tuple(map(int, shape))
        self.seeds = seeds
        self.subseeds = subseeds
        self.subseed_strength = subseed_strength
        self.generators = [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds]

    def next(self):  # mirrors (ImageRNG.next): (len(seeds), C, H, W), one generator per image
        x = torch.stack([torch.randn(self.shape, generator=g) for g in self.generators])
        return x.to(devices.device)
