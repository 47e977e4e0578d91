"""Image bytes to an upright RGB array, or a `DecodeError` with a short reason.

Runs on CPU workers over untrusted input, so every failure Pillow can produce becomes a
`DecodeError` (one error row, never a crashed job). Reasons start with a fixed category —
"empty file", "not an image", "too many pixels", "truncated or corrupt", "unsupported mode" —
followed by ": detail" where there is one, so error rows can be grouped by category.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 100_000_000

# Only the formats behind our image extensions (plus MPO: multi-picture JPEGs from cameras).
# Restricting formats also keeps Pillow from handing untrusted files to plugins such as EPS,
# which shells out to Ghostscript.
Image.init()
ALLOWED_FORMATS: tuple[str, ...] = tuple(
    f for f in ("JPEG", "MPO", "PNG", "WEBP", "BMP", "GIF", "TIFF") if f in Image.ID
)

_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_HIGH_DEPTH_GREY = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})


class DecodeError(ValueError):
    """An input that cannot become an image; `reason` is the short text for the error row."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode `data` fully; returns (H, W, 3) uint8 RGB, upright per EXIF orientation.

    The pixel limit is checked on the header size, before any pixel is decompressed
    (decompression bombs). Multi-frame files give their first frame; transparency is composited
    over white; 16-bit and float greys are scaled (not clipped) to 8 bits. Pillow's own hard limit
    (2 * PIL.Image.MAX_IMAGE_PIXELS, about 179 Mpx) still applies above `max_pixels`; raise that
    global at worker start if a larger limit is really wanted.
    """
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be >= 1, got {max_pixels}")
    if not data:
        raise DecodeError("empty file")
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # Someone in this process switched it on: truncated files would decode as grey blocks.
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set; refusing to decode silently truncated images")
    try:
        image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except UnidentifiedImageError:
        raise DecodeError("not an image: unrecognised or unsupported format") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DecodeError(f"too many pixels: {e}") from None
    except Exception as e:  # any failure on untrusted bytes is that file's error, not the job's
        raise DecodeError(f"truncated or corrupt: {_describe(e)}") from None

    with image:
        width, height = image.size
        if width * height > max_pixels:
            raise DecodeError(f"too many pixels: {width}x{height} = {width * height} exceeds the limit of {max_pixels}")
        if width == 0 or height == 0:
            raise DecodeError(f"truncated or corrupt: image has size {width}x{height}")
        try:
            image.load()  # decode every pixel here, so truncation is caught here
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise DecodeError(f"too many pixels: {e}") from None
        except Exception as e:
            raise DecodeError(f"truncated or corrupt: {_describe(e)}") from None
        _apply_orientation(image)
        return _to_rgb(image)


def _describe(e: Exception) -> str:
    text = str(e).strip()
    return text if text else type(e).__name__


def _apply_orientation(image: Image.Image) -> None:
    """Rotate/flip in place per the EXIF orientation tag; a broken EXIF block is ignored, since
    the pixels themselves decoded fine."""
    with contextlib.suppress(Exception):
        ImageOps.exif_transpose(image, in_place=True)


def _to_rgb(image: Image.Image) -> np.ndarray:
    mode = image.mode
    if mode == "RGB":
        return np.array(image, dtype=np.uint8)
    if mode in _ALPHA_MODES or ("transparency" in image.info and mode in ("P", "L", "RGB")):
        return _over_white(np.asarray(image.convert("RGBA")))
    if mode in _HIGH_DEPTH_GREY:
        grey = _grey_to_uint8(np.asarray(image), mode)  # (H, W)
        return np.repeat(grey[:, :, None], 3, axis=2)
    try:
        rgb = image.convert("RGB")
    except (ValueError, OSError) as e:
        raise DecodeError(f"unsupported mode: {mode} ({_describe(e)})") from None
    return np.array(rgb, dtype=np.uint8)


def _over_white(rgba: np.ndarray) -> np.ndarray:
    """Composite (H, W, 4) uint8 RGBA over a white background -> (H, W, 3), rounded."""
    rgb = rgba[:, :, :3].astype(np.uint16)
    alpha = rgba[:, :, 3:].astype(np.uint16)
    out = (rgb * alpha + 255 * (255 - alpha) + 127) // 255
    return out.astype(np.uint8)


def _grey_to_uint8(grey: np.ndarray, mode: str) -> np.ndarray:
    """Scale a 16-bit, 32-bit integer or float greyscale plane to 0..255.

    I;16*: the full 16-bit range maps to 0..255. "I" (32-bit; 16-bit PNG/TIFF data in older
    Pillow): the 16-bit range if the values fit in it, else min..max. "F": values in [0, 1] map to
    0..255, anything else min..max over finite values (NaN -> 0, ±inf -> the ends).
    """
    if mode != "F":
        in_16_bit = mode.startswith("I;16") or (grey.size > 0 and grey.min() >= 0 and grey.max() <= 65535)
        if in_16_bit:
            return ((grey.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
        return _stretch(grey.astype(np.float64))  # int32 beyond 16 bits: float64 keeps every value exact
    values = grey.astype(np.float32)
    if values.size and np.isfinite(values).all() and values.min() >= 0.0 and values.max() <= 1.0:
        return np.rint(values * 255.0).astype(np.uint8)
    return _stretch(values)


def _stretch(values: np.ndarray) -> np.ndarray:
    """Linear min..max -> 0..255 over the finite values; NaN -> 0, +inf -> 255, -inf -> 0."""
    finite = np.isfinite(values)
    if not finite.any():
        return np.where(values == np.inf, 255, 0).astype(np.uint8)
    lo, hi = values[finite].min(), values[finite].max()
    span = hi - lo if hi > lo else 1.0
    scaled = np.clip((values - lo) / span * 255.0, 0.0, 255.0)
    scaled = np.where(np.isnan(scaled), 0.0, scaled)
    scaled = np.where(values == np.inf, 255.0, scaled)
    scaled = np.where(values == -np.inf, 0.0, scaled)
    return np.rint(scaled).astype(np.uint8)
