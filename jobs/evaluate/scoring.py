"""Scoring the chosen ok rows against each ground-truth format: mask AP, PQ, mIoU.

Each scorer reads its ground truth with `pipeline.groundtruth` (the reader training uses too),
meets it with the predictions by file name (`predictions.match_by_name`) and feeds one image at a
time to its metric in `pipeline.metrics`, so memory stays flat however large the set. GT images
with no usable prediction are scored as an empty prediction (all false negatives for PQ,
unlabelled pixels for mIoU, no detections for AP).
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from m2f.jobs.common.bad_input import BadInput
from m2f.jobs.common.configs import EvaluateConfig
from m2f.jobs.evaluate.json_files import read_json, require
from m2f.jobs.evaluate.predictions import BatchOutput, check_size, match_by_name
from m2f.pipeline.groundtruth import (
    IGNORE,
    basename,
    check_class_count,
    contiguous_mapping,
    files_by_stem,
    read_label_png,
    read_panoptic_png,
    sort_by_id,
    stem,
)
from m2f.pipeline.metrics.coco_ap import coco_mask_ap, image_ids_by_file_name, to_coco_results
from m2f.pipeline.metrics.confusion import ConfusionMatrix
from m2f.pipeline.metrics.id_map import segments_to_id_map
from m2f.pipeline.metrics.panoptic_quality import PQAccumulator
from m2f.pipeline.storage import Storage

SEMANTIC_CATEGORY_FILES = ("categories.json", "../categories.json", "../panoptic.json")
# The fields each scorer reads from a ground-truth JSON's records (pipeline/metrics checks what lies deeper).
INSTANCES_FIELDS = {"images": ("id", "file_name"), "annotations": ("image_id",), "categories": ("id",)}
PANOPTIC_FIELDS = {
    "images": ("id", "file_name", "height", "width"),
    "annotations": ("image_id", "file_name", "segments_info"),
    "categories": ("id",),
}


def instances_ap(config: EvaluateConfig, predictions: BatchOutput, storage: Storage) -> dict[str, Any]:
    """COCO mask AP of every matched row against a COCO instances JSON."""
    gt = read_json(config.ground_truth, storage, "ground truth")
    require(gt, ("images", "annotations", "categories"), config.ground_truth, "COCO instances", INSTANCES_FIELDS)
    if any("segmentation" not in a for a in gt["annotations"]):
        raise BadInput(f"{config.ground_truth}: annotations have no 'segmentation'; not a COCO instances JSON")
    ids = image_ids_by_file_name(gt)
    categories = {int(c["id"]): int(c["id"]) for c in gt["categories"]}
    dropped = 0

    def rows() -> Iterator[dict[str, Any]]:
        nonlocal dropped
        for _, row in match_by_name(predictions.ok_rows(), ids, basename, predictions.counts, config.ground_truth):
            dropped += sum(int(s["category_id"]) not in categories for s in row["segments"] or [])
            yield row

    results, _ = to_coco_results(rows(), ids, category_map=categories)
    summary = coco_mask_ap(gt, results)
    summary["segments_outside_gt_categories"] = dropped
    return summary


def panoptic_pq(config: EvaluateConfig, predictions: BatchOutput, storage: Storage) -> dict[str, Any]:
    """PQ / SQ / RQ of every GT image (matched or scored as empty) against COCO panoptic PNGs."""
    gt = read_json(config.ground_truth, storage, "ground truth")
    require(gt, ("images", "annotations", "categories"), config.ground_truth, "COCO panoptic", PANOPTIC_FIELDS)
    if any("segments_info" not in a for a in gt["annotations"]):
        raise BadInput(f"{config.ground_truth}: annotations have no 'segments_info'; not a COCO panoptic JSON")
    masks_uri = config.masks or posixpath.splitext(config.ground_truth.rstrip("/"))[0]
    fs, masks_dir = storage.open(masks_uri)
    if not fs.isdir(masks_dir):
        raise BadInput(f"panoptic PNG folder not found: {masks_uri} (set it with --masks)")

    annotations = {a["image_id"]: a for a in gt["annotations"]}
    entries = {}  # basename of the image file -> (image, annotation); images without annotation have no GT
    for image in gt["images"]:
        if image["id"] in annotations:
            name = basename(image["file_name"])
            if name in entries:
                raise BadInput(f"{config.ground_truth}: two images are named {name!r}; cannot match by file name")
            entries[name] = (image, annotations[image["id"]])

    def load_gt(image: Mapping[str, Any], annotation: Mapping[str, Any]) -> np.ndarray:
        path = posixpath.join(masks_dir, annotation["file_name"])
        if not fs.isfile(path):
            raise BadInput(f"panoptic PNG not found: {path} (for image {image['file_name']})")
        with fs.open(path, "rb") as f:
            ids = read_panoptic_png(f)  # (H, W) segment ids, 0 = void
        if ids.shape != (image["height"], image["width"]):
            raise BadInput(f"{path} is {ids.shape[1]}x{ids.shape[0]}, its image {image['width']}x{image['height']}")
        return ids

    accumulator = PQAccumulator()
    for (image, annotation), row in match_by_name(
        predictions.ok_rows(), entries, basename, predictions.counts, config.ground_truth
    ):
        gt_map = load_gt(image, annotation)
        check_size(row, *gt_map.shape, annotation["file_name"])
        segments = [s | {"id": s["id"] or k} for k, s in enumerate(row["segments"] or [], start=1)]
        pred_map = segments_to_id_map(segments, *gt_map.shape)
        pred_infos = [{"id": s["id"], "category_id": s["category_id"]} for s in segments]
        accumulator.add(pred_map, pred_infos, gt_map, annotation["segments_info"])
    for name in predictions.counts.gt_without_prediction:
        image, annotation = entries[name]
        gt_map = load_gt(image, annotation)
        accumulator.add(np.zeros_like(gt_map), [], gt_map, annotation["segments_info"])
    return accumulator.summary(gt["categories"])


def semantic_categories(config: EvaluateConfig, storage: Storage) -> tuple[list[dict[str, Any]], str]:
    """The class list for semantic masks (sorted by id, as training reads it) and the JSON it came from."""
    if config.categories:
        candidates = [config.categories]
    else:
        candidates = [_resolve(config.ground_truth, name) for name in SEMANTIC_CATEGORY_FILES]
    for uri in candidates:
        fs, path = storage.open(uri)
        if not fs.isfile(path):
            continue
        data = read_json(uri, storage, "categories")
        categories = data.get("categories") if isinstance(data, dict) else data
        if not isinstance(categories, list) or not categories:
            raise BadInput(f"{uri} has no 'categories' list for the semantic classes")
        if any(not isinstance(c, dict) or "id" not in c for c in categories):
            raise BadInput(f"{uri}: every category needs an 'id'")
        try:
            return sort_by_id(categories), uri
        except ValueError:
            raise BadInput(f"{uri} repeats a category id") from None
    raise BadInput(f"no class list for the semantic masks: none of {candidates} exists")


def _resolve(folder: str, relative: str) -> str:
    """`relative` (may start with ../) against the folder URI `folder`, keeping its protocol."""
    protocol, sep, rest = folder.rstrip("/").rpartition("://")
    return f"{protocol}{sep}{posixpath.normpath(posixpath.join(rest, relative))}"


def semantic_miou(config: EvaluateConfig, predictions: BatchOutput, storage: Storage) -> dict[str, Any]:
    """mIoU of every GT mask (matched or scored as unlabelled) from one confusion matrix."""
    categories, source = semantic_categories(config, storage)
    check_class_count(len(categories), source)
    index = contiguous_mapping(categories)
    fs, folder = storage.open(config.ground_truth)
    if not fs.isdir(folder):
        raise BadInput(f"semantic mask folder not found: {config.ground_truth}")
    names = files_by_stem(fs, folder, _is_label_png, config.ground_truth)
    if not names:
        raise BadInput(f"no PNG masks in {config.ground_truth}")
    labels = {key: posixpath.join(folder, name) for key, name in names.items()}

    def load_gt(path: str) -> np.ndarray:
        with fs.open(path, "rb") as f:
            return read_label_png(f, path)  # (H, W) class indices, palette PNGs as indices

    matrix = ConfusionMatrix(len(categories), ignore_index=IGNORE)
    for path, row in match_by_name(predictions.ok_rows(), labels, stem, predictions.counts, config.ground_truth):
        gt = load_gt(path)
        check_size(row, *gt.shape, path)
        matrix.add(_class_map(row, gt.shape, index, source), gt)
    for key in predictions.counts.gt_without_prediction:
        gt = load_gt(labels[key])
        matrix.add(np.full_like(gt, IGNORE), gt)
    return matrix.summary([str(c.get("name", c["id"])) for c in categories])


def _is_label_png(name: str) -> bool:
    return name.lower().endswith(".png") and not name.startswith(".")


def _class_map(row: Mapping[str, Any], shape: tuple[int, int], index: Mapping[int, int], source: str) -> np.ndarray:
    """(H, W) class index per pixel from a row's segments; IGNORE where no segment lies."""
    segments = row["segments"] or []
    unknown = sorted({int(s["category_id"]) for s in segments} - set(index))
    if unknown:
        raise BadInput(f"{row['image_uri']}: predicted category ids {unknown} are not among the classes of {source}")
    numbered = [{"id": k, "rle": s["rle"]} for k, s in enumerate(segments, start=1)]
    id_map = segments_to_id_map(numbered, *shape)  # (H, W), 1..N by position
    lut = np.array([IGNORE] + [index[int(s["category_id"])] for s in segments], dtype=np.int64)
    return lut[id_map]


Scorer = Callable[[EvaluateConfig, BatchOutput, Storage], dict[str, Any]]
SCORERS: dict[str, Scorer] = {"coco-instances": instances_ap, "coco-panoptic": panoptic_pq, "semantic": semantic_miou}
