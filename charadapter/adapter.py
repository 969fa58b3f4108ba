"""Region-level adapters: region crops -> CLIP features -> IP-Adapter image tokens."""

from dataclasses import dataclass
from typing import Sequence

import torch
from PIL import Image

from .checkpoint import IPAdapterWeights
from .clip_vision import encode_images, encoder_name, feature_dim, negative_features, preprocess_images
from .errors import MismatchError
from .projection import build_image_projection


@dataclass
class RegionTokens:
    """Image tokens of every region and the adapter's negative tokens, on the CPU in fp32."""

    cond: torch.Tensor  # (R, T, C_ctx)
    negative: torch.Tensor  # (T, C_ctx)


class RegionEncoder:
    """An IP-Adapter's image projection with its CLIP encoder; encodes region crops."""

    def __init__(self, weights: IPAdapterWeights, clip_model: torch.nn.Module):
        expected = weights.spec.encoder
        found = encoder_name(clip_model)
        if found is not None and found != expected:
            raise MismatchError(
                f"{weights.source} needs the {expected} image encoder, but the chosen encoder is {found}"
            )
        width = feature_dim(clip_model, weights.spec.plus)
        if width != weights.spec.clip_dim:  # an encoder of unknown shape, or a fine-tune of another width
            what = "hidden states" if weights.spec.plus else "image embeds"
            raise MismatchError(
                f"{weights.source} takes {weights.spec.clip_dim}-wide CLIP {what} ({expected}), but the "
                f"chosen image encoder gives {width}-wide ones: choose the encoder the adapter was trained with"
            )
        self.weights = weights
        self.clip_model = clip_model
        self.projection = build_image_projection(weights)

    @property
    def plus(self) -> bool:
        """Plus-type adapters take the encoder's penultimate hidden states."""
        return self.weights.spec.plus

    def encode(self, crops: Sequence[Image.Image]) -> RegionTokens:
        """Tokens (R, T, C_ctx) of the crops and the negative tokens (T, C_ctx)."""
        pixels = preprocess_images(list(crops))  # (R, 3, 224, 224)
        features = encode_images(self.clip_model, pixels, self.plus).float()  # (R, E) or (R, S, W)
        negative = negative_features(self.clip_model, self.plus, features[:1]).float()
        with torch.no_grad():
            tokens = self.projection(features)  # (R, T, C_ctx)
            negative_tokens = self.projection(negative)[0]  # (T, C_ctx)
        return RegionTokens(tokens.cpu(), negative_tokens.cpu())
