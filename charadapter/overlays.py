"""Show-masks pictures: region labels of a grid tinted over an image (host-free, PIL)."""

import colorsys
from typing import List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .geometry import Box, Frac, content_rect

PALETTE = [(230, 60, 60), (60, 180, 75), (60, 110, 230), (245, 200, 40), (200, 70, 220), (40, 200, 220),
           (245, 130, 50), (150, 100, 60)]


def mask_overlay(image: Image.Image, labels: np.ndarray,
                 colors: Optional[Sequence[Tuple[int, int, int]]] = None, alpha: float = 0.45,
                 content: Optional[Frac] = None, boxes: Optional[Sequence[Box]] = None) -> Image.Image:
    """Tint each pixel of the image by the region label (h, w) of its grid cell (-1: none)."""
    colors = list(colors) if colors else PALETTE
    rgb = image.convert("RGB")
    W, H = rgb.size
    h, w = labels.shape
    cx0, cy0, cx1, cy1 = content_rect(content)
    # grid cell of each pixel centre: pixel -> canvas fraction -> cell
    cols = np.floor((cx0 + (np.arange(W) + 0.5) / W * (cx1 - cx0)) * w).astype(np.int64).clip(0, w - 1)
    rows = np.floor((cy0 + (np.arange(H) + 0.5) / H * (cy1 - cy0)) * h).astype(np.int64).clip(0, h - 1)
    shifted = (np.clip(labels, -1, 254) + 1).astype(np.uint8)  # (h, w): 0 = background, r + 1
    per_pixel = Image.fromarray(shifted[rows[:, None], cols[None, :]])  # (H, W), mode L
    tint = per_pixel.copy()  # putpalette makes an L image P, keeping the values as indices
    tint.putpalette([0, 0, 0] + [c for r in range(255) for c in colors[r % len(colors)]])
    opacity = int(round(255 * min(max(alpha, 0.0), 1.0)))
    mask = per_pixel.point(lambda v: opacity if v else 0)
    out = Image.composite(tint.convert("RGB"), rgb, mask)
    if boxes:
        draw = ImageDraw.Draw(out)
        width = max(1, round(min(W, H) / 200))
        for r, (left, top, right, bottom) in enumerate(boxes):
            draw.rectangle((left, top, right - 1, bottom - 1), outline=colors[r % len(colors)], width=width)
    return out


def pair_colors(regions: Sequence[int]) -> List[Tuple[int, int, int]]:
    """Colours of the (character, region) pairs of characters with R_k regions (0: one whole-figure
    pair): one hue per character (PALETTE), its regions in shades of it, lightest first."""
    colors = []
    for k, count in enumerate(regions):
        hue, saturation, _ = colorsys.rgb_to_hsv(*(c / 255.0 for c in PALETTE[k % len(PALETTE)]))
        count = max(int(count), 1)
        for j in range(count):
            value = 1.0 - 0.55 * j / max(count - 1, 1) if count > 1 else 0.9
            colors.append(tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(hue, saturation, value)))
    return colors


def layout_overlay(image: Image.Image, labels: np.ndarray, paste_to: Optional[Sequence[int]],
                   colors: Optional[Sequence[Tuple[int, int, int]]] = None) -> Image.Image:
    """Layout labels (h, w) over a generated image, or over the box (x, y, w, h) an "only masked"
    inpaint pasted its sampled crop into."""
    if not paste_to:
        return mask_overlay(image, labels, colors=colors)
    x, y, w, h = (int(v) for v in paste_to)
    out = image.convert("RGB")
    out.paste(mask_overlay(out.crop((x, y, x + w, y + h)), labels, colors=colors), (x, y))
    return out


def with_legend(image: Image.Image, lines: Sequence[str],
                colors: Optional[Sequence[Tuple[int, int, int]]] = None) -> Image.Image:
    """The image over a white strip with one line per region: its tint colour, then `lines[r]`
    (the strip widens the picture when a line is longer than the image is wide)."""
    if not lines:
        return image
    colors = list(colors) if colors else PALETTE
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(image)
    boxes = [probe.textbbox((0, 0), line, font=font) for line in lines]
    line_h = max(b[3] for b in boxes) + 4
    swatch = line_h - 4
    width = max(image.width, max(b[2] for b in boxes) + swatch + 12)
    out = Image.new("RGB", (width, image.height + line_h * len(lines) + 4), (255, 255, 255))
    out.paste(image.convert("RGB"), (0, 0))
    draw = ImageDraw.Draw(out)
    for r, line in enumerate(lines):
        y = image.height + 4 + r * line_h
        draw.rectangle((4, y, 4 + swatch - 1, y + swatch - 1), fill=colors[r % len(colors)])
        draw.text((8 + swatch, y), line, fill=(0, 0, 0), font=font)
    return out
