"""Previews of a finished run that people can find and read: overlay PNGs and an index page.

Each preview is the image (scaled so its short side is at least MIN_SHORT_SIDE and its long side at most
MAX_SIDE) with every segment's mask tinted in its own colour, "label score" tags placed where they neither
leave the picture nor cover one another, and a legend strip below the picture naming the classes shown.
`write_previews` writes them to `OUTPUT/_previews/<stem>-<image_id>.png` and `OUTPUT/_previews/index.html`,
a static page listing each preview with its image URI and a table of its segments.

`render_overlay`, `place_labels`, `render_legend` and `index_html` are pure; `render_preview` takes an
output row's segments (COCO RLE); `pick_rows` and `write_previews` read the dataset.
"""

from __future__ import annotations

import colorsys
import html
import io
import logging
import posixpath
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec import AbstractFileSystem
from PIL import Image, ImageDraw, ImageFont
from pycocotools import mask as mask_utils

from m2f.pipeline.decode import decode_image
from m2f.pipeline.output import PREVIEWS_DIR, list_part_files
from m2f.pipeline.schema import STATUS_OK, image_id
from m2f.pipeline.storage import open_fs, qualify, storage_options, write_atomic

INDEX_NAME = "index.html"
ALPHA = 0.55  # mask opacity: the image stays readable underneath
MAX_SIDE = 1024  # previews of larger images are scaled down to this longest side
MIN_SHORT_SIDE = 512  # smaller images are scaled up to this short side, so 13 px labels fit on them
FONT_SIZE = 13
MAX_STEM = 40  # characters of the source file's stem kept in a preview's name
LEGEND_MIN_WIDTH = 320  # a legend narrower than this would wrap every entry; the canvas widens instead
LEGEND_SWATCHES = 8  # swatches per class in the legend; further instances are counted in the text
BACKGROUND = (28, 28, 28)  # the legend strip (and any canvas the image does not cover)

Box = tuple[int, int, int, int]  # (left, top, right, bottom) in pixels, right and bottom exclusive

log = logging.getLogger(__name__)


def segment_colour(segment_id: int) -> tuple[int, int, int]:
    """A distinct, saturated RGB colour for a segment id (hues spaced by the golden ratio)."""
    hue = (segment_id * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 0.95)
    return round(r * 255), round(g * 255), round(b * 255)


def preview_name(uri: str, image_id: str) -> str:
    """`<stem>-<image_id>.png`: the source file's stem, reduced to ASCII letters, digits, `._-` and MAX_STEM
    characters ("image" when nothing is left), so previews sort and read like their sources."""
    path = urlsplit(uri).path if uri.lower().startswith(("http://", "https://")) else uri
    stem = posixpath.splitext(path.rstrip("/").rsplit("/", 1)[-1])[0]
    stem = unicodedata.normalize("NFKD", stem).encode("ascii", "ignore").decode("ascii")  # é -> e
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._-")[:MAX_STEM].rstrip("._-")
    return f"{stem or 'image'}-{image_id}.png"


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


# --- labels -------------------------------------------------------------------------------------------


def _overlaps(a: Box, b: Box, gap: int) -> bool:
    return a[0] < b[2] + gap and b[0] < a[2] + gap and a[1] < b[3] + gap and b[1] < a[3] + gap


def place_labels(
    sizes: Sequence[tuple[int, int]],
    spots: Sequence[Sequence[tuple[int, int]]],
    bounds: tuple[int, int],
    *,
    gap: int = 2,
) -> list[Box | None]:
    """Greedy placement of label boxes inside a (W, H) picture, earlier labels first.

    sizes: (w, h) of each label's box; spots: each label's preferred centres (x, y), best first. A label
    tries each spot, then its first spot moved up and down by one and two box heights; a box that would
    cross the picture's edge is shifted inside it. It takes the first position at least `gap` px away from
    every box placed before it, and is skipped (None) when there is none or it is larger than the picture.
    Returns one box or None per label, in the input order.
    """
    if len(sizes) != len(spots):
        raise ValueError(f"{len(sizes)} label sizes for {len(spots)} lists of spots")
    width, height = bounds
    placed: list[Box] = []
    boxes: list[Box | None] = []
    for (w, h), own in zip(sizes, spots, strict=True):
        box = None
        if 0 < w <= width and 0 < h <= height and own:
            x0, y0 = own[0]
            nudged = [(x0, y0 + k * (h + gap)) for k in (-1, 1, -2, 2)]
            for x, y in [*own, *nudged]:
                left = min(max(round(x - w / 2), 0), width - w)
                top = min(max(round(y - h / 2), 0), height - h)
                candidate = (left, top, left + w, top + h)
                if not any(_overlaps(candidate, other, gap) for other in placed):
                    box = candidate
                    break
        if box is not None:
            placed.append(box)
        boxes.append(box)
    return boxes


