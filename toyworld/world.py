"""The trained toy models and the extension's objects built on them, shared by the evaluations."""

from typing import Optional, Sequence, Tuple

import numpy as np
import torch

from charadapter.adapter import RegionEncoder
from charadapter.layers import find_attn2_layers
from charadapter.phrases import PhraseBank
from charadapter.reference import SEGMENTATION_SEED, noise_latent, segment_reference, segmentation_prompt
from charadapter.tokens import phrase_positions

from . import data
from .model import WEIGHTS, load_image_side, load_sd

# The toy's text maps that localise: its 16x16 layers (level 1). Its 8x8 layers, which the
# extension's default (1, 2) adds, have 4-pixel cells and stay near chance (the per-level rows
# of the table); at 512 px on SD1.5 the same levels are 32x32 and 16x16 latent cells.
MAP_LEVELS = (1,)


class TextWorld:
    """A toy text-to-image model and what segmentation needs of it (training probes use this)."""

    def __init__(self, model, map_levels: Sequence[int] = MAP_LEVELS):
        self.model = model
        self.map_levels = tuple(map_levels)
        self.unet = model.model.diffusion_model
        self.layers = find_attn2_layers(self.unet)
        self.tokenizer = model.cond_stage_model.tokenizer
        self.alphas = model.alphas_cumprod.float()

    @torch.no_grad()
    def cond(self, prompts: Sequence[str]) -> torch.Tensor:
        return self.model.get_learned_conditioning(list(prompts))

    def groups(self, text: str, phrases: Sequence[str]) -> Tuple[Tuple[int, ...], ...]:
        chunks = [self.tokenizer.chunk(text)]
        return tuple(tuple(phrase_positions(chunks, self.tokenizer.encode_words(p))) for p in phrases)

    def bank(self, phrases: Sequence[str]) -> PhraseBank:
        """Each phrase encoded alone, its own token rows (after BOS, before EOS): what the runtime's
        phrase bank holds for a generation phrase the prompt lacks (charadapter.webui.prompts)."""
        rows = [enc[1:1 + len(self.tokenizer.encode_words(p))] for p, enc in zip(phrases, self.cond(phrases))]
        return PhraseBank.stack(rows)

    def located(self, text: str, phrases: Sequence[str]) -> Tuple[Tuple[Tuple[int, ...], ...], Optional[PhraseBank]]:
        """(token groups, bank): each phrase's tokens in `text`, or where `text` lacks it, its own
        tokens from a phrase bank (the runtime's PhraseFinder.groups); bank None when all are in `text`."""
        inside = self.groups(text, phrases)
        if all(inside):
            return inside, None
        bank = self.bank(phrases)
        return tuple(g or bank.entries(r) for r, g in enumerate(inside)), bank

    def segment(self, image: np.ndarray, phrases: Sequence[str], timestep: int, threshold: float = 0.5,
                levels: Optional[Sequence[int]] = None):
        """What the runtime's _segment does, at the toy model's native 32 px."""
        text = segmentation_prompt(phrases)
        groups = self.groups(text, phrases)
        x = torch.from_numpy(data.to_x0([image]))  # (1, 3, H, W)
        with torch.no_grad():
            latent = self.model.get_first_stage_encoding(self.model.encode_first_stage(x))
            cond = self.cond([text])
            noisy = noise_latent(latent, self.alphas, timestep, SEGMENTATION_SEED)
            t = torch.tensor([float(timestep)])
            result, _ = segment_reference(self.unet, self.layers, lambda: self.model.apply_model(noisy, t, cond),
                                          tuple(noisy.shape[-2:]), groups, levels=levels or self.map_levels,
                                          threshold=threshold)
        return result


class World(TextWorld):
    """The loaded toy models and the extension's objects built on them."""

    def __init__(self, weights: str = WEIGHTS, map_levels: Sequence[int] = MAP_LEVELS):
        super().__init__(load_sd(weights), map_levels)
        self.adapter, self.clip = load_image_side(weights)
        self.encoder = RegionEncoder(self.adapter, self.clip)
        self.ip = [(k.float(), v.float()) for k, v in self.adapter.layers]


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks (1 when both are empty)."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0
