"""Image bytes to an upright RGB array, or a `DecodeError` with a short reason.

Runs on CPU workers over untrusted input, so every failure Pillow can produce becomes a
`DecodeError` (one error row, never a crashed job). Reasons start with a fixed category —
"empty file", "not an image", "too many pixels", "truncated or corrupt", "unsupported mode" —
followed by ": detail" where there is one, so error rows can be grouped by category.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Callable, Iterator

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 100_000_000
COPY_ROWS_BYTES = 16 * 1024**2  # Pillow's pixels are copied into the array this much at a time
# Bytes a pixel that decoding holds at most (pipeline.budget): Pillow's image (4 bytes a pixel for RGB), a
# converted copy for other modes (4 more), the (H, W, 3) array, and a band of wider intermediates. Measured
# on 10 MP images of every mode: 2 (1-bit) to 13 (palette), bench/NOTES.md.
DECODE_BYTES_PER_PIXEL = 14

log = logging.getLogger(__name__)

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

    Warnings Pillow raises while decoding (DecompressionBombWarning for an image above its 89 Mpx
    threshold, but within `max_pixels`) go to this module's logger, not to stderr. Memory: the decoded
    image once as Pillow holds it, and the RGB array, copied out a band of rows at a time (DECODE_BYTES_PER_PIXEL).
    """
    with _logged_warnings(), _open(data, max_pixels) as image:
        return _to_rgb(image)


def decode_resized(
    data: bytes,
    size: Callable[[int, int], tuple[int, int]],
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    upscale: Image.Resampling = Image.Resampling.BILINEAR,
) -> tuple[tuple[int, int], np.ndarray]:
    """Decode `data` and resize it bilinearly (Pillow's filter) to `size(H, W)` -> (h, w): returns the
    original (H, W) and the resized (h, w, 3) uint8 RGB, the same pixels as `decode_image` followed by a
    Pillow resize of its array, without the full-size array: an RGB image is resized as Pillow decoded it,
    a grey one (1-bit or 8-bit) as its one channel (Pillow filters channels independently), and only other
    modes go through `decode_image`'s conversion. `upscale` is the filter when the image grows. Errors and
    warnings as `decode_image`.
    """
    with _logged_warnings(), _open(data, max_pixels) as image:
        height, width = image.size[1], image.size[0]
        h, w = size(height, width)
        if image.mode in ("1", "L") and "transparency" not in image.info:
            image = image if image.mode == "L" else image.convert("L")
        elif image.mode in _ALPHA_MODES or image.mode in _HIGH_DEPTH_GREY or "transparency" in image.info:
            image = Image.fromarray(_to_rgb(image))  # composited or scaled by our rules
        elif image.mode != "RGB":
            image = _converted(image)
        if (h, w) != (height, width):
            image = image.resize((w, h), upscale if w > width else Image.Resampling.BILINEAR)
        pixels = np.asarray(image)
        if pixels.ndim == 2:
            pixels = np.repeat(pixels[:, :, None], 3, axis=2)  # (h, w, 3)
        return (height, width), np.ascontiguousarray(pixels, dtype=np.uint8)


