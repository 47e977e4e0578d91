"""Where a segment's "label score" tag goes, and drawing the tags.

`place_labels` and `label_spots` are pure: boxes in, boxes out. A tag sits on its own segment where it
fits, stays inside the picture and covers no other tag; one that finds no room is left out.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

FONT_SIZE = 13

Box = tuple[int, int, int, int]  # (left, top, right, bottom) in pixels, right and bottom exclusive


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


def label_font() -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=FONT_SIZE)


def text_size(font: Any, text: str) -> tuple[int, int]:
    left, top, right, bottom = font.getbbox(text, anchor="lt")
    return int(np.ceil(right - left)), int(np.ceil(bottom - top))


def draw_labels(
    canvas: Image.Image,
    masks: np.ndarray,
    texts: Sequence[str],
    colours: Sequence[tuple[int, int, int]],
    order: Sequence[int],
) -> None:
    """Draw "label score" tags for masks[order[0]], masks[order[1]], ... as place_labels allows."""
    draw = ImageDraw.Draw(canvas)
    font = label_font()
    pad_x, pad_y, bar = 3, 2, 3  # a bar in the segment's colour ties the tag to its tint
    sizes = []
    for i in order:
        w, h = text_size(font, texts[i])
        sizes.append((w + 2 * pad_x + bar, h + 2 * pad_y))
    spots = [label_spots(masks[i], size) for i, size in zip(order, sizes, strict=True)]
    for i, box in zip(order, place_labels(sizes, spots, (masks.shape[2], masks.shape[1])), strict=True):
        if box is None:
            continue
        left, top, right, bottom = box
        draw.rectangle((left, top, right - 1, bottom - 1), fill=(0, 0, 0))
        draw.rectangle((left, top, left + bar - 1, bottom - 1), fill=colours[i])
        draw.text((left + bar + pad_x, top + pad_y), texts[i], fill=(255, 255, 255), font=font, anchor="lt")
