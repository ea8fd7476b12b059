"""Decoding untrusted image bytes into RGB, or a reason why not.

Every decoder problem becomes a drop reason, never an exception: corrupt or empty bytes,
truncated files, images too large to decode safely (a decompression-bomb guard on the pixel
count, checked from the header before any pixel is decoded). CMYK, palette, grayscale and
alpha images are converted to RGB; transparent pixels are composited on white.
"""

from __future__ import annotations

import io
import warnings

MAX_PIXELS = 64_000_000  # larger images are dropped as `too_large` before decoding


def decode_rgb(data: bytes, max_pixels: int = MAX_PIXELS):
    """(PIL RGB image, None) or (None, drop reason)."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        return None, "empty_image"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                return None, "too_large"
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return None, "too_large"
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return None, "corrupt_image"
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB"), None
    if image.mode != "RGB":
        return image.convert("RGB"), None
    return image, None
