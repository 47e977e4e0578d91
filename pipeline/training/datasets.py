"""Training data readers: COCO panoptic, COCO instances and semantic PNGs, from any fsspec URI.

Every reader turns its format into the one target Mask2Former trains on: per-segment binary masks
plus contiguous class ids (`Sample`). Readers hold only the parsed annotation index, so they are cheap
to pickle into Ray workers; pixels are read in `load(i)`.

What a label file means (panoptic colours, label PNGs, the ignore label, category order) is
`pipeline.groundtruth`'s, the reader `m2f evaluate` uses too, so a model is scored on the labels
it was trained on.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import pycocotools.mask as mask_utils
from PIL import Image

from m2f.pipeline.groundtruth import (
    IGNORE,
    check_class_count,
    contiguous_mapping,
    files_by_stem,
    read_label_png,
    read_panoptic_png,
    read_rgb,
    sort_by_id,
)
from m2f.pipeline.sources import is_image_name
from m2f.pipeline.storage import Storage


@dataclass(frozen=True)
class Record:
    """Where one image and its labels live; `height`/`width` are the image size in pixels."""

    image_id: int | str
    file_name: str
    image_uri: str
    height: int
    width: int
    label_uri: str | None = None  # panoptic or semantic PNG; None for COCO instances


@dataclass(frozen=True, eq=False)
class Sample:
    """One training example: an image and its targets (eq=False: arrays have no scalar equality)."""

    image: np.ndarray  # (H, W, 3) uint8 RGB
    masks: np.ndarray  # (N, H, W) bool, one per segment
    labels: np.ndarray  # (N,) int64, index into the reader's `categories`
    image_id: int | str
    file_name: str
    valid: np.ndarray | None = None  # (H, W) bool, False on padding added by augmentation; None = all real

    def __post_init__(self) -> None:
        if self.image.ndim != 3 or self.image.shape[2] != 3 or self.image.dtype != np.uint8:
            raise ValueError(f"image must be (H, W, 3) uint8, got {self.image.shape} {self.image.dtype}")
        h, w = self.image.shape[:2]
        if self.masks.ndim != 3 or self.masks.shape[1:] != (h, w) or self.masks.dtype != np.bool_:
            raise ValueError(f"masks must be (N, {h}, {w}) bool, got {self.masks.shape} {self.masks.dtype}")
        if self.labels.shape != (len(self.masks),) or self.labels.dtype != np.int64:
            raise ValueError(f"labels must be ({len(self.masks)},) int64, got {self.labels.shape} {self.labels.dtype}")
        if self.valid is not None and (self.valid.shape != (h, w) or self.valid.dtype != np.bool_):
            raise ValueError(f"valid must be ({h}, {w}) bool, got {self.valid.shape} {self.valid.dtype}")


def _sorted_categories(categories: Sequence[Mapping[str, Any]], default_isthing: int) -> list[dict[str, Any]]:
    """Categories sorted by id, each with at least id, name and isthing."""
    if not categories:
        raise ValueError("the annotation file lists no categories")
    return [
        {**c, "id": int(c["id"]), "name": str(c["name"]), "isthing": int(c.get("isthing", default_isthing))}
        for c in sort_by_id(categories)
    ]


def _join(base: str, name: str) -> str:
    """Join a file name onto a directory URI, keeping its protocol (s3://, file://, plain path)."""
    return base.rstrip("/") + "/" + name


def _open(uri: str, mode: str, storage: Storage) -> Any:
    """`fsspec.open` of `uri` with `storage`'s options for it."""
    return fsspec.open(uri, mode, **storage.options(uri))


def _read_json(uri: str, storage: Storage) -> dict[str, Any]:
    with _open(uri, "rt", storage) as f:
        return json.load(f)


def _read_rgb(uri: str, storage: Storage) -> np.ndarray:
    """(H, W, 3) uint8 RGB pixels of an image file, whatever its stored mode (L, P, RGBA, ...)."""
    with _open(uri, "rb", storage) as f:
        return read_rgb(f)


def _read_image(record: Record, storage: Storage) -> np.ndarray:
    """(H, W, 3) uint8 RGB image, checked against the annotated size (a mismatch would misplace masks)."""
    image = _read_rgb(record.image_uri, storage)
    if image.shape[:2] != (record.height, record.width):
        raise ValueError(
            f"{record.image_uri}: image is {image.shape[1]}x{image.shape[0]} but annotated as "
            f"{record.width}x{record.height} (width x height)"
        )
    return image


def _stack(masks: list[np.ndarray], labels: list[int], h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, H, W) bool masks and (N,) int64 labels, empty masks dropped."""
    keep = [k for k, m in enumerate(masks) if m.any()]
    stacked = np.stack([masks[k] for k in keep]) if keep else np.zeros((0, h, w), dtype=bool)
    return stacked.astype(bool, copy=False), np.array([labels[k] for k in keep], dtype=np.int64)


class _CocoReader:
    """What both COCO readers share: the JSON's sorted categories, one `Record` per image, `load`.

    Subclasses fill `_records` and say in `_targets` which (mask, contiguous label) pairs an image has.
    """

    def __init__(self, categories: Sequence[Mapping[str, Any]], storage: Storage) -> None:
        self.storage = storage
        self.categories = _sorted_categories(categories, default_isthing=1)
        self._mapping = contiguous_mapping(self.categories)
        self._records: list[Record] = []

    def __len__(self) -> int:
        return len(self._records)

    def record(self, i: int) -> Record:
        return self._records[i]

    def load(self, i: int) -> Sample:
        record = self._records[i]
        image = _read_image(record, self.storage)
        masks, labels = self._targets(i, record, image)
        masks_arr, labels_arr = _stack(masks, labels, record.height, record.width)
        return Sample(image, masks_arr, labels_arr, record.image_id, record.file_name)

    def _targets(self, i: int, record: Record, image: np.ndarray) -> tuple[list[np.ndarray], list[int]]:
        raise NotImplementedError

    @staticmethod
    def _image_record(image: Mapping[str, Any], image_dir_uri: str, label_uri: str | None = None) -> Record:
        """The `Record` of one entry of a COCO JSON's "images"."""
        return Record(
            image_id=image["id"],
            file_name=image["file_name"],
            image_uri=_join(image_dir_uri, image["file_name"]),
            height=int(image["height"]),
            width=int(image["width"]),
            label_uri=label_uri,
        )


class CocoPanoptic(_CocoReader):
    """COCO panoptic: a JSON index plus one RGB PNG per image whose colour R + 256 G + 256^2 B is a segment id.

    Crowd segments are left out of the targets (their pixels have no mask), as in Mask2Former's
    panoptic training. Images without a panoptic annotation are skipped: they have no label PNG.
    """

    def __init__(
        self,
        json_uri: str,
        png_dir_uri: str,
        image_dir_uri: str,
        *,
        storage: Storage | None = None,
    ) -> None:
        storage = storage or Storage()
        data = _read_json(json_uri, storage)
        super().__init__(data.get("categories", []), storage)
        annotations = {a["image_id"]: a for a in data.get("annotations", [])}
        self._segments: list[list[dict[str, Any]]] = []
        for image in data.get("images", []):
            annotation = annotations.get(image["id"])
            if annotation is None:
                continue
            for s in annotation["segments_info"]:
                if s["category_id"] not in self._mapping:
                    raise ValueError(f"{json_uri}: segment {s['id']} has unknown category id {s['category_id']}")
            self._records.append(self._image_record(image, image_dir_uri, _join(png_dir_uri, annotation["file_name"])))
            self._segments.append(annotation["segments_info"])

    def _targets(self, i: int, record: Record, image: np.ndarray) -> tuple[list[np.ndarray], list[int]]:
        with _open(record.label_uri, "rb", self.storage) as f:
            ids = read_panoptic_png(f)  # (H, W) segment ids, 0 = void
        if ids.shape != image.shape[:2]:
            raise ValueError(f"{record.label_uri}: panoptic PNG is {ids.shape}, image is {image.shape[:2]}")
        masks, labels = [], []
        for s in self._segments[i]:
            if s.get("iscrowd", 0):
                continue
            masks.append(ids == s["id"])
            labels.append(self._mapping[s["category_id"]])
        return masks, labels


class CocoInstances(_CocoReader):
    """COCO instances: one JSON with polygons, uncompressed RLE or compressed RLE per object.

    Crowd annotations are left out of the targets (Mask2Former trains on non-crowd instances only).
    Images without annotations are kept and load with N = 0 targets.
    """

    def __init__(self, json_uri: str, image_dir_uri: str, *, storage: Storage | None = None) -> None:
        storage = storage or Storage()
        data = _read_json(json_uri, storage)
        super().__init__(data.get("categories", []), storage)
        by_image: dict[Any, list[dict[str, Any]]] = {}
        for a in data.get("annotations", []):
            if a["category_id"] not in self._mapping:
                raise ValueError(f"{json_uri}: annotation {a.get('id')} has unknown category id {a['category_id']}")
            by_image.setdefault(a["image_id"], []).append(a)
        self._records = [self._image_record(image, image_dir_uri) for image in data.get("images", [])]
        self._annotations = [by_image.get(r.image_id, []) for r in self._records]

    def _targets(self, i: int, record: Record, image: np.ndarray) -> tuple[list[np.ndarray], list[int]]:
        masks, labels = [], []
        for a in self._annotations[i]:
            if a.get("iscrowd", 0):
                continue
            masks.append(decode_segmentation(a["segmentation"], record.height, record.width))
            labels.append(self._mapping[a["category_id"]])
        return masks, labels


def decode_segmentation(segmentation: Any, h: int, w: int) -> np.ndarray:
    """(H, W) bool mask of a COCO segmentation: polygons, uncompressed RLE (list counts) or compressed RLE."""
    if isinstance(segmentation, list):
        # Polygons with fewer than 3 points are not areas (and 4 numbers would read as a box).
        polygons = [p for p in segmentation if len(p) >= 6]
        if not polygons:
            return np.zeros((h, w), dtype=bool)
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, h, w))
    elif isinstance(segmentation, dict) and "counts" in segmentation:
        if list(segmentation.get("size", [])) != [h, w]:
            raise ValueError(f"RLE size {segmentation.get('size')} does not match the image size {[h, w]}")
        counts = segmentation["counts"]
        rle = mask_utils.frPyObjects(segmentation, h, w) if isinstance(counts, list) else segmentation
    else:
        raise ValueError(f"segmentation must be a polygon list or an RLE dict, got {type(segmentation).__name__}")
    return mask_utils.decode(rle).astype(bool)


