"""Show masks: each reference with its region masks, and the sampling layout over each image."""

from typing import List, Optional, Sequence

from PIL import Image

from ..fusion import FusionSession
from ..masks import layout_labels
from ..overlays import layout_overlay, pair_colors
from ..params import Params
from .reference_pass import Prepared


def show_masks(p, processed, params: Params, prepared: Sequence[Prepared], fusion: Optional[FusionSession]) -> None:
    """Add the pictures to the results, each with the first image's infotext. With several
    characters, colours name the character (hue) and the region (shade) in every picture."""
    counts = [len(c.regions) for c in params.characters]
    colors = pair_colors(counts) if len(counts) > 1 else None  # one character: a hue per region, as always
    extra: List[Image.Image] = []
    first = 0
    for count, done in zip(counts, prepared):
        segmentation = done.reference.segmentation
        if segmentation is not None:  # rendered only when asked for
            own = colors[first:first + count] if colors else None
            extra.append(segmentation.to_overlay(done.image, colors=own, boxes=done.reference.boxes))
        first += max(count, 1)
    layout = fusion.masks if fusion is not None else None
    if layout is not None and fusion.latent_hw is not None:
        labels = layout_labels(layout, fusion.latent_hw).numpy()  # (B, h, w): pair index, background -1
        # the layout is the last batch's: after a grid (index_of_first_image) and earlier batches
        start = int(getattr(processed, "index_of_first_image", 0) or 0)
        start += int(getattr(p, "iteration", 0) or 0) * int(getattr(p, "batch_size", 1) or 1)
        images = list(processed.images)[start:start + layout.shape[0]]
        paste_to = getattr(p, "paste_to", None)  # inpaint "only masked": the crop was sampled
        extra += [layout_overlay(img, labels[index], paste_to, colors) for index, img in enumerate(images)]
    processed.images.extend(extra)
    processed.infotexts.extend([processed.infotexts[0] if processed.infotexts else ""] * len(extra))
