"""Reading ground truth: panoptic PNGs, semantic label PNGs and category lists, one way for everyone.

Training (`pipeline.training.datasets`), evaluation (`m2f evaluate`) and the synthetic-scene writer
must agree on what a ground-truth file means, or a model is trained on one reading of the labels and
scored on another. So the pixel encodings, the ignore label and the category order live here once;
each caller opens files its own way (fsspec URI or filesystem + path) and hands over a binary handle.

- COCO panoptic PNG: RGB, segment id = R + 256 G + 256^2 B, 0 = void.
- Semantic label PNG: single channel, per pixel a contiguous class index, IGNORE = unlabelled.
- Categories: sorted by dataset id (detectron2's convention), so index k is the k-th smallest id
  whatever order a JSON file lists them in.
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable, Mapping, Sequence
from typing import IO, Any

import numpy as np
from fsspec import AbstractFileSystem
from PIL import Image

IGNORE = 255  # semantic label of unlabelled pixels, in GT label PNGs and in predicted class maps
LABEL_MODES = ("L", "P", "I", "I;16")  # single-channel PIL modes; palette PNGs give indices, not colours


def basename(path: str) -> str:
    """The last component of a path or URI: predictions meet ground truth by file name, not by folder."""
    return str(path).rstrip("/").rsplit("/", 1)[-1]


def stem(path: str) -> str:
    """`basename` without its extension: semantic label PNGs share the image's stem (0001.jpg <-> 0001.png)."""
    return posixpath.splitext(basename(path))[0]


# ---------------------------------------------------------------------------------------------
# Pixels
# ---------------------------------------------------------------------------------------------


def panoptic_ids(rgb: np.ndarray) -> np.ndarray:
    """(H, W) uint32 segment ids of an (H, W, 3) COCO panoptic colour image; 0 = void."""
    rgb = np.asarray(rgb, dtype=np.uint32)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def panoptic_rgb(ids: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 colours of an (H, W) segment id map, id = R + 256 G + 256^2 B (ids below 256^3)."""
    return np.stack([(ids >> shift) & 255 for shift in (0, 8, 16)], axis=-1).astype(np.uint8)


def read_rgb(f: IO[bytes]) -> np.ndarray:
    """(H, W, 3) uint8 RGB pixels of an image file, whatever its stored mode (L, P, RGBA, ...)."""
    with Image.open(f) as image:
        return np.array(image.convert("RGB") if image.mode != "RGB" else image)


def read_panoptic_png(f: IO[bytes]) -> np.ndarray:
    """(H, W) uint32 segment ids of a COCO panoptic PNG; 0 = void."""
    return panoptic_ids(read_rgb(f))


def read_label_png(f: IO[bytes], name: str) -> np.ndarray:
    """(H, W) int64 class indices of a semantic label PNG (`name` is for the error message).

    Raises:
        ValueError: when the PNG is not single-channel: RGB colours are not class indices.
    """
    with Image.open(f) as image:
        if image.mode not in LABEL_MODES:
            raise ValueError(f"{name}: a semantic mask must be a single-channel PNG (L, P or I), got mode {image.mode}")
        return np.asarray(image).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# Categories
# ---------------------------------------------------------------------------------------------


def contiguous_mapping(categories: Sequence[Mapping[str, Any]]) -> dict[int, int]:
    """Dataset category id -> contiguous index (the position in `categories`)."""
    mapping: dict[int, int] = {}
    for index, category in enumerate(categories):
        cid = int(category["id"])
        if cid in mapping:
            raise ValueError(f"duplicate category id {cid} in categories")
        mapping[cid] = index
    return mapping


def sort_by_id(categories: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The categories in contiguous order (by dataset id); ValueError on a repeated id."""
    ordered = sorted(categories, key=lambda c: int(c["id"]))
    contiguous_mapping(ordered)  # rejects duplicate ids
    return ordered


def check_class_count(num_classes: int, source: str) -> None:
    """Refuse class lists whose indices would reach IGNORE in an 8-bit label PNG."""
    if num_classes >= IGNORE:
        raise ValueError(f"{source} lists {num_classes} classes; at most {IGNORE - 1} fit beside ignore = {IGNORE}")


# ---------------------------------------------------------------------------------------------
# Folders of files matched by stem
# ---------------------------------------------------------------------------------------------


def files_by_stem(fs: AbstractFileSystem, folder: str, wanted: Callable[[str], bool], source: str) -> dict[str, str]:
    """File stem -> file name of the files directly in `folder` whose name `wanted` accepts.

    Images and their label PNGs are paired by stem, so two files of one stem (0001.jpg, 0001.JPG)
    would make the pairing a guess: that is an error naming `source`.
    """
    out: dict[str, str] = {}
    for entry in fs.ls(folder, detail=False):
        name = basename(entry)
        if not wanted(name):
            continue
        key = stem(name)
        if key in out:
            raise ValueError(f"{source}: two files share the stem {key!r} ({out[key]}, {name})")
        out[key] = name
    return out
