"""Show masks: the reference with its region masks, and the sampling layout over each image with
a legend saying how each region was located (in the prompt / from the phrase)."""

from typing import List, Optional, Sequence

from PIL import Image

from ..fusion import FusionSession
from ..masks import layout_labels
from ..overlays import layout_overlay, with_legend
from .reference_pass import Reference


def show_masks(p, processed, image: Image.Image, reference: Reference, fusion: Optional[FusionSession],
               phrases: Sequence[str] = (), located: Sequence[Sequence[str]] = ()) -> None:
    """Add the pictures to the results, each with the first image's infotext. `located[i]`: how
    each region of image i of the run (all_prompts order) was located."""
    extra: List[Image.Image] = []
    if reference.segmentation is not None:  # rendered only when asked for
        extra.append(reference.segmentation.to_overlay(image, boxes=reference.boxes))
    layout = fusion.masks if fusion is not None else None
    if layout is not None and fusion.latent_hw is not None:
        labels = layout_labels(layout, fusion.latent_hw).numpy()  # (B, h, w), background -1
        # the layout is the last batch's: after a grid (index_of_first_image) and earlier batches
        first = int(getattr(p, "iteration", 0) or 0) * int(getattr(p, "batch_size", 1) or 1)
        start = int(getattr(processed, "index_of_first_image", 0) or 0) + first
        images = list(processed.images)[start:start + layout.shape[0]]
        paste_to = getattr(p, "paste_to", None)  # inpaint "only masked": the crop was sampled
        for index, img in enumerate(images):
            kinds = located[first + index] if first + index < len(located) else ()
            legend = [f"{phrase}: {kind}" for phrase, kind in zip(phrases, kinds)]
            extra.append(with_legend(layout_overlay(img, labels[index], paste_to), legend))
    processed.images.extend(extra)
    processed.infotexts.extend([processed.infotexts[0] if processed.infotexts else ""] * len(extra))
