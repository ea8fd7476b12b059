"""Decoding untrusted image bytes into RGB, or a reason why not.

Every decoder problem becomes a drop reason, never an exception. Only the formats a web corpus
should hold are opened (JPEG, PNG, WebP, GIF, BMP): Pillow never hands EPS, PSD, PDF or any
other format to its plugins, some of which call external programs. Before any pixel is decoded,
the header's size is checked: the pixel count (a decompression-bomb guard) and the aspect ratio
(a 1 x 200,000 image has few pixels, but resized to a 224-pixel short side it would hold 45
billion). Animated images give their first frame; the EXIF orientation is applied; CMYK,
palette, grayscale (16-bit scaled, not clipped) and alpha images become RGB, transparent pixels
composited on white.

The embed stage, the trainer and `condense chat` all decode through `decode_rgb`.
"""

from __future__ import annotations

import io
import warnings

MAX_PIXELS = 64_000_000  # larger images are dropped as `too_large` before decoding
MAX_ASPECT_RATIO = 50.0  # long side / short side; larger: `extreme_aspect`
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")  # what Pillow may open

# Magic bytes of image formats condense refuses to open, for a precise drop reason.
_REFUSED_MAGIC = (
    b"%!PS",  # PostScript / EPS
    b"\xc5\xd0\xd3\xc6",  # binary EPS
    b"8BPS",  # Photoshop
    b"II*\x00",  # TIFF
    b"MM\x00*",  # TIFF
    b"%PDF",
    b"\x00\x00\x01\x00",  # ICO
    b"\x00\x00\x00\x0cjP",  # JPEG 2000
    b"<?xml",
    b"<svg",
)


def decode_rgb(
    data: bytes, max_pixels: int = MAX_PIXELS, max_aspect_ratio: float = MAX_ASPECT_RATIO
):
    """(PIL RGB image, None) or (None, drop reason): `empty_image`, `unsupported_format`,
    `corrupt_image`, `too_large`, `extreme_aspect`."""
    return _decode(data, max_pixels, max_aspect_ratio, plain_jpeg_ok=False)


def decode_or_plain_jpeg(
    data: bytes, max_pixels: int = MAX_PIXELS, max_aspect_ratio: float = MAX_ASPECT_RATIO
):
    """As `decode_rgb`, except that a plain JPEG (baseline or progressive, RGB or grayscale,
    upright: no EXIF turn) that passes the header checks is not decoded here: (PLAIN_JPEG,
    None) says so, and a device decoder (nvJPEG) takes its bytes. Everything else is decoded
    here, as `decode_rgb` would."""
    return _decode(data, max_pixels, max_aspect_ratio, plain_jpeg_ok=True)


PLAIN_JPEG = "plain_jpeg"  # decode_or_plain_jpeg: the bytes go to the device decoder as they are


def _decode(data: bytes, max_pixels: int, max_aspect_ratio: float, plain_jpeg_ok: bool):
    from PIL import Image

    if not data:
        return None, "empty_image"
    try:
        with warnings.catch_warnings():
            # condense's own bound (max_pixels) decides; Pillow's warning would only add noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
            width, height = image.size
            if width < 1 or height < 1:
                return None, "corrupt_image"
            if width * height > max_pixels:
                return None, "too_large"
            if max(width, height) > max_aspect_ratio * min(width, height):
                return None, "extreme_aspect"
            if plain_jpeg_ok and _plain_jpeg(image):
                return PLAIN_JPEG, None
            image.load()  # the first frame of an animated image, nothing more
            image = _upright(image)
            return _rgb(image), None
    except Image.DecompressionBombError:
        return None, "too_large"
    except Image.UnidentifiedImageError:
        if data.lstrip()[:12].startswith(_REFUSED_MAGIC):
            return None, "unsupported_format"
        return None, "corrupt_image"
    except Exception:  # noqa: BLE001 - any decoder failure on untrusted bytes is a drop
        return None, "corrupt_image"


def _plain_jpeg(image) -> bool:
    """A JPEG a device decoder turns into the RGB pixels Pillow would: 8-bit RGB (YCbCr) or
    grayscale, and no EXIF orientation to apply (read from the header; nothing is decoded)."""
    if image.format != "JPEG" or image.mode not in ("RGB", "L"):
        return False
    try:
        return image.getexif().get(0x0112, 1) == 1
    except Exception:  # noqa: BLE001 - an unreadable EXIF block: let Pillow decode it
        return False


def _upright(image):
    """The image turned as its EXIF orientation says (unchanged when the EXIF is unreadable)."""
    from PIL import ImageOps

    try:
        if image.getexif().get(0x0112, 1) == 1:  # upright already: no copy
            return image
        return ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 - a malformed EXIF block leaves the pixels as stored
        return image


def _rgb(image):
    from PIL import Image

    if image.mode.startswith(("I;16", "I")) or image.mode == "F":
        # 16-bit (and 32-bit) grayscale: Pillow's convert() clips these to 255, which turns
        # nearly every pixel white. Scale the 16-bit range to 8 bits instead.
        import numpy as np

        values = np.asarray(image, dtype=np.float64)
        scale = 1.0 if image.mode == "F" and values.max(initial=0) <= 255 else 257.0
        gray = np.clip(np.rint(values / scale), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode != "RGB":
        return image.convert("RGB")
    return image
