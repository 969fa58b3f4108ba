"""Reference image intake: every input form and every PIL mode becomes a plain RGB image."""

import base64
import io
import pathlib
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from charadapter.errors import CharacterAdapterError, ImageInputError
from charadapter.images import image_hash, load_image, pad_to_square


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (1-bit grey) with a token IDAT: costs bytes, not pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_error_type_is_value_error():
    assert issubclass(ImageInputError, CharacterAdapterError) and issubclass(ImageInputError, ValueError)


def test_tiny_and_extreme_aspect():
    one = load_image(Image.new("RGB", (1, 1), (9, 8, 7)))
    assert one.mode == "RGB" and one.size == (1, 1) and one.getpixel((0, 0)) == (9, 8, 7)
    wide = load_image(encode(Image.new("RGB", (10000, 40), (1, 2, 3))))
    assert wide.size == (10000, 40)
    tall = load_image(np.zeros((10000, 40, 3), np.uint8))
    assert tall.size == (40, 10000)


def test_rgba_transparent_becomes_grey_not_black():
    img = Image.new("RGBA", (4, 2), (0, 0, 0, 0))
    img.putpixel((1, 0), (255, 0, 0, 255))
    img.putpixel((2, 0), (255, 0, 0, 128))
    out = load_image(encode(img))
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (127, 127, 127)
    assert out.getpixel((1, 0)) == (255, 0, 0)
    r, g, b = out.getpixel((2, 0))
    assert abs(r - 191) <= 2 and abs(g - 63) <= 2  # half red over grey
    la = load_image(Image.new("LA", (2, 2), (0, 0)))
    assert la.getpixel((0, 0)) == (127, 127, 127)


def test_palette_with_transparency():
    img = Image.new("P", (4, 4), 0)
    img.putpalette([0, 0, 0, 0, 255, 0] + [0] * (254 * 3))
    img.putpixel((1, 1), 1)
    img.info["transparency"] = 0
    out = load_image(encode(img))
    assert out.getpixel((0, 0)) == (127, 127, 127)  # transparent index: grey, not black
    assert out.getpixel((1, 1)) == (0, 255, 0)
    plain = Image.new("P", (2, 2), 1)
    plain.putpalette([0, 0, 0, 10, 20, 30] + [0] * (254 * 3))
    assert load_image(encode(plain)).getpixel((0, 0)) == (10, 20, 30)


def test_greyscale_and_bilevel():
    assert load_image(encode(Image.new("L", (3, 3), 200))).getpixel((1, 1)) == (200, 200, 200)
    assert load_image(Image.new("1", (3, 3), 1)).getpixel((0, 0)) == (255, 255, 255)


def test_16bit_png_keeps_gradient():
    ramp = np.tile(np.linspace(0, 65535, 256).round().astype(np.uint16), (4, 1))  # (4, 256)
    img = Image.fromarray(ramp)
    assert img.mode == "I;16"
    out = np.asarray(load_image(encode(img)))[0, :, 0].astype(int)  # (256,)
    assert out[0] == 0 and out[-1] == 255
    assert np.all(np.diff(out) >= 0) and abs(out[128] - 128) <= 1
    assert np.abs(out - np.arange(256)).max() <= 1  # not clipped to 255 after the first step
    as_i = Image.fromarray(ramp.astype(np.int32))  # mode "I", as older PIL opens 16-bit PNGs
    assert as_i.mode == "I"
    assert np.asarray(load_image(as_i))[0, 128, 0] in (127, 128, 129)


def test_float_mode():
    f = Image.fromarray(np.linspace(0, 1, 11, dtype=np.float32).reshape(1, 11))
    assert f.mode == "F"
    out = np.asarray(load_image(f))[0, :, 0]
    assert out[0] == 0 and out[-1] == 255 and out[5] in (127, 128)


def test_cmyk_jpeg_and_ycbcr():
    red = Image.new("CMYK", (16, 16), (0, 255, 255, 0))
    out = load_image(encode(red, "JPEG", quality=95))
    r, g, b = out.getpixel((8, 8))
    assert r > 230 and g < 25 and b < 25
    ycc = Image.new("RGB", (4, 4), (30, 120, 200)).convert("YCbCr")
    assert max(abs(a - b) for a, b in zip(load_image(ycc).getpixel((0, 0)), (30, 120, 200))) <= 3


def test_animated_gif_uses_first_frame():
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    assert load_image(data).getpixel((4, 4)) == (255, 0, 0)
    advanced = Image.open(io.BytesIO(data))
    advanced.seek(2)
    assert load_image(advanced).getpixel((4, 4)) == (255, 0, 0)


def test_exif_orientation_applied():
    img = Image.new("RGB", (20, 10), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 10, 10))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    out = load_image(encode(img, "JPEG", exif=exif.tobytes(), quality=95))
    assert out.size == (10, 20)
    assert out.getpixel((5, 3))[0] > 200 and out.getpixel((5, 16))[0] < 50  # left half now on top


