"""Reference image intake: decode any input the UI or the API sends into a plain RGB image.

Every failure raises ImageInputError naming the input and what was wrong. Size is checked
from the header before any pixel is decoded, so a decompression bomb costs nothing, whatever
PIL's global MAX_IMAGE_PIXELS says. PIL's LOAD_TRUNCATED_IMAGES is never touched.

Accepted as they are: any mode (CMYK, 16-bit, palette, transparency over grey), EXIF rotation.
Animated GIF/WebP/PNG: the first frame is used and the result's `info["frames"]` says how many
there were, so the host can tell the user. A reference (`min_side=MIN_REFERENCE_SIDE`) must be at
least 32 px on its short side: smaller ones hold no character to keep.
"""

import base64
import binascii
import hashlib
import io
import os
from typing import Any, Tuple

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageInputError

MAX_PIXELS = 64_000_000  # 64 MP: far above any sane reference, far below a bomb
MIN_REFERENCE_SIDE = 32  # px on the short side: below it CLIP sees a blur of a few pixels
GREY = (127, 127, 127)  # neutral background for transparency and padding

_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_16BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def load_image(source: Any, max_pixels: int = MAX_PIXELS, min_side: int = 1) -> Image.Image:
    """Decode a PIL image, numpy array, bytes, base64 / data URL string or file path into RGB."""
    img = _load(source, max_pixels)
    if min(img.size) < min_side:
        raise ImageInputError(
            f"the reference image is only {img.size[0]}x{img.size[1]} pixels; it needs at least "
            f"{min_side} px on its short side to show a character")
    return img


def _load(source: Any, max_pixels: int) -> Image.Image:
    if isinstance(source, Image.Image):
        return _normalise(source, "image", max_pixels)
    if isinstance(source, np.ndarray):
        return _normalise(_from_array(source, max_pixels), "array", max_pixels)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _decode_bytes(bytes(source), f"{len(source)} bytes of image data", max_pixels)
    if isinstance(source, os.PathLike):
        return _from_file(os.fspath(source), max_pixels)
    if isinstance(source, str):
        return _from_string(source, max_pixels)
    if isinstance(source, dict) and "image" in source:
        # gradio 3 sketch/mask components send {"image": ..., "mask": ...}
        return _load(source["image"], max_pixels)
    if source is None:
        raise ImageInputError("no reference image was given (got None)")
    raise ImageInputError(
        f"unsupported reference image type {type(source).__name__}; expected a PIL image, "
        "numpy array, bytes, base64 string or file path"
    )


def image_hash(img: Image.Image) -> str:
    """Short stable hash (10 hex chars of sha256) of an image's RGB pixels and size."""
    rgb = img if img.mode == "RGB" else img.convert("RGB")
    digest = hashlib.sha256(f"{rgb.size[0]}x{rgb.size[1]}:".encode())
    digest.update(rgb.tobytes())
    return digest.hexdigest()[:10]


