"""Synthetic scenes: labelled images that need no download, so training and evaluation run offline.

Each scene is a textured `sky` above a slightly sloped horizon and textured `ground` below it (stuff),
with 1-6 circles, rotated rectangles and triangles (things) painted on top, later ones occluding
earlier ones. Labels are exact: images are PNG and every pixel belongs to exactly one segment.

`generate` writes a data set in the three formats the readers in `pipeline.training.datasets` accept (COCO
panoptic, COCO instances, semantic PNGs). The seed alone determines every byte, so a held-out set is
simply a seed that training never used.
"""

from __future__ import annotations

import io
import json
import posixpath
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import pycocotools.mask as mask_utils
from PIL import Image

from m2f.pipeline.groundtruth import IGNORE, panoptic_rgb
from m2f.pipeline.storage import Storage

# Fixed order = the model's contiguous class order (things first, so the things-only instances file
# maps onto the same first three indices).
SYNTHETIC_CATEGORIES: list[dict[str, Any]] = [
    {"id": 1, "name": "circle", "isthing": 1, "color": [220, 20, 60]},
    {"id": 2, "name": "rectangle", "isthing": 1, "color": [0, 120, 255]},
    {"id": 3, "name": "triangle", "isthing": 1, "color": [250, 190, 0]},
    {"id": 4, "name": "sky", "isthing": 0, "color": [135, 206, 235]},
    {"id": 5, "name": "ground", "isthing": 0, "color": [120, 85, 45]},
]
CIRCLE, RECTANGLE, TRIANGLE, SKY, GROUND = 1, 2, 3, 4, 5
THING_IDS = (CIRCLE, RECTANGLE, TRIANGLE)

MIN_SIDE, MAX_SIDE = 128, 320
MIN_THINGS, MAX_THINGS = 1, 6
MIN_SIZE, MAX_SIZE = 0.10, 0.45  # thing extent as a fraction of the shorter image side
MIN_VISIBLE_PX = 16  # things occluded below this are dropped: nobody could label them
MIN_COLOR_DISTANCE = 60  # L1 over RGB; keeps every boundary visible to the model


@dataclass(frozen=True, eq=False)
class Segment:
    """One labelled region of a scene (eq=False: numpy masks have no scalar equality)."""

    mask: np.ndarray  # (H, W) bool
    category_id: int
    iscrowd: int = 0


def render_scene(rng: np.random.Generator) -> tuple[np.ndarray, list[Segment]]:
    """Draw one scene: an (H, W, 3) uint8 RGB image and its segments (stuff first, then things).

    The visible masks partition the image: no pixel is unlabelled and none is labelled twice.
    """
    h, w = (int(v) for v in rng.integers(MIN_SIDE, MAX_SIDE + 1, size=2))
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64) + 0.5  # pixel centres, (H, W) each

    # Horizon: a line through mid-height +-20 % with ends at most 10 % of H above/below the middle.
    y_mid = rng.uniform(0.3, 0.7) * h
    rise = rng.uniform(-0.1, 0.1) * h
    sky = ys < y_mid + rise * (xs - w / 2) / (w / 2)  # (H, W)

    sky_color = _random_color(rng, [])
    ground_color = _random_color(rng, [sky_color], min_distance=2 * MIN_COLOR_DISTANCE)
    image = np.where(sky[..., None], _texture(rng, sky_color, h, w), _texture(rng, ground_color, h, w))

    # Draw thing geometry first, then decide visibility back to front: a thing is only hidden by
    # later ones, so dropping a tiny one never changes what the later ones show.
    short = min(h, w)
    shapes: list[tuple[int, np.ndarray]] = []
    for _ in range(int(rng.integers(MIN_THINGS, MAX_THINGS + 1))):
        category_id = THING_IDS[int(rng.integers(len(THING_IDS)))]
        size = rng.uniform(MIN_SIZE, MAX_SIZE) * short
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        shapes.append((category_id, _shape_mask(rng, category_id, xs, ys, cx, cy, size)))

    covered = np.zeros((h, w), dtype=bool)
    kept: list[tuple[int, np.ndarray, np.ndarray]] = []  # (category id, full mask, visible mask)
    for category_id, full in reversed(shapes):
        visible = full & ~covered
        if visible.sum() < MIN_VISIBLE_PX:
            continue
        kept.append((category_id, full, visible))
        covered |= visible
    kept.reverse()

    colors = [sky_color, ground_color]
    for _, full, _ in kept:  # paint in order so later things occlude earlier ones
        colors.append(_random_color(rng, colors))
        image[full] = colors[-1] + rng.normal(0.0, 6.0, size=(int(full.sum()), 3))

    segments = [Segment(m, c) for m, c in ((sky & ~covered, SKY), (~sky & ~covered, GROUND)) if m.any()]
    segments += [Segment(visible, category_id) for category_id, _, visible in kept]
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), segments


