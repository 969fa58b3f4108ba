"""Show masks: the reference with its region masks, and the sampling layout over each image."""

from typing import List, Optional

from PIL import Image

from ..fusion import FusionSession
from ..masks import layout_labels
from ..overlays import layout_overlay
from .reference_pass import Reference


def show_masks(p, processed, image: Image.Image, reference: Reference, fusion: Optional[FusionSession]) -> None:
    """Add the pictures to the results, each with the first image's infotext."""
    extra: List[Image.Image] = []
    if reference.segmentation is not None:  # rendered only when asked for
        extra.append(reference.segmentation.to_overlay(image, boxes=reference.boxes))
    layout = fusion.masks if fusion is not None else None
    if layout is not None and fusion.latent_hw is not None:
        labels = layout_labels(layout, fusion.latent_hw).numpy()  # (B, h, w), background -1
        # the layout is the last batch's: after a grid (index_of_first_image) and earlier batches
        start = int(getattr(processed, "index_of_first_image", 0) or 0)
        start += int(getattr(p, "iteration", 0) or 0) * int(getattr(p, "batch_size", 1) or 1)
        images = list(processed.images)[start:start + layout.shape[0]]
        paste_to = getattr(p, "paste_to", None)  # inpaint "only masked": the crop was sampled
        extra += [layout_overlay(img, labels[index], paste_to) for index, img in enumerate(images)]
    processed.images.extend(extra)
    processed.infotexts.extend([processed.infotexts[0] if processed.infotexts else ""] * len(extra))