def pad_to_square(img: Image.Image, color: Tuple[int, int, int] = GREY) -> Image.Image:
    """Centre the image on a square canvas of `color` (RGB); nothing is cropped."""
    rgb = img if img.mode == "RGB" else _to_rgb(img, "image", tuple(int(c) for c in color))
    w, h = rgb.size
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), tuple(int(c) for c in color))
    canvas.paste(rgb, ((side - w) // 2, (side - h) // 2))
    return canvas


# --- sources -------------------------------------------------------------------------------


def _from_string(text: str, max_pixels: int) -> Image.Image:
    """Route a string: data URL, existing file path, else raw base64."""
    s = text.strip()
    if not s:
        raise ImageInputError("reference image string is empty (expected base64 data or a file path)")
    if s.startswith("data:"):
        header, comma, payload = s.partition(",")
        if not comma or ";base64" not in header:
            raise ImageInputError(f"data URL '{header[:40]}' has no ';base64,' payload")
        return _decode_bytes(decode_base64(payload, "data URL payload"), "data URL image", max_pixels)
    if s.startswith(("http://", "https://")):
        raise ImageInputError(f"URLs are not fetched ({s[:60]}); send the image itself or base64")
    if len(s) < 4096 and os.path.exists(s):
        return _from_file(s, max_pixels)
    try:
        data = decode_base64(s, "base64 string")
    except ImageInputError as err:
        if len(s) < 4096 and (os.sep in s or "/" in s or "." in s):
            raise ImageInputError(f"file not found: '{s}' (and the string is not base64 either)") from err
        raise
    return _decode_bytes(data, f"base64 string of {len(s)} chars", max_pixels)


def decode_base64(payload: str, what: str) -> bytes:
    """Strict base64 decode (whitespace and missing padding tolerated, url-safe alphabet too)."""
    p = "".join(payload.split())
    if not p:
        raise ImageInputError(f"{what} is empty (0 characters of base64)")
    if "-" in p or "_" in p:
        p = p.replace("-", "+").replace("_", "/")
    p += "=" * (-len(p) % 4)
    try:
        data = base64.b64decode(p, validate=True)
    except (binascii.Error, ValueError) as err:
        raise ImageInputError(f"{what} is not valid base64 ({err}); starts with '{p[:20]}'") from err
    if not data:
        raise ImageInputError(f"{what} decodes to 0 bytes")
    return data


def _from_file(path: str, max_pixels: int) -> Image.Image:
    """Open an image file; the file is closed before returning."""
    if not os.path.isfile(path):
        raise ImageInputError(f"reference image file not found or not a file: '{path}'")
    if os.path.getsize(path) == 0:
        raise ImageInputError(f"reference image file '{path}' is empty (0 bytes)")
    with open(path, "rb") as fp:
        return _decode_stream(fp, f"file '{path}'", max_pixels)


def _decode_bytes(data: bytes, what: str, max_pixels: int) -> Image.Image:
    """Decode encoded image bytes (PNG, JPEG, WebP, GIF, ...)."""
    if len(data) == 0:
        raise ImageInputError(f"{what}: zero bytes, expected an encoded image")
    return _decode_stream(io.BytesIO(data), what, max_pixels)


def _decode_stream(fp, what: str, max_pixels: int) -> Image.Image:
    """Open lazily (header only), then normalise; closes the PIL handle."""
    try:
        img = Image.open(fp)
    except Image.DecompressionBombError as err:
        raise ImageInputError(f"{what} is too large to decode safely: {err}") from err
    except UnidentifiedImageError as err:
        raise ImageInputError(
            f"{what} is not a recognised image format (it starts with {_head(fp)!r})"
        ) from err
    except Exception as err:  # noqa: BLE001 - plugins raise many types on bad headers
        raise ImageInputError(
            f"{what} has an unreadable header: the file is truncated or corrupt ({type(err).__name__}: {err})"
        ) from err
    try:
        return _normalise(img, what, max_pixels)
    finally:
        img.close()


def _head(fp, size: int = 12) -> bytes:
    """The first bytes of a stream, to show what a non-image file really is."""
    try:
        fp.seek(0)
        return fp.read(size)
    except Exception:  # noqa: BLE001 - only for the message
        return b""


def _from_array(arr: np.ndarray, max_pixels: int) -> Image.Image:
    """(H, W), (H, W, 1|2|3|4) arrays: uint8, uint16, bool, other ints 0..255, floats 0..1."""
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]  # (H, W, 1) -> (H, W)
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (2, 3, 4)):
        raise ImageInputError(f"array of shape {arr.shape}: expected (H, W) or (H, W, C) with C in 1..4")
    h, w = arr.shape[:2]
    _check_size(w, h, f"array of shape {arr.shape}", max_pixels)
    arr = _array_to_uint8(arr)
    return Image.fromarray(np.ascontiguousarray(arr))  # mode from shape: L, LA, RGB, RGBA


