"""Overlay PNGs for a quick look at a run: each segment's mask tinted in its own colour, labels drawn.

`render_overlay` is pure (an image and decoded masks in, an image out); `render_preview` takes an output
row's segments (COCO RLE); `write_previews` picks rows of a finished run and writes
`OUTPUT/_previews/<image_id>.png`.
"""

from __future__ import annotations

import colorsys
import heapq
import io
import logging
import posixpath
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec import AbstractFileSystem
from PIL import Image, ImageDraw, ImageFont
from pycocotools import mask as mask_utils

from pipeline.decode import decode_image
from pipeline.schema import STATUS_OK
from pipeline.storage import open_fs, storage_options, write_atomic

PREVIEWS_DIR = "_previews"
ALPHA = 0.55  # mask opacity: the image stays readable underneath
MAX_SIDE = 1024  # previews of larger images are scaled down to this longest side

log = logging.getLogger(__name__)


def segment_colour(segment_id: int) -> tuple[int, int, int]:
    """A distinct, saturated RGB colour for a segment id (hues spaced by the golden ratio)."""
    hue = (segment_id * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 0.95)
    return round(r * 255), round(g * 255), round(b * 255)


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


def _anchor(mask: np.ndarray) -> tuple[int, int] | None:
    """A pixel inside the mask near its middle: the middle covered pixel of its middle covered row."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    y = int(rows[rows.size // 2])
    cols = np.flatnonzero(mask[y])
    return int(cols[cols.size // 2]), y


def _draw_labels(canvas: Image.Image, masks: np.ndarray, texts: Sequence[str]) -> None:
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for mask, text in zip(masks, texts, strict=True):
        anchor = _anchor(mask)
        if anchor is None:
            continue
        left, top, right, bottom = draw.textbbox(anchor, text, font=font, anchor="mm")
        draw.rectangle((left - 2, top - 1, right + 2, bottom + 1), fill=(0, 0, 0))
        draw.text(anchor, text, fill=(255, 255, 255), font=font, anchor="mm")


def render_preview(
    image: np.ndarray,
    segments: Sequence[Mapping[str, Any]],
    *,
    alpha: float = ALPHA,
    draw_labels: bool = True,
    max_side: int | None = MAX_SIDE,
) -> Image.Image:
    """An output row's segments over its image (H, W, 3) uint8, as a PIL image.

    Masks are decoded from their COCO RLE and drawn in ascending score, so the most confident segment
    of an overlapping (instance) output is on top. Images whose longest side exceeds `max_side` are
    scaled down first (masks with nearest-neighbour). Labels read "label score".
    """
    height, width = image.shape[:2]
    scale = 1.0 if not max_side else min(1.0, max_side / max(height, width))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))  # PIL (w, h) of the preview
    if scale < 1.0:
        image = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))
    ordered = sorted(segments, key=lambda s: (float(s.get("score") or 0.0), int(s["id"])))
    masks = np.zeros((len(ordered), size[1], size[0]), dtype=bool)  # (N, h, w)
    for i, segment in enumerate(ordered):  # one full-size mask at a time
        rle = segment["rle"]
        if list(rle["size"]) != [height, width]:
            raise ValueError(f"segment {segment['id']} has RLE size {list(rle['size'])}, image is {[height, width]}")
        counts = rle["counts"].encode("ascii") if isinstance(rle["counts"], str) else rle["counts"]
        mask = mask_utils.decode({"size": [height, width], "counts": counts})  # (H, W) uint8
        if scale < 1.0:
            mask = np.asarray(Image.fromarray(mask).resize(size, Image.Resampling.NEAREST))
        masks[i] = mask.astype(bool)

    colours = [segment_colour(int(s["id"])) for s in ordered]
    canvas = Image.fromarray(render_overlay(image, masks, colours, alpha=alpha))
    if draw_labels:
        texts = [f"{s['label']} {float(s.get('score') or 0.0):.2f}" for s in ordered]
        _draw_labels(canvas, masks, texts)
    return canvas


def png_bytes(picture: Image.Image) -> bytes:
    buf = io.BytesIO()
    picture.save(buf, "PNG", optimize=False)
    return buf.getvalue()


def pick_rows(fs: AbstractFileSystem, parts: Sequence[str], n: int) -> list[dict[str, Any]]:
    """The ok rows with the n smallest image ids among `parts` (deterministic whatever the file layout)."""
    best: list[tuple[str, str]] = []  # (image_id, path), n smallest
    for path in parts:
        with fs.open(path, "rb") as f:
            table = pq.read_table(f, columns=["image_id", "status"])
        ids = table.filter(pc.equal(table["status"], STATUS_OK))["image_id"].to_pylist()
        best = heapq.nsmallest(n, best + [(i, path) for i in heapq.nsmallest(n, ids)])
    rows = []
    wanted_by_file: dict[str, set[str]] = {}
    for image_id, path in best:
        wanted_by_file.setdefault(path, set()).add(image_id)
    for path, wanted in wanted_by_file.items():
        with fs.open(path, "rb") as f:
            table = pq.read_table(f, columns=["image_id", "image_uri", "status", "width", "height", "segments"])
        mask = pc.and_(
            pc.is_in(table["image_id"], pa.array(sorted(wanted), pa.string())), pc.equal(table["status"], STATUS_OK)
        )
        rows += table.filter(mask).to_pylist()
    return sorted(rows, key=lambda r: r["image_id"])[:n]


def write_previews(
    fs: AbstractFileSystem,
    root: str,
    n: int,
    *,
    endpoint_url: str | None = None,
    storage_options_json: str | None = None,
    max_pixels: int = 100_000_000,
) -> int:
    """Write overlays of n ok rows of the dataset under `root` to `root/_previews/<image_id>.png`.

    A preview that fails (the image moved, changed size) is logged and skipped: previews never fail
    a run. Returns how many were written.
    """
    fs.invalidate_cache(root)
    parts = sorted(p for p in fs.ls(root, detail=False) if _is_part(p))
    written = 0
    for row in pick_rows(fs, parts, n):
        uri = row["image_uri"]
        try:
            image_fs, path = open_fs(uri, storage_options(uri, endpoint_url, storage_options_json))
            image = decode_image(image_fs.cat_file(path), max_pixels=max_pixels)
            if image.shape[:2] != (row["height"], row["width"]):
                raise ValueError(f"the image is now {image.shape[1]}x{image.shape[0]}, the row says otherwise")
            picture = render_preview(image, row["segments"] or [])
            write_atomic(fs, posixpath.join(root, PREVIEWS_DIR, f"{row['image_id']}.png"), png_bytes(picture))
            written += 1
        except Exception as e:
            log.warning("no preview for image %s: %s", row["image_id"], type(e).__name__)
    return written


def _is_part(path: str) -> bool:
    name = posixpath.basename(path)
    return name.startswith("part-") and name.endswith(".parquet")