def test_numpy_inputs():
    hwc = np.zeros((5, 7, 3), np.uint8)
    hwc[..., 0] = 200
    assert load_image(hwc).getpixel((0, 0)) == (200, 0, 0)
    assert load_image(np.full((5, 7), 60, np.uint8)).getpixel((6, 4)) == (60, 60, 60)
    assert load_image(np.full((5, 7, 1), 60, np.uint8)).size == (7, 5)
    assert load_image(np.full((2, 2, 3), 0.5, np.float32)).getpixel((0, 0)) == (128, 128, 128)
    rgba = np.zeros((2, 2, 4), np.uint8)
    assert load_image(rgba).getpixel((0, 0)) == (127, 127, 127)
    assert load_image(np.full((2, 2), 65535, np.uint16)).getpixel((0, 0)) == (255, 255, 255)
    with pytest.raises(ImageInputError, match="0..1"):
        load_image(np.full((2, 2, 3), 200.0))
    with pytest.raises(ImageInputError, match="shape"):
        load_image(np.zeros((2, 2, 5), np.uint8))
    with pytest.raises(ImageInputError, match="4x0"):
        load_image(np.zeros((0, 4, 3), np.uint8))
    with pytest.raises(ImageInputError, match="NaN"):
        load_image(np.full((2, 2), np.nan))


def test_bytes_base64_and_data_url():
    img = Image.new("RGB", (6, 4), (10, 200, 30))
    data = encode(img)
    b64 = base64.b64encode(data).decode()
    for src in (data, bytearray(data), b64, "data:image/png;base64," + b64, b64[:40] + "\n" + b64[40:],
                b64.rstrip("=")):
        out = load_image(src)
        assert out.size == (6, 4) and out.getpixel((0, 0)) == (10, 200, 30)
    assert load_image({"image": b64, "mask": None}).size == (6, 4)


@pytest.mark.parametrize("src, words", [
    (b"", "zero bytes"),
    ("", "empty"),
    ("   ", "empty"),
    ("data:image/png;base64,", "empty"),
    ("data:image/png,abc", "base64"),
    ("this is *not* base64 !!", "not valid base64"),
    ("QUJD", "not a recognised image"),  # valid base64 of b"ABC"
    (b"hello, not an image", "not a recognised image"),
    ("https://example.com/x.png", "URLs are not fetched"),
    (None, "None"),
    (12, "unsupported"),
])
def test_bad_sources(src, words):
    with pytest.raises(ImageInputError, match=words):
        load_image(src)


def test_files(tmp_path: pathlib.Path):
    good = tmp_path / "ref.webp"
    Image.new("RGB", (5, 3), (1, 2, 3)).save(good, "PNG")  # wrong extension on purpose
    assert load_image(str(good)).size == (5, 3)
    assert load_image(good).size == (5, 3)
    zero = tmp_path / "zero.png"
    zero.write_bytes(b"")
    with pytest.raises(ImageInputError, match="empty"):
        load_image(str(zero))
    text = tmp_path / "notes.png"
    text.write_text("just some text, not a picture\n")
    with pytest.raises(ImageInputError, match="not a recognised image"):
        load_image(text)
    with pytest.raises(ImageInputError, match="not found"):
        load_image(str(tmp_path / "missing.png"))
    with pytest.raises(ImageInputError, match="not found"):
        load_image(tmp_path)


def test_truncated_png_reported():
    rng = np.random.default_rng(0)
    data = encode(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)))
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    with pytest.raises(ImageInputError, match="truncated or corrupt"):
        load_image(data[: len(data) // 2])
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


@pytest.mark.parametrize("pil_limit", ["default", None])
def test_huge_header_rejected_before_decoding(monkeypatch, pil_limit):
    if pil_limit is None:
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # hosts sometimes disable PIL's guard

    def no_decoding(self, *a, **k):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    start = time.perf_counter()
    for w, h in ((20000, 20000), (9000, 9000)):  # 400 MP (a bomb for PIL too), 81 MP (ours only)
        with pytest.raises(ImageInputError, match="too large|MP limit") as err:
            load_image(png_header_only(w, h))
        assert f"{w}x{h}" in str(err.value) or "pixels" in str(err.value)
    assert time.perf_counter() - start < 5.0  # header only; decoding 400 MP would take far longer
    with pytest.raises(ImageInputError, match="MP limit"):
        load_image(png_header_only(300, 300), max_pixels=10_000)


def test_image_hash():
    a = Image.new("RGB", (4, 1), (5, 5, 5))
    h = image_hash(a)
    assert len(h) == 10 and all(c in "0123456789abcdef" for c in h)
    assert image_hash(load_image(encode(a))) == h  # same pixels, other route
    assert image_hash(Image.new("RGB", (1, 4), (5, 5, 5))) != h  # same bytes, other size
    b = a.copy()
    b.putpixel((3, 0), (5, 5, 6))
    assert image_hash(b) != h
    assert image_hash(a.convert("L")) == image_hash(a.convert("L").convert("RGB"))


def test_pad_to_square():
    tall = Image.new("RGB", (10, 30), (255, 0, 0))
    sq = pad_to_square(tall)
    assert sq.size == (30, 30)
    assert sq.getpixel((15, 0)) == (255, 0, 0) and sq.getpixel((15, 29)) == (255, 0, 0)
    assert sq.getpixel((0, 15)) == (127, 127, 127) and sq.getpixel((29, 15)) == (127, 127, 127)
    wide = pad_to_square(Image.new("RGB", (31, 10), (0, 255, 0)), color=(1, 2, 3))
    assert wide.size == (31, 31) and wide.getpixel((15, 0)) == (1, 2, 3) and wide.getpixel((15, 15)) == (0, 255, 0)
    clear = pad_to_square(Image.new("RGBA", (4, 2), (0, 0, 0, 0)))
    assert clear.getpixel((1, 1)) == (127, 127, 127)  # transparency is grey, not black
    same = Image.new("RGB", (8, 8))
    assert pad_to_square(same).size == (8, 8) and pad_to_square(same) is not same