@contextlib.contextmanager
def _logged_warnings() -> Iterator[None]:
    """Warnings raised inside (Pillow's: DecompressionBombWarning above 89 Mpx, EXIF trouble, ...) go to the log."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            for w in caught:
                log.warning("decoding an image: %s: %s", w.category.__name__, w.message)


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """The decoded, upright Pillow image (the caller closes it), or a DecodeError."""
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

    try:
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
    except BaseException:
        image.close()
        raise
    return image


def _describe(e: Exception) -> str:
    text = str(e).strip()
    return text if text else type(e).__name__


def _apply_orientation(image: Image.Image) -> None:
    """Rotate/flip in place per the EXIF orientation tag; a broken EXIF block is ignored, since
    the pixels themselves decoded fine."""
    with contextlib.suppress(Exception):
        ImageOps.exif_transpose(image, in_place=True)


def _rows(image: Image.Image) -> np.ndarray:
    """An RGB or L image's pixels as a fresh (H, W, 3) or (H, W) uint8 array, copied a band of rows at a time:
    `np.array(image)` goes through one `tobytes()` of the whole image, a second full-size copy."""
    width, height = image.size
    shape = (height, width, 3) if image.mode == "RGB" else (height, width)
    out = np.empty(shape, dtype=np.uint8)
    step = max(1, COPY_ROWS_BYTES // max(1, width * len(image.mode)))
    for y in range(0, height, step):
        band = image.crop((0, y, width, min(height, y + step)))
        out[y : y + band.height] = np.asarray(band).reshape(band.height, *shape[1:])
    return out


def _to_rgb(image: Image.Image) -> np.ndarray:
    mode = image.mode
    if mode == "RGB":
        return _rows(image)
    if mode in ("1", "L") and "transparency" not in image.info:  # grey: one byte a pixel until the end
        grey = _rows(image if mode == "L" else image.convert("L"))  # (H, W); "1" -> 0 / 255
        rgb = np.empty((*grey.shape, 3), dtype=np.uint8)
        rgb[...] = grey[:, :, None]
        return rgb
    if mode in _ALPHA_MODES or ("transparency" in image.info and mode in ("P", "L", "RGB")):
        rgba = image if mode == "RGBA" else image.convert("RGBA")
        return _by_rows((rgba.size[1], rgba.size[0], 3), lambda y0, y1: _over_white(_band(rgba, y0, y1)))
    if mode in _HIGH_DEPTH_GREY:
        grey = np.asarray(image)  # (H, W)
        scale = _grey_scaler(grey, mode)
        plane = _by_rows(grey.shape, lambda y0, y1: scale(grey[y0:y1]))  # (H, W) uint8
        rgb = np.empty((*plane.shape, 3), dtype=np.uint8)
        rgb[...] = plane[:, :, None]
        return rgb
    return _rows(_converted(image))


def _converted(image: Image.Image) -> Image.Image:
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as e:
        raise DecodeError(f"unsupported mode: {image.mode} ({_describe(e)})") from None


def _band(image: Image.Image, y0: int, y1: int) -> np.ndarray:
    return np.asarray(image.crop((0, y0, image.size[0], y1)))


def _by_rows(shape: tuple[int, ...], make: Callable[[int, int], np.ndarray]) -> np.ndarray:
    """A fresh uint8 array of `shape` (H, ...) filled a band of rows at a time by `make(y0, y1)`, so that the
    wider intermediates of a conversion (uint16, float64) are never whole."""
    out = np.empty(shape, dtype=np.uint8)
    step = max(1, COPY_ROWS_BYTES // max(1, int(np.prod(shape[1:])) * 8))
    for y in range(0, shape[0], step):
        out[y : y + step] = make(y, min(shape[0], y + step))
    return out


def _over_white(rgba: np.ndarray) -> np.ndarray:
    """Composite (H, W, 4) uint8 RGBA over a white background -> (H, W, 3), rounded."""
    rgb = rgba[:, :, :3].astype(np.uint16)
    alpha = rgba[:, :, 3:].astype(np.uint16)
    out = (rgb * alpha + 255 * (255 - alpha) + 127) // 255
    return out.astype(np.uint8)


def _grey_scaler(grey: np.ndarray, mode: str) -> Callable[[np.ndarray], np.ndarray]:
    """How to scale a 16-bit, 32-bit integer or float greyscale plane to 0..255, a band of it at a time (the
    range is the whole plane's).

    I;16*: the full 16-bit range maps to 0..255. "I" (32-bit; 16-bit PNG/TIFF data in older
    Pillow): the 16-bit range if the values fit in it, else min..max. "F": values in [0, 1] map to
    0..255, anything else min..max over finite values (NaN -> 0, ±inf -> the ends).
    """
    if mode != "F":
        in_16_bit = mode.startswith("I;16") or (grey.size > 0 and grey.min() >= 0 and grey.max() <= 65535)
        if in_16_bit:
            return lambda g: ((g.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
        lo, hi = np.float64(grey.min()), np.float64(grey.max())  # int32 beyond 16 bits: float64 keeps every value
        return lambda g: _stretch(g.astype(np.float64), lo, hi)
    values = np.asarray(grey, dtype=np.float32)
    finite = np.isfinite(values)
    if values.size and finite.all() and values.min() >= 0.0 and values.max() <= 1.0:
        return lambda g: np.rint(g.astype(np.float32) * 255.0).astype(np.uint8)
    if not finite.any():
        return lambda g: np.where(g == np.inf, 255, 0).astype(np.uint8)
    lo = np.min(values, where=finite, initial=np.float32(np.inf))
    hi = np.max(values, where=finite, initial=np.float32(-np.inf))
    return lambda g: _stretch(g.astype(np.float32), lo, hi)


def _stretch(values: np.ndarray, lo: np.floating, hi: np.floating) -> np.ndarray:
    """Linear lo..hi (the finite range) -> 0..255; NaN -> 0, +inf -> 255, -inf -> 0."""
    span = hi - lo if hi > lo else 1.0
    scaled = np.clip((values - lo) / span * 255.0, 0.0, 255.0)
    scaled = np.where(np.isnan(scaled), 0.0, scaled)
    scaled = np.where(values == np.inf, 255.0, scaled)
    scaled = np.where(values == -np.inf, 0.0, scaled)
    return np.rint(scaled).astype(np.uint8)
