"""Image helpers; mirrors modules/images.py (resize_image modes 0-2 with PIL LANCZOS, flatten)."""
from PIL import Image

LANCZOS = Image.Resampling.LANCZOS if hasattr(Image, 'Resampling') else Image.LANCZOS


def resize_image(resize_mode, im, width, height, upscaler_name=None, force_RGBA=False):  # mirrors modules/images.py (resize_image)
    """0: stretch; 1: resize to cover and centre-crop; 2: resize to fit and pad with stretched edges (approximated by black)."""
    if resize_mode == 0:
        return im.resize((width, height), resample=LANCZOS)
    ratio = width / height
    src_ratio = im.width / im.height
    if resize_mode == 1:
        src_w = width if ratio > src_ratio else im.width * height // im.height
        src_h = height if ratio <= src_ratio else im.height * width // im.width
        resized = im.resize((src_w, src_h), resample=LANCZOS)
        res = Image.new(im.mode, (width, height))
        res.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
        return res
    src_w = width if ratio < src_ratio else im.width * height // im.height
    src_h = height if ratio >= src_ratio else im.height * width // im.width
    resized = im.resize((src_w, src_h), resample=LANCZOS)
    res = Image.new(im.mode, (width, height))
    res.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    return res


def flatten(img, bgcolor):  # mirrors modules/images.py (flatten): alpha composited onto bgcolor, RGB out
    if img.mode == "RGBA":
        background = Image.new('RGBA', img.size, bgcolor)
        background.paste(img, mask=img)
        img = background
    return img.convert('RGB')