def label_spots(mask: np.ndarray, size: tuple[int, int], *, most: int = 12) -> list[tuple[int, int]]:
    """Centres (x, y) for a (w, h) label on a (H, W) mask, best first.

    First up to `most` centres, on a grid of about a third of the label's size, at which the whole label
    lies on the mask, nearest the mask's centroid first; then covered pixels that a label can at least
    start from: the middle covered pixel of the middle covered row, of rows further up and down, and left
    and right along the middle row. Empty for an empty mask.
    """
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return []
    cols = np.flatnonzero(mask.any(axis=0))
    y0, x0 = int(rows[0]), int(cols[0])
    box = mask[y0 : rows[-1] + 1, x0 : cols[-1] + 1]  # (h', w') the mask's bounding box
    w, h = size
    spots: list[tuple[int, int]] = []
    if w <= box.shape[1] and h <= box.shape[0]:
        # Covered pixels in every label-sized box, from an integral image: O(1) per candidate.
        integral = np.zeros((box.shape[0] + 1, box.shape[1] + 1), np.int32)
        integral[1:, 1:] = box.cumsum(axis=0, dtype=np.int32).cumsum(axis=1)
        tops = np.arange(0, box.shape[0] - h + 1, max(1, h // 3))  # (Y,)
        lefts = np.arange(0, box.shape[1] - w + 1, max(1, w // 3))  # (X,)
        t, l = np.meshgrid(tops, lefts, indexing="ij")  # (Y, X)
        inside = integral[t + h, l + w] - integral[t, l + w] - integral[t + h, l] + integral[t, l] == w * h
        if inside.any():
            ys, xs = np.nonzero(box)
            cy, cx = ys.mean() + y0, xs.mean() + x0
            centres_x, centres_y = l[inside] + x0 + w / 2, t[inside] + y0 + h / 2
            nearest = np.argsort((centres_x - cx) ** 2 + (centres_y - cy) ** 2, kind="stable")[:most]
            spots += [(round(centres_x[k]), round(centres_y[k])) for k in nearest]
    for q in (0.5, 0.3, 0.7, 0.15, 0.85):
        y = int(rows[round(q * (rows.size - 1))])
        cols = np.flatnonzero(mask[y])
        spots.append((int(cols[cols.size // 2]), y))
    middle = int(rows[rows.size // 2])
    cols = np.flatnonzero(mask[middle])
    spots += [(int(cols[round(q * (cols.size - 1))]), middle) for q in (0.2, 0.8)]
    return list(dict.fromkeys(spots))


def _font() -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=FONT_SIZE)


def _text_size(font: Any, text: str) -> tuple[int, int]:
    left, top, right, bottom = font.getbbox(text, anchor="lt")
    return int(np.ceil(right - left)), int(np.ceil(bottom - top))


def _draw_labels(
    canvas: Image.Image,
    masks: np.ndarray,
    texts: Sequence[str],
    colours: Sequence[tuple[int, int, int]],
    order: Sequence[int],
) -> None:
    """Draw "label score" tags for masks[order[0]], masks[order[1]], ... as place_labels allows."""
    draw = ImageDraw.Draw(canvas)
    font = _font()
    pad_x, pad_y, bar = 3, 2, 3  # a bar in the segment's colour ties the tag to its tint
    sizes = []
    for i in order:
        w, h = _text_size(font, texts[i])
        sizes.append((w + 2 * pad_x + bar, h + 2 * pad_y))
    spots = [label_spots(masks[i], size) for i, size in zip(order, sizes, strict=True)]
    for i, box in zip(order, place_labels(sizes, spots, (masks.shape[2], masks.shape[1])), strict=True):
        if box is None:
            continue
        left, top, right, bottom = box
        draw.rectangle((left, top, right - 1, bottom - 1), fill=(0, 0, 0))
        draw.rectangle((left, top, left + bar - 1, bottom - 1), fill=colours[i])
        draw.text((left + bar + pad_x, top + pad_y), texts[i], fill=(255, 255, 255), font=font, anchor="lt")


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
    if _text_size(font, text)[0] <= room:
        return text
    lo, hi = 0, len(text)  # text[:lo] + "..." fits (or lo == 0); text[:hi] + "..." does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if _text_size(font, text[:mid] + "...")[0] <= room else (lo, mid)
    return text[:lo] + "..." if lo else ""


def render_legend(entries: Sequence[tuple[str, Sequence[tuple[int, int, int]]]], width: int) -> Image.Image:
    """A strip `width` px wide: per entry, up to LEGEND_SWATCHES swatches of its colours and its label (with
    the number of segments when more than one), wrapped into rows."""
    font = _font()
    margin, swatch, step, space = 8, 12, 14, 18
    line = max(swatch, _text_size(font, "Ag")[1]) + 6
    items = []  # (colours, text, swatches' width, text's width)
    for label, colours in entries or [("no segments", [])]:
        shown = list(colours)[:LEGEND_SWATCHES]
        text = label if len(colours) <= 1 else f"{label} ({len(colours)})"
        swatches_w = step * len(shown) + (4 if shown else 0)
        room = width - 2 * margin - swatches_w
        text = _fit(font, text, room)
        items.append((shown, text, swatches_w, _text_size(font, text)[0]))
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
        resample = Image.Resampling.NEAREST if upscale else Image.Resampling.BILINEAR
        image = np.asarray(Image.fromarray(image).resize(size, resample))
    ordered = sorted(segments, key=lambda s: (float(s.get("score") or 0.0), int(s["id"])))
    masks = np.zeros((len(ordered), size[1], size[0]), dtype=bool)  # (N, h, w)
    for i, segment in enumerate(ordered):  # one full-size mask at a time
        rle = segment["rle"]
        if list(rle["size"]) != [height, width]:
            raise ValueError(f"segment {segment['id']} has RLE size {list(rle['size'])}, image is {[height, width]}")
        counts = rle["counts"].encode("ascii") if isinstance(rle["counts"], str) else rle["counts"]
        mask = mask_utils.decode({"size": [height, width], "counts": counts})  # (H, W) uint8
        if size != (width, height):
            mask = np.asarray(Image.fromarray(mask).resize(size, Image.Resampling.NEAREST))
        masks[i] = mask.astype(bool)

    colours = [segment_colour(int(s["id"])) for s in ordered]
    picture = Image.fromarray(render_overlay(image, masks, colours, alpha=alpha))
    if draw_labels:
        texts = [f"{s['label']} {float(s.get('score') or 0.0):.2f}" for s in ordered]
        by_confidence = sorted(range(len(ordered)), key=lambda i: (-float(ordered[i].get("score") or 0.0), i))
        _draw_labels(picture, masks, texts, colours, by_confidence)
    legend = render_legend(legend_entries(ordered), max(size[0], LEGEND_MIN_WIDTH))
    canvas = Image.new("RGB", (legend.width, size[1] + legend.height), BACKGROUND)
    canvas.paste(picture, (0, 0))
    canvas.paste(legend, (0, size[1]))
    return canvas


def png_bytes(picture: Image.Image) -> bytes:
    buf = io.BytesIO()
    picture.save(buf, "PNG", optimize=False)
    return buf.getvalue()


# --- the index page -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreviewEntry:
    """One image on the index page: its preview (`png` None when there is none, `note` says why)."""

    uri: str
    image_id: str
    png: str | None = None
    size: tuple[int, int] | None = None  # (w, h) of the PNG
    source_size: tuple[int, int] | None = None  # (w, h) of the image
    segments: list[Mapping[str, Any]] = field(default_factory=list)
    about: str = ""  # model, task, run
    note: str = ""


_STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px; background: #f4f4f4; color: #1d1d1d; }
h1 { font-size: 20px; margin: 0 0 4px; }
section { background: #fff; border: 1px solid #d8d8d8; border-radius: 6px; padding: 16px; margin: 0 0 20px; }
h2 { font-size: 15px; margin: 0 0 4px; word-break: break-all; }
.uri { font-family: ui-monospace, monospace; word-break: break-all; margin: 0 0 2px; }
.about, .note { color: #555; margin: 0 0 12px; }
.body { display: flex; flex-wrap: wrap; gap: 20px; align-items: flex-start; }
img { max-width: 100%; height: auto; display: block; }
table { border-collapse: collapse; }
th, td { padding: 2px 10px; border-bottom: 1px solid #e6e6e6; text-align: left; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
.swatch { display: inline-block; width: 10px; height: 10px; margin-right: 6px; vertical-align: baseline; }
"""


_DOT = " \u00b7 "


def _segment_table(segments: Sequence[Mapping[str, Any]]) -> str:
    rows = []
    for s in sorted(segments, key=lambda s: (-int(s.get("area") or 0), int(s["id"]))):
        r, g, b = segment_colour(int(s["id"]))
        score = s.get("score")
        rows.append(
            f'<tr><td><span class="swatch" style="background:#{r:02x}{g:02x}{b:02x}"></span>'
            f"{html.escape(str(s['label']))}</td>"
            f'<td class="num">{"" if score is None else f"{float(score):.3f}"}</td>'
            f'<td class="num">{int(s.get("area") or 0):,}</td></tr>'
        )
    if not rows:
        rows.append('<tr><td colspan="3">no segments</td></tr>')
    return (
        f"<table><caption>{len(segments)} segment{'' if len(segments) == 1 else 's'}</caption>"
        '<thead><tr><th>label</th><th class="num">score</th><th class="num">area (px)</th></tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def index_html(entries: Sequence[PreviewEntry], *, output: str = "") -> str:
    """A self-contained page (inline CSS, no scripts, no external URLs) listing each entry: its preview
    (a relative link), its image URI and a table of its segments (label, score, area), largest first."""
    shown = sum(e.png is not None for e in entries)
    parts = [
        '<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n',
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n',
        f"<title>m2f previews{' - ' + html.escape(output) if output else ''}</title>\n",
        f"<style>{_STYLE}</style>\n</head>\n<body>\n<h1>m2f previews</h1>\n",
        f'<p class="about">{shown} of {len(entries)} image{"" if len(entries) == 1 else "s"}',
        f" from <code>{html.escape(output)}</code>" if output else "",
        "</p>\n",
    ]
    for e in entries:
        parts.append(f'<section id="img-{html.escape(e.image_id)}">\n')
        title = e.png or posixpath.basename(e.uri.rstrip("/")) or e.image_id
        parts.append(f'<h2>{html.escape(title)}</h2>\n<p class="uri">{html.escape(e.uri)}</p>\n')
        about = [f"{e.source_size[0]}\u00d7{e.source_size[1]} px"] if e.source_size else []
        about += [e.about] if e.about else []
        if about:
            parts.append(f'<p class="about">{html.escape(_DOT.join(about))}</p>\n')
        if e.png is None:
            parts.append(f'<p class="note">no preview: {html.escape(e.note)}</p>\n</section>\n')
            continue
        href = quote(e.png)
        dims = f' width="{e.size[0]}" height="{e.size[1]}"' if e.size else ""
        parts.append(
            f'<div class="body"><a href="{href}"><img src="{href}"{dims} alt="overlay of '
            f'{html.escape(e.uri)}"></a>\n{_segment_table(e.segments)}</div>\n</section>\n'
        )
    parts.append("</body>\n</html>\n")
    return "".join(parts)


# --- choosing rows and writing --------------------------------------------------------------------------


def _first_distinct(uris: Iterable[str], n: int) -> list[str]:
    """The first n distinct URIs, consuming no more of `uris` than that needs."""
    seen: dict[str, None] = {}
    if n > 0:
        for uri in uris:
            seen.setdefault(uri, None)
            if len(seen) == n:
                break
    return list(seen)


def _smallest_ok_uris(fs: AbstractFileSystem, parts: Sequence[str], n: int) -> list[str]:
    """The n smallest distinct image URIs that have an ok row among `parts`."""
    best: list[str] = []
    for path in parts:
        with fs.open(path, "rb") as f:
            table = pq.read_table(f, columns=["image_uri", "status"])
        ok = table.filter(pc.equal(table["status"], STATUS_OK))["image_uri"]
        best = sorted(set(best) | set(pc.unique(ok).to_pylist()))[:n]
    return best


def pick_rows(
    fs: AbstractFileSystem, parts: Sequence[str], n: int, *, uris: Iterable[str] | None = None
) -> list[tuple[str, dict[str, Any] | None]]:
    """(uri, its newest ok row or None) for the first n distinct `uris`, in their order; without `uris`, for
    the n smallest image URIs that have an ok row (deterministic whatever the file layout).

    Any run's row counts; of several ok rows of an image (an --overwrite under way) the newest
    (`processed_at`) is taken. Reads two narrow columns of every part file, then the rows themselves
    from the files that hold them.
    """
    if n < 0:
        raise ValueError(f"the number of previews must be >= 0, got {n}")
    wanted = _first_distinct(uris, n) if uris is not None else _smallest_ok_uris(fs, parts, n)
    ids = {image_id(uri): uri for uri in wanted}
    newest: dict[str, tuple[Any, str]] = {}  # image_id -> (processed_at, path)
    id_array = pa.array(sorted(ids), pa.string())
    for path in parts:
        if not ids:
            break
        with fs.open(path, "rb") as f:
            table = pq.read_table(f, columns=["image_id", "status", "processed_at"])
        table = table.filter(pc.and_(pc.is_in(table["image_id"], id_array), pc.equal(table["status"], STATUS_OK)))
        for iid, when in zip(table["image_id"].to_pylist(), table["processed_at"].to_pylist(), strict=True):
            if iid not in newest or _later(when, newest[iid][0]):
                newest[iid] = (when, path)
    rows: dict[str, dict[str, Any]] = {}
    for path in sorted({path for _, path in newest.values()}):
        with fs.open(path, "rb") as f:
            table = pq.read_table(f, columns=_ROW_COLUMNS)
        mine = pa.array(sorted(i for i, (_, p) in newest.items() if p == path), pa.string())
        table = table.filter(pc.and_(pc.is_in(table["image_id"], mine), pc.equal(table["status"], STATUS_OK)))
        for row in table.to_pylist():
            held = rows.get(row["image_id"])
            if held is None or _later(row["processed_at"], held["processed_at"]):
                rows[row["image_id"]] = row
    return [(uri, rows.get(iid)) for iid, uri in ids.items()]


_ROW_COLUMNS = [
    "image_id",
    "image_uri",
    "status",
    "width",
    "height",
    "segments",
    "model",
    "task",
    "run_id",
    "processed_at",
]


def _later(a: Any, b: Any) -> bool:
    return b is None or (a is not None and a > b)


def write_previews(
    fs: AbstractFileSystem,
    root: str,
    n: int,
    *,
    uris: Iterable[str] | None = None,
    endpoint_url: str | None = None,
    storage_options_json: str | None = None,
    max_pixels: int = 100_000_000,
) -> int:
    """Write overlays of n images of the dataset under `root` to `root/_previews/<stem>-<image_id>.png`, and
    `root/_previews/index.html` listing them.

    uris: the run's listing, in order; the first n distinct URIs are previewed (an image without an ok row
    is listed on the page without a preview), and no more of the iterable is consumed. None: the n smallest
    image URIs with an ok row. A preview that fails (the image moved, changed size) is logged, noted on the
    page and skipped: previews never fail a run. Returns how many PNGs were written.
    """
    parts = list_part_files(fs, root)
    folder = posixpath.join(root, PREVIEWS_DIR)
    entries = []
    for uri, row in pick_rows(fs, parts, n, uris=uris):
        iid = image_id(uri)
        if row is None:
            entries.append(PreviewEntry(uri=uri, image_id=iid, note="no ok row in this output"))
            continue
        source_size = (row["width"], row["height"])
        about = f"{row['model']} \u00b7 {row['task']} \u00b7 run {row['run_id']}"
        segments = row["segments"] or []
        try:
            image_fs, path = open_fs(uri, storage_options(uri, endpoint_url, storage_options_json))
            image = decode_image(image_fs.cat_file(path), max_pixels=max_pixels)
            if image.shape[:2] != (row["height"], row["width"]):
                raise ValueError(f"the image is now {image.shape[1]}x{image.shape[0]}, the row says otherwise")
            picture = render_preview(image, segments)
            name = preview_name(uri, iid)
            write_atomic(fs, posixpath.join(folder, name), png_bytes(picture))
        except Exception as e:
            log.warning("no preview for image %s: %s", iid, type(e).__name__)
            note = f"the preview failed ({type(e).__name__})"
            entries.append(PreviewEntry(uri=uri, image_id=iid, source_size=source_size, about=about, note=note))
            continue
        entries.append(
            PreviewEntry(
                uri=uri,
                image_id=iid,
                png=name,
                size=picture.size,
                source_size=source_size,
                segments=segments,
                about=about,
            )
        )
    if entries:
        write_atomic(fs, posixpath.join(folder, INDEX_NAME), index_html(entries, output=qualify(fs, root)))
    return sum(e.png is not None for e in entries)
