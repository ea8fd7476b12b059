"""Untrusted image bytes decoded to RGB, or dropped by reason before any costly work."""

import io
import time
import tracemalloc

import pytest
from PIL import Image

from condense.cores.images import decode_rgb


def image_bytes(mode="RGB", size=(16, 12), fmt="PNG", color=None, **kw):
    colors = {"RGB": (200, 10, 10), "RGBA": (0, 0, 255, 0), "L": 128, "CMYK": (0, 255, 0, 0)}
    buf = io.BytesIO()
    Image.new(mode, size, color if color is not None else colors.get(mode, 1)).save(
        buf, format=fmt, **kw
    )
    return buf.getvalue()


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty_image"),
        (b"\x89PNG\r\n\x1a\n garbage", "corrupt_image"),
        (image_bytes(fmt="JPEG")[:200], "corrupt_image"),  # truncated JPEG
        (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "unsupported_format"),
        (image_bytes(fmt="TIFF"), "unsupported_format"),
        (image_bytes(fmt="PDF"), "unsupported_format"),
        (b"8BPS\x00\x01" + bytes(40), "unsupported_format"),  # Photoshop
    ],
)
def test_bad_or_refused_image_bytes_are_dropped_by_reason(data, reason):
    assert decode_rgb(data) == (None, reason)


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [
        ("RGB", "JPEG"),
        ("CMYK", "JPEG"),
        ("L", "PNG"),
        ("P", "PNG"),
        ("RGBA", "PNG"),
        ("RGB", "WEBP"),
        ("P", "GIF"),
        ("RGB", "BMP"),
    ],
)
def test_every_web_format_and_mode_becomes_rgb(mode, fmt):
    image, reason = decode_rgb(image_bytes(mode=mode, fmt=fmt))
    assert reason is None and image.mode == "RGB" and image.size == (16, 12)
    if mode == "RGBA":  # fully transparent blue: composited on white
        assert image.getpixel((0, 0)) == (255, 255, 255)


def test_decompression_bomb_guard():
    assert decode_rgb(image_bytes(size=(200, 200)), max_pixels=10_000) == (None, "too_large")
    huge = io.BytesIO()
    Image.new("1", (20_000, 20_000)).save(huge, format="PNG")  # 400M pixels, tiny file
    assert decode_rgb(huge.getvalue()) == (None, "too_large")


def test_extreme_aspect_ratios_are_refused_before_decoding():
    """Few pixels, but a resize to a 224-pixel short side would need gigabytes."""
    thin = io.BytesIO()
    Image.new("L", (1, 200_000)).save(thin, format="PNG")
    tall = io.BytesIO()
    Image.new("1", (8, 8_000_000)).save(tall, format="PNG")  # exactly max_pixels (64M)
    tracemalloc.start()
    start = time.perf_counter()
    assert decode_rgb(thin.getvalue()) == (None, "extreme_aspect")
    assert decode_rgb(tall.getvalue()) == (None, "extreme_aspect")
    assert time.perf_counter() - start < 1 and tracemalloc.get_traced_memory()[1] < 10_000_000
    tracemalloc.stop()
    assert decode_rgb(image_bytes(size=(500, 10)))[1] is None  # 50:1 is still allowed
    assert decode_rgb(image_bytes(size=(500, 10)), max_aspect_ratio=10) == (None, "extreme_aspect")


def test_animated_images_give_their_first_frame():
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    for fmt in ("GIF", "WEBP", "PNG"):
        buf = io.BytesIO()
        frames[0].save(buf, format=fmt, save_all=True, append_images=frames[1:], duration=50)
        image, reason = decode_rgb(buf.getvalue())
        assert reason is None and image.size == (8, 8)
        r, g, b = image.getpixel((4, 4))
        assert r > 200 and g < 50 and b < 50, fmt


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (16, 12), (0, 0, 0))
    image.putpixel((0, 0), (255, 255, 255))  # the stored top-left corner
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    buf = io.BytesIO()
    image.save(buf, format="JPEG", exif=exif, quality=100)
    upright, reason = decode_rgb(buf.getvalue())
    assert reason is None and upright.size == (12, 16)
    assert sum(upright.getpixel((11, 0))) > 600  # the corner is now top-right
    broken = buf.getvalue().replace(b"Exif\x00\x00", b"Exif\x00\x00\xff\xff\xff", 1)
    assert decode_rgb(broken)[0] is not None  # an unreadable EXIF leaves the pixels as stored


def test_16_bit_grayscale_is_scaled_not_clipped_to_white():
    import numpy as np

    ramp = np.linspace(0, 65535, 16 * 256).reshape(16, 256).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, format="PNG")  # opens as mode I;16
    image, reason = decode_rgb(buf.getvalue())
    pixels = np.asarray(image)[..., 0]
    assert reason is None and image.mode == "RGB"
    assert pixels.min() == 0 and pixels.max() == 255 and len(np.unique(pixels)) > 200
    assert abs(int(pixels.ravel()[pixels.size // 2]) - 128) <= 1  # mid-ramp is mid-gray
