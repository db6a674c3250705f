"""The one image decoder: image bytes -> (S, S, 3) uint8 RGB at model size, or a `decode_error` status. No Ray here.

Web images come in every shape: EXIF-rotated JPEGs, palette/alpha PNGs, CMYK JPEGs, 16-bit PNGs, animated GIFs,
truncated files, HTML pages saved as .jpg, and decompression bombs. `decode_image` turns each into RGB pixels or
raises `DecodeError` with a message saying what was wrong; `decode_or_error` never raises for a bad sample, and
`stack_pixels` makes a model batch of its results. The resize is `blip.image.resize_rgb` (PIL bicubic on uint8), so the pixels are bit-exact with the
model's own preprocessing whenever JPEG draft mode does not apply.
"""

from __future__ import annotations

import io
import math
import warnings
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from blip.image import resize_rgb

# PIL's own default cap (Image.MAX_IMAGE_PIXELS): ~ a 9459 x 9459 image, 256 MiB of RGB.
DEFAULT_MAX_PIXELS = 89_478_485
# Draft (DCT-domain downscaling) only pays off when the JPEG is at least this many times the target size.
_DRAFT_MIN_RATIO = 2

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


class DecodeError(Exception):
    """An image that cannot be decoded; `width`/`height` are the header's size when it was readable, else 0."""

    def __init__(self, message: str, width: int = 0, height: int = 0) -> None:
        super().__init__(message)
        self.width = width
        self.height = height


def _to_bytes(data: Any) -> bytes:
    if data is None or (isinstance(data, float) and math.isnan(data)):  # NaN: a missing value from pandas
        raise DecodeError("no image bytes (missing image)")
    if isinstance(data, np.ndarray):  # Ray/pyarrow may hand binary values over as uint8 arrays
        data = data.tobytes()
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DecodeError(f"image is {type(data).__name__}, not bytes")
    if len(data) == 0:
        raise DecodeError("empty image (0 bytes)")
    return bytes(data)


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: alpha composited on white, 16/32-bit integers scaled to 8 bits, CMYK/palette converted."""
    mode = img.mode
    if mode == "P" and "transparency" in img.info:
        img, mode = img.convert("RGBA"), "RGBA"
    if mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode.startswith("I;16") or mode == "I":
        a = np.asarray(img).astype(np.float64)  # (H, W)
        # 16-bit sources span 0..65535: 65535 / 257 = 255 exactly. An "I" image that only uses 0..255 is already 8-bit.
        scale = 257.0 if mode.startswith("I;16") or a.max(initial=0) > 255 else 1.0
        a = np.clip(np.rint(a / scale), 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    if mode == "F":
        a = np.asarray(img, dtype=np.float64)
        a = a * 255.0 if a.max(initial=0) <= 1.0 else a  # float images are either [0, 1] or [0, 255]
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L").convert("RGB")
    return img if mode == "RGB" else img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def apply_draft(img: Image.Image, image_size: int) -> bool:
    """Ask a big JPEG to decode at reduced size (DCT scaling by 1/2, 1/4 or 1/8); True when draft was requested.

    PIL picks the largest reduction that keeps both sides >= the request, so the bicubic resize afterwards still
    only shrinks and never upsamples a draft.
    """
    if img.format != "JPEG" or min(img.size) < _DRAFT_MIN_RATIO * image_size:
        return False
    img.draft("RGB", (image_size, image_size))
    return True


def load_rgb(
    data: bytes | bytearray | memoryview | np.ndarray | None,
    draft_size: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[Image.Image, int, int]:
    """Image bytes -> (RGB PIL image, original width, height as displayed); raises `DecodeError` with a useful message.

    The one decoder of the project (CapFilt, training data and the report all call it): size cap from the header
    before any pixel is decoded, JPEG draft when `draft_size` allows it, the first frame of an animation, EXIF
    orientation, every mode to RGB (alpha composited on white, 16-bit scaled to 8).
    """
    raw = _to_bytes(data)
    width = height = 0
    try:
        with warnings.catch_warnings():
            # PIL warns (not raises) between MAX_IMAGE_PIXELS and twice that: make every bomb signal an error.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(raw))
            width, height = img.size
            # The header alone tells the size: refuse before a single pixel is decoded.
            if width * height > max_pixels:
                raise DecodeError(
                    f"image too large: {width}x{height} = {width * height} pixels > max_pixels {max_pixels}"
                    " (decompression bomb?)",
                    width,
                    height,
                )
            if width < 1 or height < 1:
                raise DecodeError(f"image has no pixels ({width}x{height})", width, height)
            if draft_size is not None:
                apply_draft(img, draft_size)
            img.load()  # the first frame of an animation; raises on truncated or corrupt data
            loaded = img.size
            try:
                img = ImageOps.exif_transpose(img)
            except Exception:  # noqa: BLE001 - a broken EXIF block must not lose a decodable image
                pass
            if img.size != loaded:  # rotated by 90 or 270 degrees
                width, height = height, width
            rgb = _to_rgb(img)
    except DecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DecodeError(f"decompression bomb: {e}", width, height) from e
    except Image.UnidentifiedImageError as e:
        raise DecodeError(f"not an image PIL can read ({len(raw)} bytes, starting {raw[:16]!r})") from e
    except MemoryError as e:
        raise DecodeError(f"out of memory decoding a {width}x{height} image", width, height) from e
    except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, struct.error, ...
        raise DecodeError(f"corrupt image: {type(e).__name__}: {e}", width, height) from e
    return rgb, width, height


def decode_image_with_size(
    data: bytes | bytearray | memoryview | np.ndarray | None,
    image_size: int,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[np.ndarray, int, int]:
    """Like `decode_image`, also returning the original (width, height), as displayed (after EXIF orientation)."""
    rgb, width, height = load_rgb(data, image_size, max_pixels)
    try:
        return resize_rgb(rgb, image_size), width, height  # (S, S, 3) uint8
    except MemoryError as e:
        raise DecodeError(f"out of memory resizing a {width}x{height} image", width, height) from e


def decode_image(
    data: bytes | bytearray | memoryview | np.ndarray | None,
    image_size: int,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Image bytes -> (image_size, image_size, 3) uint8 RGB; raises `DecodeError` with a useful message."""
    return decode_image_with_size(data, image_size, max_pixels)[0]


def decode_or_error(
    data: Any, image_size: int, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[np.ndarray | None, str, str, int, int]:
    """One sample, never raising: (pixels or None, status "ok" | "decode_error", error message, width, height)."""
    try:
        pixels, width, height = decode_image_with_size(data, image_size, max_pixels)
        return pixels, "ok", "", width, height
    except DecodeError as e:
        return None, "decode_error", str(e), e.width, e.height
    except Exception as e:  # noqa: BLE001 - a bug here must still not lose the sample
        return None, "decode_error", f"unexpected {type(e).__name__}: {e}", 0, 0


def allow_max_pixels(max_pixels: int) -> None:
    """PIL raises DecompressionBombError on its own above 2 x MAX_IMAGE_PIXELS; let our cap be the one that rules."""
    if Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = max_pixels
    Image.init()  # register every plugin once, not lazily inside the first decode


def stack_pixels(decoded: list[tuple], image_size: int) -> np.ndarray:
    """decode_or_error results -> one (B, S, S, 3) uint8 batch; a sample that failed stays zeros (its status says
    why, and the stage does not score it)."""
    pixels = np.zeros((len(decoded), image_size, image_size, 3), dtype=np.uint8)  # (B, S, S, 3)
    for i, (px, *_rest) in enumerate(decoded):
        if px is not None:
            pixels[i] = px
    return pixels
