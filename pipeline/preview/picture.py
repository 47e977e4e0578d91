"""A preview picture: the image with each segment's mask tinted in its own colour, "label score" tags
(`labels`) and a legend strip below naming the classes shown.

Each preview is the image scaled so its short side is at least MIN_SHORT_SIDE and its long side at most
MAX_SIDE. `render_overlay`, `render_legend` and `legend_entries` are pure; `render_preview` takes an
output row's segments (COCO RLE).
"""

from __future__ import annotations

import colorsys
import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from m2f.pipeline.preview import labels

ALPHA = 0.55  # mask opacity: the image stays readable underneath
MAX_SIDE = 1024  # previews of larger images are scaled down to this longest side
MIN_SHORT_SIDE = 512  # smaller images are scaled up to this short side, so 13 px labels fit on them
LEGEND_MIN_WIDTH = 320  # a legend narrower than this would wrap every entry; the canvas widens instead
LEGEND_SWATCHES = 8  # swatches per class in the legend; further instances are counted in the text
BACKGROUND = (28, 28, 28)  # the legend strip (and any canvas the image does not cover)


def segment_colour(segment_id: int) -> tuple[int, int, int]:
    """A distinct, saturated RGB colour for a segment id (hues spaced by the golden ratio)."""
    hue = (segment_id * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 0.95)
    return round(r * 255), round(g * 255), round(b * 255)


def preview_size(height: int, width: int, *, min_short_side: int | None, max_side: int | None) -> tuple[int, int]:
    """The (w, h) of a preview: scaled up until the short side reaches `min_short_side`, and down until the
    long side is at most `max_side`, which wins when both apply (a thin strip stays within max_side)."""
    scale = 1.0
    if min_short_side:
        scale = max(scale, min_short_side / min(height, width))
    if max_side:
        scale = min(scale, max_side / max(height, width))
    return max(1, round(width * scale)), max(1, round(height * scale))