def _array_to_uint8(arr: np.ndarray) -> np.ndarray:
    """Scale an array's values to uint8: floats 0..1, uint16 by 257, ints already 0..255."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    if arr.dtype == np.uint16:
        return _scale16(arr)
    if np.issubdtype(arr.dtype, np.integer):
        lo, hi = int(arr.min()), int(arr.max())
        if lo >= 0 and hi <= 255:
            return arr.astype(np.uint8)
        if lo >= 0 and hi <= 65535:
            return _scale16(arr)
        raise ImageInputError(f"integer array ({arr.dtype}) spans {lo}..{hi}; expected 0..255 or 0..65535")
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise ImageInputError(f"float array ({arr.dtype}) contains NaN or infinity")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < -1e-3 or hi > 1.0 + 1e-3:
            raise ImageInputError(f"float array ({arr.dtype}) spans {lo:.4g}..{hi:.4g}; expected 0..1")
        return np.round(np.clip(arr, 0.0, 1.0) * 255.0).astype(np.uint8)
    raise ImageInputError(f"array dtype {arr.dtype} is not an image type (expected uint8, uint16, bool or float)")


def _scale16(arr: np.ndarray) -> np.ndarray:
    """Map 0..65535 to 0..255 (divide by 257, rounded): the whole range keeps its gradient."""
    return np.round(arr.astype(np.float64) / 257.0).astype(np.uint8)


# --- normalisation -------------------------------------------------------------------------


def _check_size(w: int, h: int, what: str, max_pixels: int) -> None:
    """Reject empty and absurdly large images from their size alone."""
    if w <= 0 or h <= 0:
        raise ImageInputError(f"{what} has size {w}x{h}; expected at least 1x1 pixels")
    if w * h > max_pixels:
        raise ImageInputError(
            f"{what} is {w}x{h} = {w * h / 1e6:.1f} MP, more than the {max_pixels / 1e6:.0f} MP limit; "
            "downscale it first"
        )


def _normalise(img: Image.Image, what: str, max_pixels: int) -> Image.Image:
    """Size check (header only), decode, first frame, EXIF orientation, then RGB. Returns a new image."""
    _check_size(img.size[0], img.size[1], what, max_pixels)
    try:
        frames = int(getattr(img, "n_frames", 1) or 1) if getattr(img, "is_animated", False) else 1
        if img.tell() != 0:
            img.seek(0)  # animated input already advanced: use the first frame
        img.load()
    except ImageInputError:
        raise
    except Exception as err:  # noqa: BLE001 - decoders raise OSError, SyntaxError, EOFError, zlib.error ...
        raise ImageInputError(
            f"could not decode the pixels of {what} ({type(err).__name__}: {err}); "
            "the file is truncated or corrupt"
        ) from err
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - a broken EXIF block must not reject a good image
        pass
    rgb = _to_rgb(img, what)
    if frames > 1:
        rgb.info["frames"] = frames
    return rgb


def _to_rgb(img: Image.Image, what: str, background: Tuple[int, int, int] = GREY) -> Image.Image:
    """Convert any PIL mode to RGB; transparency is composited over `background` (neutral grey)."""
    mode = img.mode
    if mode in _16BIT_MODES or mode == "I":
        return Image.fromarray(_int_to_uint8(img)).convert("RGB")
    if mode == "F":
        return Image.fromarray(_float_to_uint8(np.asarray(img, dtype=np.float64))).convert("RGB")
    if mode in _ALPHA_MODES or "transparency" in img.info:
        try:
            rgba = img.convert("RGBA")
        except (ValueError, OSError) as err:
            raise ImageInputError(f"{what}: cannot convert mode {mode} with transparency to RGBA ({err})") from err
        canvas = Image.new("RGBA", img.size, tuple(background) + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    try:
        return img.convert("RGB")  # RGB -> copy; L, 1, P, CMYK, YCbCr, RGBX, HSV convert natively
    except (ValueError, OSError) as err:
        raise ImageInputError(f"{what}: image mode {mode} cannot be converted to RGB ({err})") from err


def _int_to_uint8(img: Image.Image) -> np.ndarray:
    """16/32-bit integer greyscale to uint8 by scaling, never by clipping."""
    try:
        arr = np.asarray(img)
    except Exception:  # noqa: BLE001 - some PIL versions lack an array interface for I;16B/N
        arr = np.asarray(img.convert("I"))
    arr = arr.astype(np.int64)  # (H, W)
    if img.mode in _16BIT_MODES:
        return _scale16(arr)
    lo, hi = int(arr.min()), int(arr.max())
    if img.format == "PNG" or (lo >= 0 and 255 < hi <= 65535):
        return _scale16(np.clip(arr, 0, 65535))  # older PIL opens 16-bit PNG as "I"
    if lo >= 0 and hi <= 255:
        return arr.astype(np.uint8)
    return _float_to_uint8(arr.astype(np.float64))


def _float_to_uint8(arr: np.ndarray) -> np.ndarray:
    """Float greyscale to uint8: 0..1 and 0..255 kept as such, any other range stretched."""
    arr = np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = float(arr.min()), float(arr.max())
    if lo >= 0.0 and hi <= 1.0:
        arr = arr * 255.0
    elif not (lo >= 0.0 and hi <= 255.0):
        arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
    return np.round(np.clip(arr, 0.0, 255.0)).astype(np.uint8)
