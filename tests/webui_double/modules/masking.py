"""Inpaint crop regions; mirrors modules/masking.py (our own implementation)."""
from PIL import Image


def get_crop_region_v2(mask, pad=0):  # mirrors modules/masking.py (get_crop_region_v2)
    """Bounding box (x1, y1, x2, y2) of the non-zero mask pixels grown by pad, or None for an empty mask."""
    mask = mask if isinstance(mask, Image.Image) else Image.fromarray(mask)
    box = mask.getbbox()
    if not box:
        return None
    if not pad:
        return box
    x1, y1, x2, y2 = box
    return max(x1 - pad, 0), max(y1 - pad, 0), min(x2 + pad, mask.size[0]), min(y2 + pad, mask.size[1])


def _grow(lo, hi, want, limit):
    """Grow [lo, hi) by `want` pixels split around it, shifted back inside [0, limit]."""
    lo -= want // 2
    hi += want - want // 2
    if hi >= limit:
        lo -= hi - limit
        hi = limit
    if lo < 0:
        hi -= lo
        lo = 0
    return lo, min(hi, limit)


def expand_crop_region(crop_region, processing_width, processing_height, image_width, image_height):  # mirrors modules/masking.py (expand_crop_region)
    """Grow the region along one axis until its aspect ratio matches the processing size."""
    x1, y1, x2, y2 = crop_region
    ratio_crop_region = (x2 - x1) / (y2 - y1)
    ratio_processing = processing_width / processing_height
    if ratio_crop_region > ratio_processing:
        y1, y2 = _grow(y1, y2, int((x2 - x1) / ratio_processing - (y2 - y1)), image_height)
    else:
        x1, x2 = _grow(x1, x2, int((y2 - y1) * ratio_processing - (x2 - x1)), image_width)
    return x1, y1, x2, y2
