"""Show masks: each reference with its region masks, and the sampling layout over each image with
a legend saying how each phrase was located (in the prompt / from the phrase)."""

from typing import List, Optional, Sequence, Tuple

from PIL import Image

from ..fusion import FusionSession
from ..masks import layout_labels
from ..overlays import PALETTE, layout_overlay, pair_colors, with_legend
from ..params import Params
from .reference_pass import Prepared

Color = Tuple[int, int, int]


def show_masks(p, processed, params: Params, prepared: Sequence[Prepared], fusion: Optional[FusionSession],
               phrases: Sequence[str] = (), located: Sequence[Sequence[str]] = ()) -> None:
    """Add the pictures to the results, each with the first image's infotext. `located[i]`: how
    each mapped phrase of image i of the run (all_prompts order) was located. With several
    characters, colours name the character (hue) and the region (shade) in every picture."""
    counts = [len(c.regions) for c in params.characters]
    colors = pair_colors(counts) if len(counts) > 1 else None  # one character: a hue per region, as always
    extra: List[Image.Image] = []
    first_pair = 0
    for count, done in zip(counts, prepared):
        segmentation = done.reference.segmentation
        if segmentation is not None:  # rendered only when asked for
            own = colors[first_pair:first_pair + count] if colors else None
            extra.append(segmentation.to_overlay(done.image, colors=own, boxes=done.reference.boxes))
        first_pair += max(count, 1)
    layout = fusion.masks if fusion is not None else None
    if layout is not None and fusion.latent_hw is not None:
        labels = layout_labels(layout, fusion.latent_hw).numpy()  # (B, h, w): pair index, background -1
        # the layout is the last batch's: after a grid (index_of_first_image) and earlier batches
        first = int(getattr(p, "iteration", 0) or 0) * int(getattr(p, "batch_size", 1) or 1)
        start = int(getattr(processed, "index_of_first_image", 0) or 0) + first
        images = list(processed.images)[start:start + layout.shape[0]]
        paste_to = getattr(p, "paste_to", None)  # inpaint "only masked": the crop was sampled
        for index, img in enumerate(images):
            kinds = located[first + index] if first + index < len(located) else ()
            lines, line_colors = legend(params, phrases, kinds, colors)
            overlay = layout_overlay(img, labels[index], paste_to, colors)
            extra.append(with_legend(overlay, lines) if line_colors is None
                         else with_legend(overlay, lines, colors=line_colors))
    processed.images.extend(extra)
    processed.infotexts.extend([processed.infotexts[0] if processed.infotexts else ""] * len(extra))


def legend(params: Params, phrases: Sequence[str], kinds: Sequence[str],
           colors: Optional[Sequence[Color]]) -> Tuple[List[str], Optional[List[Color]]]:
    """The layout picture's legend: one line per region (phrase: how it was located); with several
    characters one per (character, region) pair in its colour, then each character's subject."""
    if colors is None:
        return [f"{phrase}: {kind}" for phrase, kind in zip(phrases, kinds)], None
    if not kinds:
        return [], None
    lines, line_colors = [], []
    column = pair = 0
    for character in params.characters:
        for region in character.regions or (None,):
            if region is None:
                lines.append(f"{character.label}: the whole figure")
            else:
                lines.append(f"{character.label}, {region.phrase}: {kinds[column] if column < len(kinds) else ''}")
                column += 1
            line_colors.append(colors[pair])
            pair += 1
    for k, character in enumerate(params.characters):
        lines.append(f"{character.label}, subject {character.subject}: {kinds[column] if column < len(kinds) else ''}")
        line_colors.append(PALETTE[k % len(PALETTE)])
        column += 1
    return lines, line_colors