def _random_color(
    rng: np.random.Generator, others: list[np.ndarray], min_distance: int = MIN_COLOR_DISTANCE
) -> np.ndarray:
    """An RGB colour (3,) float at least `min_distance` (L1) from `others`; gives up after 50 draws."""
    for _ in range(50):
        color = rng.integers(0, 256, size=3).astype(np.float64)
        if all(np.abs(color - o).sum() >= min_distance for o in others):
            break
    return color


def _texture(rng: np.random.Generator, color: np.ndarray, h: int, w: int) -> np.ndarray:
    """(H, W, 3) float: `color` with smooth blotches (shared by the channels) and per-pixel grain."""
    cell = int(rng.integers(8, 33))  # blotch size in pixels
    coarse = rng.normal(0.0, 1.0, size=(h // cell + 2, w // cell + 2)).astype(np.float32)
    blotches = np.asarray(Image.fromarray(coarse).resize((w, h), Image.Resampling.BILINEAR), dtype=np.float64)
    amplitude = rng.uniform(8.0, 25.0)
    grain = rng.normal(0.0, rng.uniform(3.0, 10.0), size=(h, w, 3))
    return color + amplitude * blotches[..., None] + grain


def _shape_mask(
    rng: np.random.Generator, category_id: int, xs: np.ndarray, ys: np.ndarray, cx: float, cy: float, size: float
) -> np.ndarray:
    """(H, W) bool mask of one thing whose largest extent is about `size` pixels, centred at (cx, cy)."""
    dx, dy = xs - cx, ys - cy
    if category_id == CIRCLE:
        return dx**2 + dy**2 <= (size / 2) ** 2
    if category_id == RECTANGLE:
        long_side, short_side = size, size * rng.uniform(0.4, 1.0)
        angle = rng.uniform(0.0, np.pi)
        u = dx * np.cos(angle) + dy * np.sin(angle)  # coordinates along the rectangle's own axes
        v = -dx * np.sin(angle) + dy * np.cos(angle)
        return (np.abs(u) <= long_side / 2) & (np.abs(v) <= short_side / 2)
    if category_id == TRIANGLE:
        # Vertices on the circumscribed circle, near-equilateral with jittered angles.
        angles = rng.uniform(0, 2 * np.pi) + np.array([0.0, 2.0, 4.0]) * np.pi / 3 + rng.uniform(-0.35, 0.35, size=3)
        vx, vy = cx + size / 2 * np.cos(angles), cy + size / 2 * np.sin(angles)
        # Inside = on the same side of all three edges (edge functions share a sign).
        sides = [(vx[(i + 1) % 3] - vx[i]) * (ys - vy[i]) - (vy[(i + 1) % 3] - vy[i]) * (xs - vx[i]) for i in range(3)]
        return ((sides[0] >= 0) & (sides[1] >= 0) & (sides[2] >= 0)) | (
            (sides[0] <= 0) & (sides[1] <= 0) & (sides[2] <= 0)
        )
    raise ValueError(f"not a thing category id: {category_id}")


def generate(out: str, n: int, seed: int, *, storage: Storage | None = None) -> dict[str, Any]:
    """Write `n` scenes under the fsspec URI `out` (local path or s3://...) and return a summary.

    Layout: `images/NNNNNN.png`, `panoptic.json` + `panoptic/NNNNNN.png` (COCO panoptic, segment id =
    R + 256 G + 256^2 B), `instances.json` (COCO instances, things only, compressed RLE) and
    `semantic/NNNNNN.png` (contiguous class index into SYNTHETIC_CATEGORIES, 255 = ignore).
    Image i (id i + 1) is drawn from its own stream seeded by (seed, i), so it is the same whatever `n`.
    `storage` reaches `out` (None: a local path).
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    fs, root = fsspec.core.url_to_fs(out, **(storage or Storage()).options(out))
    for sub in ("images", "panoptic", "semantic"):
        fs.makedirs(posixpath.join(root, sub), exist_ok=True)

    contiguous = {c["id"]: k for k, c in enumerate(SYNTHETIC_CATEGORIES)}
    images: list[dict[str, Any]] = []
    panoptic_annotations: list[dict[str, Any]] = []
    instance_annotations: list[dict[str, Any]] = []
    for i in range(n):
        image, segments = render_scene(np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(i,))))
        h, w = image.shape[:2]
        image_id = i + 1
        name = f"{image_id:06d}.png"
        images.append({"id": image_id, "file_name": name, "height": h, "width": w})

        panoptic_ids = np.zeros((h, w), dtype=np.uint32)  # 0 = void
        semantic = np.full((h, w), IGNORE, dtype=np.uint8)
        segments_info = []
        for segment_id, seg in enumerate(segments, start=1):
            panoptic_ids[seg.mask] = segment_id
            semantic[seg.mask] = contiguous[seg.category_id]
            area, bbox = _area_bbox(seg.mask)
            segments_info.append(
                {"id": segment_id, "category_id": seg.category_id, "iscrowd": seg.iscrowd, "area": area, "bbox": bbox}
            )
            if seg.category_id in THING_IDS:
                rle = mask_utils.encode(np.asfortranarray(seg.mask.astype(np.uint8)))
                instance_annotations.append(
                    {
                        "id": len(instance_annotations) + 1,
                        "image_id": image_id,
                        "category_id": seg.category_id,
                        "segmentation": {"size": [h, w], "counts": rle["counts"].decode("ascii")},
                        "area": area,
                        "bbox": bbox,
                        "iscrowd": seg.iscrowd,
                    }
                )
        panoptic_annotations.append({"image_id": image_id, "file_name": name, "segments_info": segments_info})

        _write(fs, posixpath.join(root, "images", name), _png(image))
        _write(fs, posixpath.join(root, "panoptic", name), _png(panoptic_rgb(panoptic_ids)))  # (H, W, 3)
        _write(fs, posixpath.join(root, "semantic", name), _png(semantic))

    info = {"description": "m2f synthetic scenes", "seed": seed}
    panoptic = {"info": info, "images": images, "annotations": panoptic_annotations}
    panoptic["categories"] = SYNTHETIC_CATEGORIES
    instances = {"info": info, "images": images, "annotations": instance_annotations}
    instances["categories"] = [c for c in SYNTHETIC_CATEGORIES if c["isthing"]]
    _write(fs, posixpath.join(root, "panoptic.json"), json.dumps(panoptic).encode())
    _write(fs, posixpath.join(root, "instances.json"), json.dumps(instances).encode())

    base = out.rstrip("/")
    return {
        "out": out,
        "seed": seed,
        "num_images": n,
        "num_segments": sum(len(a["segments_info"]) for a in panoptic_annotations),
        "num_things": len(instance_annotations),
        "images": f"{base}/images",
        "panoptic_json": f"{base}/panoptic.json",
        "panoptic_dir": f"{base}/panoptic",
        "instances_json": f"{base}/instances.json",
        "semantic_dir": f"{base}/semantic",
    }


def _area_bbox(mask: np.ndarray) -> tuple[int, list[int]]:
    """Pixel count and tight [x, y, width, height] box of a non-empty (H, W) bool mask."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    bbox = [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]
    return int(mask.sum()), bbox


def _png(array: np.ndarray) -> bytes:
    """Lossless PNG bytes; PIL's encoder is deterministic, so equal arrays give equal files."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _write(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    with fs.open(path, "wb") as f:
        f.write(data)