def render_overlay(
    image: np.ndarray,
    masks: np.ndarray,
    colours: Sequence[tuple[int, int, int]],
    *,
    alpha: float = ALPHA,
) -> np.ndarray:
    """image (H, W, 3) uint8, masks (N, H, W) bool -> (H, W, 3) uint8 with each mask tinted.

    A covered pixel becomes round((1 - alpha) * pixel + alpha * colour) of the last mask covering it
    (later masks are drawn on top); uncovered pixels are unchanged.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    if masks.ndim != 3 or masks.shape[1:] != image.shape[:2]:
        raise ValueError(f"masks must be (N, {image.shape[0]}, {image.shape[1]}), got {masks.shape}")
    if len(colours) != masks.shape[0]:
        raise ValueError(f"{len(colours)} colours for {masks.shape[0]} masks")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    paint = np.zeros(image.shape, dtype=np.float32)  # (H, W, 3)
    covered = np.zeros(image.shape[:2], dtype=bool)
    for mask, colour in zip(masks, colours, strict=True):
        paint[mask] = colour
        covered |= mask
    out = image.copy()
    blended = (1.0 - alpha) * image[covered].astype(np.float32) + alpha * paint[covered]
    out[covered] = np.rint(blended).clip(0, 255).astype(np.uint8)
    return out


# --- the legend ---------------------------------------------------------------------------------------


def legend_entries(segments: Sequence[Mapping[str, Any]]) -> list[tuple[str, list[tuple[int, int, int]]]]:
    """One (label, segment colours) per class shown, the classes covering most pixels first."""
    area: dict[str, int] = {}
    colours: dict[str, list[tuple[int, int, int]]] = {}
    for s in sorted(segments, key=lambda s: int(s["id"])):
        label = str(s["label"])
        area[label] = area.get(label, 0) + int(s.get("area") or 0)
        colours.setdefault(label, []).append(segment_colour(int(s["id"])))
    return [(label, colours[label]) for label in sorted(area, key=lambda k: (-area[k], k))]


def _fit(font: Any, text: str, room: int) -> str:
    """`text`, or its longest start followed by "..." that is at most `room` px wide ("" if none is)."""
    if labels.text_size(font, text)[0] <= room:
        return text
    lo, hi = 0, len(text)  # text[:lo] + "..." fits (or lo == 0); text[:hi] + "..." does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if labels.text_size(font, text[:mid] + "...")[0] <= room else (lo, mid)
    return text[:lo] + "..." if lo else ""


def render_legend(entries: Sequence[tuple[str, Sequence[tuple[int, int, int]]]], width: int) -> Image.Image:
    """A strip `width` px wide: per entry, up to LEGEND_SWATCHES swatches of its colours and its label (with
    the number of segments when more than one), wrapped into rows."""
    font = labels.label_font()
    margin, swatch, step, space = 8, 12, 14, 18
    line = max(swatch, labels.text_size(font, "Ag")[1]) + 6
    items = []  # (colours, text, swatches' width, text's width)
    for label, colours in entries or [("no segments", [])]:
        shown = list(colours)[:LEGEND_SWATCHES]
        text = label if len(colours) <= 1 else f"{label} ({len(colours)})"
        swatches_w = step * len(shown) + (4 if shown else 0)
        room = width - 2 * margin - swatches_w
        text = _fit(font, text, room)
        items.append((shown, text, swatches_w, labels.text_size(font, text)[0]))
    rows: list[list[tuple[list[tuple[int, int, int]], str, int, int]]] = [[]]
    used = 0
    for item in items:
        item_w = item[2] + item[3]
        if rows[-1] and used + space + item_w > width - 2 * margin:
            rows.append([])
            used = 0
        used += (space if rows[-1] else 0) + item_w
        rows[-1].append(item)
    strip = Image.new("RGB", (width, 2 * margin + line * len(rows)), BACKGROUND)
    draw = ImageDraw.Draw(strip)
    for r, row in enumerate(rows):
        x, y = margin, margin + r * line
        top = y + (line - swatch) // 2
        for shown, text, swatches_w, text_w in row:
            for k, colour in enumerate(shown):
                draw.rectangle((x + k * step, top, x + k * step + swatch - 1, top + swatch - 1), fill=colour)
            draw.text((x + swatches_w, y + line // 2), text, fill=(235, 235, 235), font=font, anchor="lm")
            x += swatches_w + text_w + space
    return strip


# --- a preview ------------------------------------------------------------------------------------------


def render_preview(
    image: np.ndarray,
    segments: Sequence[Mapping[str, Any]],
    *,
    alpha: float = ALPHA,
    draw_labels: bool = True,
    max_side: int | None = MAX_SIDE,
    min_short_side: int | None = MIN_SHORT_SIDE,
) -> Image.Image:
    """An output row's segments over its image (H, W, 3) uint8, with the legend strip below, as a PIL image.

    The picture is the image scaled to `preview_size` (up: nearest neighbour, so pixels stay crisp and the
    masks, also nearest, line up with them; down: bilinear) in the canvas's top-left corner; the legend
    strip spans the canvas below it (the canvas is at least LEGEND_MIN_WIDTH wide). Masks are decoded from
    their COCO RLE and drawn in ascending score, so the most confident segment of an overlapping (instance)
    output is on top. Tags read "label score", placed most confident first (`place_labels`).
    """
    height, width = image.shape[:2]
    size = preview_size(height, width, min_short_side=min_short_side, max_side=max_side)  # (w, h)
    if size != (width, height):
        upscale = size[0] > width
        image = _resized(image, size, Image.Resampling.NEAREST if upscale else Image.Resampling.BILINEAR)
    return _compose(image, (height, width), segments, alpha=alpha, draw_labels=draw_labels)


def _compose(
    image: np.ndarray,
    source: tuple[int, int],
    segments: Sequence[Mapping[str, Any]],
    *,
    alpha: float,
    draw_labels: bool,
) -> Image.Image:
    """The preview of `render_preview` from the image already at preview size (h, w, 3) and its source's
    (H, W), the size of the segments' RLEs."""
    height, width = source
    size = (image.shape[1], image.shape[0])  # (w, h)
    ordered = sorted(segments, key=lambda s: (float(s.get("score") or 0.0), int(s["id"])))
    masks = np.zeros((len(ordered), size[1], size[0]), dtype=bool)  # (N, h, w)
    rows, cols = _nearest(height, size[1]), _nearest(width, size[0])  # the pixels NEAREST picks
    for i, segment in enumerate(ordered):  # one full-size mask at a time
        rle = segment["rle"]
        if list(rle["size"]) != [height, width]:
            raise ValueError(f"segment {segment['id']} has RLE size {list(rle['size'])}, image is {[height, width]}")
        counts = rle["counts"].encode("ascii") if isinstance(rle["counts"], str) else rle["counts"]
        mask = mask_utils.decode({"size": [height, width], "counts": counts})  # (H, W) uint8
        masks[i] = mask[np.ix_(rows, cols)] != 0  # (h, w): as a NEAREST resize of the mask, without its copies
        del mask

    colours = [segment_colour(int(s["id"])) for s in ordered]
    picture = Image.fromarray(render_overlay(image, masks, colours, alpha=alpha))
    if draw_labels:
        texts = [f"{s['label']} {float(s.get('score') or 0.0):.2f}" for s in ordered]
        by_confidence = sorted(range(len(ordered)), key=lambda i: (-float(ordered[i].get("score") or 0.0), i))
        labels.draw_labels(picture, masks, texts, colours, by_confidence)
    legend = render_legend(legend_entries(ordered), max(size[0], LEGEND_MIN_WIDTH))
    canvas = Image.new("RGB", (legend.width, size[1] + legend.height), BACKGROUND)
    canvas.paste(picture, (0, 0))
    canvas.paste(legend, (0, size[1]))
    return canvas