class SemanticMasks:
    """Semantic segmentation: an image folder and a PNG folder matched by file stem.

    Each label PNG holds, per pixel, the index into `categories` (0..K-1), or 255 for unlabelled pixels,
    which belong to no mask. Targets are one mask per class present. Images without a label PNG are
    skipped (labels without an image too); the records are sorted by stem.
    """

    def __init__(
        self,
        image_dir_uri: str,
        mask_dir_uri: str,
        categories: Sequence[Mapping[str, Any] | str],
        *,
        storage: Storage | None = None,
    ) -> None:
        self.storage = storage or Storage()
        if not categories:
            raise ValueError("categories must name at least one class")
        check_class_count(len(categories), "categories")
        self.categories = [
            {"id": k, "name": c, "isthing": 0} if isinstance(c, str) else {"isthing": 0, **c}
            for k, c in enumerate(categories)
        ]
        images = _list_stems(image_dir_uri, is_image_name, self.storage)
        labels = _list_stems(mask_dir_uri, lambda name: name.lower().endswith(".png"), self.storage)
        stems = sorted(set(images) & set(labels))
        if not stems:
            raise ValueError(f"no image in {image_dir_uri} has a label PNG of the same stem in {mask_dir_uri}")
        self._items = [(s, _join(image_dir_uri, images[s]), _join(mask_dir_uri, labels[s])) for s in stems]

    def __len__(self) -> int:
        return len(self._items)

    def record(self, i: int) -> Record:
        """Reads the image header for its size (not its pixels)."""
        stem, image_uri, label_uri = self._items[i]
        with _open(image_uri, "rb", self.storage) as f, Image.open(f) as image:
            width, height = image.size
        return Record(stem, posixpath.basename(image_uri), image_uri, height, width, label_uri)

    def load(self, i: int) -> Sample:
        stem, image_uri, label_uri = self._items[i]
        image = _read_rgb(image_uri, self.storage)
        with _open(label_uri, "rb", self.storage) as f:
            label = read_label_png(f, label_uri)  # (H, W)
        if label.shape != image.shape[:2]:
            raise ValueError(f"{label_uri}: label is {label.shape}, image {image_uri} is {image.shape[:2]}")
        present = np.unique(label)
        present = present[present != IGNORE]
        if present.size and present.max() >= len(self.categories):
            raise ValueError(f"{label_uri}: label {present.max()} but only {len(self.categories)} categories")
        masks = label[None] == present[:, None, None]  # (N, H, W)
        return Sample(image, masks, present.astype(np.int64), stem, posixpath.basename(image_uri))


def _list_stems(dir_uri: str, wanted: Callable[[str], bool], storage: Storage) -> dict[str, str]:
    """File stem -> file name for the files in `dir_uri` whose name `wanted` accepts."""
    fs, path = fsspec.core.url_to_fs(dir_uri, **storage.options(dir_uri))
    if not fs.isdir(path):
        raise ValueError(f"not a directory: {dir_uri}")
    return files_by_stem(fs, path, wanted, dir_uri)