def _resized(image: np.ndarray, size: tuple[int, int], resample: Image.Resampling) -> np.ndarray:
    """image (H, W, 3) uint8 resized to `size` (w, h) as Pillow resizes it, one channel at a time: Pillow's
    own RGB image would be a copy of 4 bytes a pixel, a single channel is shared with the array."""
    out = np.empty((size[1], size[0], 3), dtype=np.uint8)
    for c in range(3):
        plane = np.ascontiguousarray(image[:, :, c])  # (H, W)
        out[:, :, c] = np.asarray(Image.fromarray(plane).resize(size, resample))
    return out


def _nearest(n: int, m: int) -> np.ndarray:
    """The m source indices (of n) that Pillow's NEAREST resize samples along one axis."""
    if n == m:
        return np.arange(n)
    ramp = Image.fromarray(np.arange(n, dtype=np.int32)[None])  # (1, n), mode I
    return np.asarray(ramp.resize((m, 1), Image.Resampling.NEAREST))[0].astype(np.int64)


def preview_png(data: bytes, segments: Sequence[Mapping[str, Any]], *, max_pixels: int, size: Any = None) -> bytes:
    """The PNG of `render_preview` for an image's file `data` (decoded here; ValueError when it is not
    `size` (H, W), if given). What the driver holds is Pillow's decoded image (resized as it is, never an
    array at full size), one decoded mask at a time (1 byte a pixel) and the picture at preview size."""
    from m2f.pipeline.decode import decode_resized

    def shown(h: int, w: int) -> tuple[int, int]:
        pw, ph = preview_size(h, w, min_short_side=MIN_SHORT_SIDE, max_side=MAX_SIDE)
        return ph, pw

    source, image = decode_resized(data, shown, max_pixels=max_pixels, upscale=Image.Resampling.NEAREST)
    if size is not None and source != tuple(size):
        raise ValueError(f"the image is now {source[1]}x{source[0]}, the row says otherwise")
    return png_bytes(_compose(image, source, segments, alpha=ALPHA, draw_labels=True))


def png_bytes(picture: Image.Image) -> bytes:
    buf = io.BytesIO()
    picture.save(buf, "PNG", optimize=False)
    return buf.getvalue()
