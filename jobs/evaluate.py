"""`m2f evaluate` and `m2f export-coco`: score a batch run against ground truth, or export it as COCO results.

Predictions are the OUTPUT of `m2f segment`: the `*.parquet` files directly under that prefix
(local or object storage). Subfolders (`_runs/`, `_previews/`) and hidden names (`.`, `_`: half-written
temporaries) are not read. An image listed more than once (a retried or resumed run) counts once:
its latest `ok` row by `processed_at`, or, when it never succeeded, its latest error row, which
leaves the image without a prediction.

Predictions meet the ground truth by file name: the basename of `image_uri` equals the basename of
the GT image's `file_name` (for semantic masks: the file stems, `0001.jpg` <-> `0001.png`). Predicted
images with no GT are counted and left out; GT images with no usable prediction count as an empty
prediction (all false negatives for PQ, unlabelled pixels for mIoU, no detections for AP).

Ground-truth formats (`gt_format`):
- `coco-instances`: GROUND_TRUTH is a COCO instances JSON. Mask AP from pycocotools' COCOeval
  (`iouType="segm"`) on the segments as results, each with its own `category_id`; segments of
  categories the JSON does not list (stuff of a panoptic model) are dropped and counted.
- `coco-panoptic`: GROUND_TRUTH is a COCO panoptic JSON; its PNGs are in `masks`, default the folder
  beside the JSON named by its stem (`panoptic_val2017.json` -> `panoptic_val2017/`). PQ / SQ / RQ
  for All / Things / Stuff and per class. Predicted masks become an id map (segment `id`, category
  `category_id`; where masks overlap the earlier, higher-scoring segment keeps the pixel).
- `semantic`: GROUND_TRUTH is the folder of label PNGs, one per image, whose pixels are contiguous
  class indices (255 = unlabelled, not scored). The classes are the categories of a COCO-style
  JSON (an object with a "categories" list, or a bare list), **sorted by id**: index k is the k-th
  smallest id, as in `pipeline.datasets`. That JSON is `categories` when given, otherwise the first
  that exists of FOLDER/categories.json, FOLDER/../categories.json, FOLDER/../panoptic.json (the
  layout `m2f synth` writes). A predicted segment's `category_id` is looked up among those ids;
  pixels no segment covers count as wrong. mIoU comes from one confusion matrix over the set.

Runs and tasks: each row names its `task` and `run_id`; the run report `OUTPUT/_runs/<run_id>.json`
holds the run's `config.score_threshold`. A task that does not fit the GT format is warned about
(`TASK_MISMATCH`), except semantic predictions against COCO instances, which are refused: a semantic
segment is every pixel of a class, so "mask AP" of it is not instance AP, and detectron2's
COCOEvaluator, given a model without instance output, reports no AP at all rather than a number.
Mask AP ranks all detections (up to 100 per image), so a run with `score_threshold > 0` is warned
about too. Warnings are printed on stderr and listed under "warnings" in the JSON.

`json_out="-"` prints the metrics JSON as the last line of stdout, in one line, and everything meant
for people (table, warnings) on stderr, so a scheduler reads stdout without parsing prose.

Bad input (missing files, wrong format, predictions that do not fit the GT) prints one clear line
on stderr and returns exit code 2, never a traceback.
"""

from __future__ import annotations

import contextlib
import io
import json
import posixpath
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from fsspec import AbstractFileSystem
from PIL import Image

from m2f.pipeline.metrics.coco_ap import coco_mask_ap, image_ids_by_file_name, to_coco_results
from m2f.pipeline.metrics.confusion import ConfusionMatrix
from m2f.pipeline.metrics.id_map import segments_to_id_map
from m2f.pipeline.metrics.panoptic_quality import PQAccumulator
from m2f.pipeline.metrics.table import format_table
from m2f.pipeline.output import list_part_files, run_file
from m2f.pipeline.schema import STATUS_OK
from m2f.pipeline.storage import open_fs, storage_options, write_atomic

EXIT_OK, EXIT_BAD_INPUT = 0, 2
GT_FORMATS = ("coco-instances", "coco-panoptic", "semantic")
IGNORE = 255  # semantic label of unlabelled pixels, in GT PNGs and in predicted class maps
SEMANTIC_CATEGORY_FILES = ("categories.json", "../categories.json", "../panoptic.json")
BATCH_ROWS = 64  # rows decoded at a time in the second pass: a row can hold hundreds of RLEs
_SELECT_COLUMNS = ("image_uri", "status", "processed_at", "run_id", "task")
_READ_COLUMNS = ("image_uri", "image_id", "status", "width", "height", "segments")
_EXAMPLES = 5  # how many unmatched names a warning shows
STDOUT = "-"  # json_out that means: the metrics JSON as the last line of stdout
EXPORT_FORMATS = ("instances", "panoptic")
STABLE_ID_HEX = 13  # hex digits of image_id kept for a COCO image id: 52 bits, exact in any JSON reader
PANOPTIC_MAX_ID = 256**3 - 1  # the largest segment id an RGB PNG can hold (R + 256 G + 256^2 B)


@dataclass(frozen=True)
class EvaluateConfig:
    predictions: str
    ground_truth: str
    gt_format: str = "coco-panoptic"
    masks: str | None = None
    json_out: str | None = None
    endpoint_url: str | None = None
    storage_options_json: str | None = None
    categories: str | None = None  # semantic only: class-list JSON; default: found beside GROUND_TRUTH


class BadInput(ValueError):
    """User input the job cannot evaluate; the message says which file and why."""


@dataclass(frozen=True)
class RunInfo:
    """One run that wrote chosen ok rows, with what its report says about how it segmented."""

    run_id: str
    task: str
    images: int  # chosen ok rows of this run and task
    score_threshold: float | None  # from the run report; None when the report is missing or lacks it


# ---------------------------------------------------------------------------------------------
# Reading the batch output
# ---------------------------------------------------------------------------------------------


@dataclass
class MatchCounts:
    """What happened to every image on either side, reported beside the metrics."""

    prediction_files: int = 0
    rows: int = 0
    images: int = 0
    superseded_rows: int = 0  # older or failed duplicates of an image that has a chosen row
    failed: int = 0  # images whose every row is an error row
    ok: int = 0
    gt_images: int = 0
    matched: int = 0
    unmatched_predictions: list[str] = field(default_factory=list)
    gt_without_prediction: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, int]:
        return {
            "prediction_files": self.prediction_files,
            "rows": self.rows,
            "images": self.images,
            "superseded_rows": self.superseded_rows,
            "failed": self.failed,
            "ok": self.ok,
            "gt_images": self.gt_images,
            "matched": self.matched,
            "unmatched_predictions": len(self.unmatched_predictions),
            "gt_without_prediction": len(self.gt_without_prediction),
        }


class BatchOutput:
    """The rows of one `m2f segment` OUTPUT, one per image, read file by file.

    The constructor reads only `image_uri`, `status`, `processed_at`, `run_id` and `task` of every
    file to choose each image's row; `ok_rows` then decodes the chosen ok rows a few at a time, so
    memory holds one small batch of rows plus one (file, row) pair per image.
    """

    def __init__(self, uri: str, options: dict[str, Any]) -> None:
        self.uri = uri
        self.fs, self.root = open_fs(uri, options)
        self.files = _list_part_files(self.fs, self.root, uri)
        self.counts = MatchCounts(prediction_files=len(self.files))
        best: dict[str, tuple[bool, int, int, int]] = {}  # image_uri -> (ok, processed_at, file, row)
        origin: dict[str, tuple[str, str]] = {}  # image_uri -> (run_id, task) of its best row
        for f, path in enumerate(self.files):
            with self.fs.open(path, "rb") as handle:
                parquet = pq.ParquetFile(handle)
                _check_columns(parquet, path)
                table = parquet.read(columns=list(_SELECT_COLUMNS))
            uris = table.column("image_uri").to_pylist()
            statuses = table.column("status").to_pylist()
            stamps = table.column("processed_at").cast("int64").to_pylist()  # microseconds since the epoch
            runs = zip(table.column("run_id").to_pylist(), table.column("task").to_pylist(), strict=True)
            for r, (image_uri, status, stamp, run) in enumerate(zip(uris, statuses, stamps, runs, strict=True)):
                if not image_uri or stamp is None:
                    raise BadInput(f"{path}: row {r} has no image_uri or processed_at; not `m2f segment` output")
                rank = (status == STATUS_OK, stamp, f, r)  # ok beats error, then the latest, then the last written
                if image_uri not in best or rank > best[image_uri]:
                    best[image_uri] = rank
                    origin[image_uri] = (run[0] or "", run[1] or "")
            self.counts.rows += len(uris)
        self._chosen: dict[int, set[int]] = {}
        self._origins: Counter[tuple[str, str]] = Counter()  # (run_id, task) -> chosen ok rows
        for image_uri, (ok, _, f, r) in best.items():
            if ok:
                self._chosen.setdefault(f, set()).add(r)
                self._origins[origin[image_uri]] += 1
        self.counts.images = len(best)
        self.counts.ok = sum(len(rows) for rows in self._chosen.values())
        self.counts.failed = self.counts.images - self.counts.ok
        self.counts.superseded_rows = self.counts.rows - self.counts.images

    def runs(self) -> list[RunInfo]:
        """The (run, task) pairs behind the chosen ok rows, most images first, with their score thresholds."""
        thresholds = {run_id: self._score_threshold(run_id) for run_id, _ in self._origins}
        return [
            RunInfo(run_id, task, images, thresholds[run_id])
            for (run_id, task), images in sorted(self._origins.items(), key=lambda item: (-item[1], item[0]))
        ]

    def _score_threshold(self, run_id: str) -> float | None:
        """`config.score_threshold` of `_runs/<run_id>.json`; None when it cannot be read.

        The report only explains the rows, so a missing or unreadable one (Parquet files copied
        without `_runs/`) is no error: the threshold is simply unknown.
        """
        if not run_id or "/" in run_id or run_id.startswith("."):
            return None
        path = run_file(self.root, run_id, ".json")
        try:
            with self.fs.open(path, "rb") as f:
                report = json.load(f)
            value = report["config"]["score_threshold"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None

    def ok_rows(self) -> Iterator[dict[str, Any]]:
        """The chosen ok row of every image: {image_uri, image_id, status, width, height, segments}."""
        for f, path in enumerate(self.files):
            chosen = self._chosen.get(f)
            if not chosen:
                continue
            with self.fs.open(path, "rb") as handle:
                offset = 0
                for batch in pq.ParquetFile(handle).iter_batches(batch_size=BATCH_ROWS, columns=list(_READ_COLUMNS)):
                    take = [i for i in range(batch.num_rows) if offset + i in chosen]
                    offset += batch.num_rows
                    if take:
                        yield from batch.take(take).to_pylist()


def _list_part_files(fs: AbstractFileSystem, root: str, uri: str) -> list[str]:
    """The part files directly under `root` (pipeline/output.py says which names those are)."""
    fs.invalidate_cache(root)  # object stores cache listings; a run may have finished since
    if not fs.exists(root):
        raise BadInput(f"predictions not found: {uri}")
    if not fs.isdir(root):
        raise BadInput(f"predictions must be the OUTPUT folder of `m2f segment`, got a file: {uri}")
    files = list_part_files(fs, root)
    if not files:
        raise BadInput(f"no part-*.parquet files directly under {uri}; is it the OUTPUT of `m2f segment`?")
    return files


def _check_columns(parquet: pq.ParquetFile, path: str) -> None:
    missing = [c for c in dict.fromkeys(_SELECT_COLUMNS + _READ_COLUMNS) if c not in parquet.schema_arrow.names]
    if missing:
        raise BadInput(f"{path} lacks the columns {missing}; not `m2f segment` output")


def _basename(path: str) -> str:
    return str(path).rstrip("/").rsplit("/", 1)[-1]


def _stem(path: str) -> str:
    return posixpath.splitext(_basename(path))[0]


def _matched(
    rows: Iterator[dict[str, Any]],
    gt_keys: Mapping[str, Any],
    key: Callable[[str], str],
    counts: MatchCounts,
    source: str,
) -> Iterator[tuple[Any, dict[str, Any]]]:
    """(GT entry, row) for every row whose name is in `gt_keys`; counts both sides as it goes.

    After the iterator is exhausted `counts` lists the unmatched predictions and the GT keys
    nothing matched. Two predicted images with the same name (s3://a/x.jpg, s3://b/x.jpg) would
    be scored against one GT image, so that is an error rather than a silent choice. So is a run
    that matches nothing at all (the wrong GT, or a different naming), before any GT is scored.
    """
    seen: dict[str, str] = {}
    counts.gt_images = len(gt_keys)
    for row in rows:
        name = key(row["image_uri"])
        if name not in gt_keys:
            counts.unmatched_predictions.append(row["image_uri"])
            continue
        if name in seen:
            raise BadInput(
                f"predicted images {seen[name]} and {row['image_uri']} share the name {name!r}; "
                "cannot match them to the ground truth by file name"
            )
        seen[name] = row["image_uri"]
        counts.matched += 1
        yield gt_keys[name], row
    if not seen:
        example = f" (e.g. {_basename(counts.unmatched_predictions[0])})" if counts.unmatched_predictions else ""
        raise BadInput(f"no predicted image ({counts.ok} ok){example} has a file name listed in {source}")
    counts.gt_without_prediction = sorted(set(gt_keys) - set(seen))


# ---------------------------------------------------------------------------------------------
# Ground truth
# ---------------------------------------------------------------------------------------------


def _read_json(uri: str, options: dict[str, Any], what: str) -> Any:
    fs, path = open_fs(uri, options)
    if not fs.isfile(path):
        raise BadInput(f"{what} not found: {uri}")
    with fs.open(path, "rb") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise BadInput(f"{what} {uri} is not valid JSON: {e.msg} at line {e.lineno}") from None


def _require(data: Any, keys: Sequence[str], uri: str, what: str) -> None:
    if not isinstance(data, dict) or any(not isinstance(data.get(k), list) for k in keys):
        raise BadInput(f"{uri} is not a {what} JSON: it needs the lists {list(keys)}")


def _read_png(fs: AbstractFileSystem, path: str) -> Image.Image:
    with fs.open(path, "rb") as f, Image.open(f) as image:
        image.load()
        return image


def _check_size(row: Mapping[str, Any], height: int, width: int, gt_name: str) -> None:
    size = (row.get("height"), row.get("width"))
    if size != (height, width):
        raise BadInput(
            f"{row['image_uri']} was segmented at {size[1]}x{size[0]} but its ground truth {gt_name} "
            f"is {width}x{height} (width x height)"
        )


# ---------------------------------------------------------------------------------------------
# The three metrics
# ---------------------------------------------------------------------------------------------


def _instances_ap(config: EvaluateConfig, predictions: BatchOutput, options: dict[str, Any]) -> dict[str, Any]:
    """COCO mask AP of every matched row against a COCO instances JSON."""
    gt = _read_json(config.ground_truth, options, "ground truth")
    _require(gt, ("images", "annotations", "categories"), config.ground_truth, "COCO instances")
    if any("segmentation" not in a for a in gt["annotations"]):
        raise BadInput(f"{config.ground_truth}: annotations have no 'segmentation'; not a COCO instances JSON")
    ids = image_ids_by_file_name(gt)
    categories = {int(c["id"]): int(c["id"]) for c in gt["categories"]}
    dropped = 0

    def rows() -> Iterator[dict[str, Any]]:
        nonlocal dropped
        for _, row in _matched(predictions.ok_rows(), ids, _basename, predictions.counts, config.ground_truth):
            dropped += sum(int(s["category_id"]) not in categories for s in row["segments"] or [])
            yield row

    results, _ = to_coco_results(rows(), ids, category_map=categories)
    summary = coco_mask_ap(gt, results)
    summary["segments_outside_gt_categories"] = dropped
    return summary


def _panoptic_pq(config: EvaluateConfig, predictions: BatchOutput, options: dict[str, Any]) -> dict[str, Any]:
    """PQ / SQ / RQ of every GT image (matched or scored as empty) against COCO panoptic PNGs."""
    gt = _read_json(config.ground_truth, options, "ground truth")
    _require(gt, ("images", "annotations", "categories"), config.ground_truth, "COCO panoptic")
    if any("segments_info" not in a for a in gt["annotations"]):
        raise BadInput(f"{config.ground_truth}: annotations have no 'segments_info'; not a COCO panoptic JSON")
    masks_uri = config.masks or posixpath.splitext(config.ground_truth.rstrip("/"))[0]
    fs, masks_dir = open_fs(masks_uri, storage_options(masks_uri, config.endpoint_url, config.storage_options_json))
    if not fs.isdir(masks_dir):
        raise BadInput(f"panoptic PNG folder not found: {masks_uri} (set it with --masks)")

    annotations = {a["image_id"]: a for a in gt["annotations"]}
    entries = {}  # basename of the image file -> (image, annotation); images without annotation have no GT
    for image in gt["images"]:
        if image["id"] in annotations:
            name = _basename(image["file_name"])
            if name in entries:
                raise BadInput(f"{config.ground_truth}: two images are named {name!r}; cannot match by file name")
            entries[name] = (image, annotations[image["id"]])

    def load_gt(image: Mapping[str, Any], annotation: Mapping[str, Any]) -> np.ndarray:
        path = posixpath.join(masks_dir, annotation["file_name"])
        if not fs.isfile(path):
            raise BadInput(f"panoptic PNG not found: {path} (for image {image['file_name']})")
        rgb = np.asarray(_read_png(fs, path).convert("RGB"), dtype=np.uint32)  # (H, W, 3)
        if rgb.shape[:2] != (image["height"], image["width"]):
            raise BadInput(f"{path} is {rgb.shape[1]}x{rgb.shape[0]}, its image {image['width']}x{image['height']}")
        return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]  # (H, W) segment ids, 0 = void

    accumulator = PQAccumulator()
    for (image, annotation), row in _matched(
        predictions.ok_rows(), entries, _basename, predictions.counts, config.ground_truth
    ):
        gt_map = load_gt(image, annotation)
        _check_size(row, *gt_map.shape, annotation["file_name"])
        segments = [s | {"id": s["id"] or k} for k, s in enumerate(row["segments"] or [], start=1)]
        pred_map = segments_to_id_map(segments, *gt_map.shape)
        pred_infos = [{"id": s["id"], "category_id": s["category_id"]} for s in segments]
        accumulator.add(pred_map, pred_infos, gt_map, annotation["segments_info"])
    for name in predictions.counts.gt_without_prediction:
        image, annotation = entries[name]
        gt_map = load_gt(image, annotation)
        accumulator.add(np.zeros_like(gt_map), [], gt_map, annotation["segments_info"])
    return accumulator.summary(gt["categories"])


def _semantic_categories(config: EvaluateConfig) -> tuple[list[dict[str, Any]], str]:
    """The class list for semantic masks (sorted by id) and the JSON it came from."""
    if config.categories:
        candidates = [config.categories]
    else:
        candidates = [_resolve(config.ground_truth, name) for name in SEMANTIC_CATEGORY_FILES]
    for uri in candidates:
        options = storage_options(uri, config.endpoint_url, config.storage_options_json)
        fs, path = open_fs(uri, options)
        if not fs.isfile(path):
            continue
        data = _read_json(uri, options, "categories")
        categories = data.get("categories") if isinstance(data, dict) else data
        if not isinstance(categories, list) or not categories:
            raise BadInput(f"{uri} has no 'categories' list for the semantic classes")
        if any(not isinstance(c, dict) or "id" not in c for c in categories):
            raise BadInput(f"{uri}: every category needs an 'id'")
        ordered = sorted(categories, key=lambda c: int(c["id"]))
        if len({int(c["id"]) for c in ordered}) != len(ordered):
            raise BadInput(f"{uri} repeats a category id")
        return ordered, uri
    raise BadInput(f"no class list for the semantic masks: none of {candidates} exists")


def _resolve(folder: str, relative: str) -> str:
    """`relative` (may start with ../) against the folder URI `folder`, keeping its protocol."""
    protocol, sep, rest = folder.rstrip("/").rpartition("://")
    return f"{protocol}{sep}{posixpath.normpath(posixpath.join(rest, relative))}"


def _semantic_miou(config: EvaluateConfig, predictions: BatchOutput, options: dict[str, Any]) -> dict[str, Any]:
    """mIoU of every GT mask (matched or scored as unlabelled) from one confusion matrix."""
    categories, source = _semantic_categories(config)
    if len(categories) >= IGNORE:
        raise BadInput(f"{source} lists {len(categories)} classes; at most {IGNORE - 1} fit beside ignore = {IGNORE}")
    index = {int(c["id"]): k for k, c in enumerate(categories)}
    fs, folder = open_fs(config.ground_truth, options)
    if not fs.isdir(folder):
        raise BadInput(f"semantic mask folder not found: {config.ground_truth}")
    labels: dict[str, str] = {}
    for path in fs.ls(folder, detail=False):
        if path.lower().endswith(".png") and not _basename(path).startswith("."):
            if _stem(path) in labels:
                raise BadInput(f"{config.ground_truth}: two masks share the stem {_stem(path)!r}")
            labels[_stem(path)] = path
    if not labels:
        raise BadInput(f"no PNG masks in {config.ground_truth}")

    def load_gt(path: str) -> np.ndarray:
        image = _read_png(fs, path)
        if image.mode not in ("L", "P", "I", "I;16"):
            raise BadInput(f"{path}: a semantic mask must be a single-channel PNG (L, P or I), got mode {image.mode}")
        return np.asarray(image).astype(np.int64)  # (H, W) class indices, palette PNGs as indices

    matrix = ConfusionMatrix(len(categories), ignore_index=IGNORE)
    for path, row in _matched(predictions.ok_rows(), labels, _stem, predictions.counts, config.ground_truth):
        gt = load_gt(path)
        _check_size(row, *gt.shape, path)
        matrix.add(_class_map(row, gt.shape, index, source), gt)
    for stem in predictions.counts.gt_without_prediction:
        gt = load_gt(labels[stem])
        matrix.add(np.full_like(gt, IGNORE), gt)
    return matrix.summary([str(c.get("name", c["id"])) for c in categories])


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


_METRICS = {"coco-instances": _instances_ap, "coco-panoptic": _panoptic_pq, "semantic": _semantic_miou}


# ---------------------------------------------------------------------------------------------
# Does the run fit the metric?
# ---------------------------------------------------------------------------------------------

# (GT format, run task) -> what the metric means for such predictions. Pairs not listed fit:
# each format's own task, and panoptic segments for mIoU (they partition the image like semantic).
TASK_MISMATCH = {
    ("coco-instances", "semantic"): "a semantic segment is every pixel of one class, not an instance, so mask AP of "
    "semantic segments is not instance AP (segment with --task instance, or score them with --gt-format "
    "semantic or coco-panoptic)",
    ("coco-instances", "panoptic"): "panoptic segments do not overlap and passed the panoptic score filter, so their "
    "mask AP is lower than that of instance output; segment with --task instance for the AP detectron2 and COCO "
    "report",
    ("coco-panoptic", "instance"): "instance masks overlap (the higher score keeps each pixel) and hold no stuff, "
    "so PQ Stuff counts every stuff segment as missed",
    ("coco-panoptic", "semantic"): "a semantic segment merges every instance of its class, so PQ Things is not "
    "panoptic PQ (PQ Stuff is)",
    ("semantic", "instance"): "instance masks hold no stuff and overlap (the higher score keeps each pixel), so "
    "mIoU counts stuff pixels as unlabelled",
}
REFUSED = {("coco-instances", "semantic")}  # no meaningful number remains: exit 2 in `m2f evaluate`
TASKS = ("semantic", "instance", "panoptic")


def task_findings(gt_format: str, runs: Sequence[RunInfo]) -> tuple[list[str], str | None]:
    """Warnings about runs whose task or score threshold biases `gt_format`'s metric, and a refusal.

    Returns (warnings, refusal): `refusal` is the message of a pair in REFUSED, else None.
    """
    by_task: dict[str, list[RunInfo]] = {}
    for info in runs:
        by_task.setdefault(info.task, []).append(info)
    warnings, refusal = [], None
    for task, infos in sorted(by_task.items()):
        images = sum(i.images for i in infos)
        names = ", ".join(i.run_id or "?" for i in infos[:_EXAMPLES])
        source = f"{images} predicted images come from {task or 'no'} run(s) {names}"
        if task not in TASKS:
            warnings.append(f"{source}, a task this evaluation does not know; the metric may not fit them")
        elif (gt_format, task) in TASK_MISMATCH:
            message = f"{source}: {TASK_MISMATCH[gt_format, task]}"
            if (gt_format, task) in REFUSED:
                refusal = refusal or message
            else:
                warnings.append(message)
    if gt_format == "coco-instances":
        for info in runs:
            if info.score_threshold and info.score_threshold > 0:
                warnings.append(
                    f"run {info.run_id} ({info.images} images) kept only segments scoring >= {info.score_threshold:g} "
                    "(--score-threshold): mask AP ranks all detections, up to 100 per image, so the threshold "
                    "lowers AP; segment with --score-threshold 0 for an AP comparable with COCO's"
                )
    return warnings, refusal


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------


def run(config: EvaluateConfig) -> int:
    """Evaluate, print a table (and write JSON with `json_out`); 0 on success, 2 on bad input.

    With `json_out="-"` the table and warnings go to stderr and stdout holds only the JSON, in one
    line; anything a library prints on stdout meanwhile is sent to stderr too.
    """
    to_stdout = config.json_out == STDOUT
    human = sys.stderr if to_stdout else sys.stdout
    try:
        with contextlib.redirect_stdout(human):
            report = evaluate(config)
        if config.json_out and not to_stdout:
            _write_json(config.json_out, report, config.endpoint_url, config.storage_options_json)
    except _USER_ERRORS as e:
        _error(e)
        return EXIT_BAD_INPUT
    for warning in report["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    _print_report(report, human)
    if to_stdout:
        print(json.dumps(report, default=_json_scalar), flush=True)
    elif config.json_out:
        print(f"metrics written to {config.json_out}")
    return EXIT_OK


def evaluate(config: EvaluateConfig) -> dict[str, Any]:
    """The report `run` prints: {gt_format, predictions, ground_truth, images, runs, warnings, metrics}.

    `images` counts both sides of the match; `runs` lists the runs behind the chosen rows (`RunInfo`);
    `warnings` are one-line messages about unmatched images and runs that do not fit the metric.

    Raises:
        BadInput (a ValueError), OSError, KeyError: on input that cannot be evaluated.
    """
    if config.gt_format not in _METRICS:
        raise BadInput(f"unknown ground-truth format {config.gt_format!r}; choose one of {list(GT_FORMATS)}")
    if config.masks and config.gt_format != "coco-panoptic":
        raise BadInput(f"--masks applies to coco-panoptic only, not to {config.gt_format}")
    if config.categories and config.gt_format != "semantic":
        raise BadInput(f"a categories JSON applies to semantic masks only, not to {config.gt_format}")
    predictions = _open_predictions(config.predictions, config.endpoint_url, config.storage_options_json)
    runs = predictions.runs()
    warnings, refusal = task_findings(config.gt_format, runs)
    if refusal:
        raise BadInput(f"{refusal}; not scored against {config.gt_format} ground truth")
    gt_options = storage_options(config.ground_truth, config.endpoint_url, config.storage_options_json)
    metrics = _METRICS[config.gt_format](config, predictions, gt_options)
    counts = predictions.counts
    return {
        "gt_format": config.gt_format,
        "predictions": config.predictions,
        "ground_truth": config.ground_truth,
        "images": counts.as_dict(),
        "runs": [asdict(info) for info in runs],
        "warnings": _unmatched_warnings(counts) + warnings,
        "metrics": metrics,
    }


# ---------------------------------------------------------------------------------------------
# export-coco
# ---------------------------------------------------------------------------------------------


def export_coco(
    predictions: str,
    results: str,
    ground_truth: str | None = None,
    endpoint_url: str | None = None,
    storage_options_json: str | None = None,
    result_format: str = "instances",
) -> int:
    """Write every image's chosen ok row in a COCO predictions format; 0 on success, 2 on bad input.

    `result_format`:
    - "instances": COCO results JSON [{image_id, category_id, segmentation: {size, counts: str},
      score}], one per thing segment; stuff segments (`is_thing` false) are left out, since
      instance results and COCOeval know things only.
    - "panoptic": COCO panoptic predictions, as panopticapi's `pq_compute` reads them: `results`
      (it must end in .json) holds {"images", "annotations": [{image_id, file_name, segments_info:
      [{id, category_id, iscrowd, isthing, area, bbox, score}]}], "categories"}, and the folder
      beside it named by its stem holds one RGB PNG per image, segment id = R + 256 G + 256^2 B
      (0 = no segment). Overlapping masks are resolved as `m2f evaluate` does (the earlier,
      higher-scoring segment keeps the pixel); segments left with no pixel are not listed.

    With `ground_truth` (a COCO JSON) image ids are that JSON's, matched by file name; rows of
    images it does not list are skipped and counted. In panoptic format, GT images without an ok
    prediction get an empty annotation (an all-zero PNG), since `pq_compute` needs one per GT image.
    Without it, image_id = `stable_image_id` (52 bits, so any JSON reader keeps it exactly).
    """
    try:
        if result_format not in EXPORT_FORMATS:
            raise BadInput(f"--format must be one of {list(EXPORT_FORMATS)}, got {result_format!r}")
        if result_format == "panoptic" and not results.endswith(".json"):
            raise BadInput(
                f"--format panoptic writes its PNGs beside the JSON: RESULTS must end in .json, got {results}"
            )
        batch = _open_predictions(predictions, endpoint_url, storage_options_json)
        gt = None
        if ground_truth:
            gt = _read_json(ground_truth, storage_options(ground_truth, endpoint_url, storage_options_json), "--gt")
            _require(gt, ("images",), ground_truth, "COCO")
        warnings, refusal = task_findings(f"coco-{result_format}", batch.runs())
        for warning in warnings + ([refusal] if refusal else []):
            print(f"warning: {warning}", file=sys.stderr)
        rows = _export_rows(batch, gt, ground_truth)
        if result_format == "instances":
            out, stuff = _instance_results(rows)
            _write_json(results, out, endpoint_url, storage_options_json)
            lines = [f"wrote {len(out)} results from {_exported(batch, gt)} images to {results}"]
            if stuff:
                lines.append(f"{stuff} stuff segments (is_thing false) left out: instance results hold things only")
        else:
            folder = results[: -len(".json")]
            options = storage_options(folder, endpoint_url, storage_options_json)
            document, empty = _write_panoptic(rows, batch.counts, gt, ground_truth, folder, options)
            _write_json(results, document, endpoint_url, storage_options_json)
            segments = sum(len(a["segments_info"]) for a in document["annotations"])
            lines = [
                f"wrote {len(document['annotations'])} panoptic annotations ({segments} segments) to {results}, "
                f"their PNGs to {folder}/"
            ]
            if empty:
                lines.append(f"{empty} ground-truth images have no ok prediction: written as empty (all void)")
    except _USER_ERRORS as e:
        _error(e)
        return EXIT_BAD_INPUT
    counts = batch.counts
    if counts.failed:
        lines.append(f"{counts.failed} images failed in the batch run (error rows only) and have no results")
    if ground_truth:
        lines.append(f"{len(counts.unmatched_predictions)} images skipped: their file name is not in {ground_truth}")
    else:
        lines.append(
            f"image_id = int(first {STABLE_ID_HEX} hex digits of the batch output's image_id), below 2**52 so "
            "JSON readers keep it exact; pass --gt to use a COCO JSON's"
        )
    print("\n".join(lines))
    return EXIT_OK


def stable_image_id(image_id: str) -> int:
    """The integer COCO image id of a batch-output `image_id` (16 hex digits) without a GT JSON.

    The first 13 hex digits (52 bits) as an int: stable across runs, and below 2**53, the largest
    range in which a JSON reader that parses numbers as doubles (JavaScript, jq) keeps integers
    exact. Two images in one export whose ids share 52 bits are reported, not merged.
    """
    try:
        if len(image_id) < STABLE_ID_HEX:
            raise ValueError
        return int(image_id[:STABLE_ID_HEX], 16)
    except (TypeError, ValueError):
        raise BadInput(f"image_id {image_id!r} is not hexadecimal; not `m2f segment` output") from None


def _exported(batch: BatchOutput, gt: Mapping[str, Any] | None) -> int:
    return batch.counts.matched if gt is not None else batch.counts.ok


def _gt_images(gt: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Basename of file_name -> image entry of a COCO JSON."""
    return {_basename(image["file_name"]): image for image in gt["images"]}


def _export_rows(
    batch: BatchOutput, gt: Mapping[str, Any] | None, ground_truth: str | None
) -> Iterator[tuple[int, str, dict[str, Any]]]:
    """(COCO image id, image file name, row) of every row to export, GT's ids or `stable_image_id`.

    With a GT the file name is the GT's, and rows whose size differs from the GT image's are refused.
    """
    if gt is not None:
        images = _gt_images(gt)
        ids = image_ids_by_file_name(gt)
        for image_id, row in _matched(batch.ok_rows(), ids, _basename, batch.counts, str(ground_truth)):
            image = images[_basename(row["image_uri"])]
            if "height" in image and "width" in image:
                _check_size(row, int(image["height"]), int(image["width"]), image["file_name"])
            yield image_id, image["file_name"], row
        return
    seen: dict[int, str] = {}
    for row in batch.ok_rows():
        image_id = stable_image_id(row["image_id"])
        if image_id in seen:
            raise BadInput(
                f"{seen[image_id]} and {row['image_uri']} share the first {STABLE_ID_HEX} hex digits of their "
                "image_id, so they would share a COCO image id; pass --gt to use a COCO JSON's ids"
            )
        seen[image_id] = row["image_uri"]
        yield image_id, _basename(row["image_uri"]), row


def _instance_results(rows: Iterable[tuple[int, str, dict[str, Any]]]) -> tuple[list[dict[str, Any]], int]:
    """COCO results of the thing segments of `rows`, and how many stuff segments were left out."""
    out: list[dict[str, Any]] = []
    stuff = 0
    for image_id, _, row in rows:
        segments = row["segments"] or []
        things = [s for s in segments if s.get("is_thing") is not False]  # unknown (null) counts as a thing
        stuff += len(segments) - len(things)
        out += to_coco_results([row | {"segments": things}], {_basename(row["image_uri"]): image_id}).results
    return out, stuff


def _write_panoptic(
    rows: Iterable[tuple[int, str, dict[str, Any]]],
    counts: MatchCounts,
    gt: Mapping[str, Any] | None,
    ground_truth: str | None,
    folder: str,
    options: dict[str, Any],
) -> tuple[dict[str, Any], int]:
    """Write one panoptic PNG per row under `folder`; returns the panoptic JSON and the empty GT images.

    With a GT its categories are the JSON's (a segment of another category is refused, as
    `pq_compute` would refuse it) and every GT image without a row gets an empty annotation.
    Without one the categories are those the segments name, with their labels and is_thing.
    """
    fs, root = open_fs(folder, options)
    gt_categories = gt.get("categories") if gt is not None else None
    known = {int(c["id"]) for c in gt_categories} if isinstance(gt_categories, list) else None
    categories: dict[int, dict[str, Any]] = {}
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    pngs: dict[str, str] = {}  # PNG name -> image file name: two images must not share a PNG

    def add(image_id: int, file_name: str, id_map: np.ndarray, segments: Sequence[Mapping[str, Any]]) -> None:
        png = _stem(file_name) + ".png"
        if png in pngs:
            raise BadInput(f"images {pngs[png]} and {file_name} would share the panoptic PNG {png}")
        pngs[png] = file_name
        write_atomic(fs, posixpath.join(root, png), _id_png(id_map))
        height, width = id_map.shape
        images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
        annotations.append({"image_id": image_id, "file_name": png, "segments_info": _segments_info(id_map, segments)})

    for image_id, file_name, row in rows:
        segments = [s | {"id": s["id"] or k} for k, s in enumerate(row["segments"] or [], start=1)]
        ids = [int(s["id"]) for s in segments]
        if len(set(ids)) != len(ids) or any(not 0 < i <= PANOPTIC_MAX_ID for i in ids):
            raise BadInput(f"{row['image_uri']}: segment ids {ids} are not distinct ids in 1..{PANOPTIC_MAX_ID}")
        unknown = sorted({int(s["category_id"]) for s in segments} - known) if known is not None else []
        if unknown:
            raise BadInput(f"{row['image_uri']}: category ids {unknown} are not among the categories of {ground_truth}")
        for s in segments:
            category_id = int(s["category_id"])
            name = s.get("label") or str(category_id)
            categories.setdefault(
                category_id, {"id": category_id, "name": name, "isthing": int(bool(s.get("is_thing")))}
            )
        add(image_id, file_name, segments_to_id_map(segments, int(row["height"]), int(row["width"])), segments)

    empty = 0
    if gt is not None:
        images_by_name = _gt_images(gt)
        for name in counts.gt_without_prediction:
            image = images_by_name[name]
            if "height" not in image or "width" not in image:
                raise BadInput(f"{ground_truth}: image {image['file_name']} has no height and width")
            add(
                int(image["id"]),
                image["file_name"],
                np.zeros((int(image["height"]), int(image["width"])), np.int32),
                [],
            )
            empty += 1
    listed = list(gt_categories) if known is not None else sorted(categories.values(), key=lambda c: c["id"])
    return {"images": images, "annotations": annotations, "categories": listed}, empty


def _segments_info(id_map: np.ndarray, segments: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """COCO panoptic segments_info of the segments visible in `id_map` (H, W), with their area and bbox."""
    infos = []
    for s in segments:
        ys, xs = np.nonzero(id_map == s["id"])
        if ys.size == 0:
            continue  # hidden by earlier segments: pq_compute refuses ids listed but not in the PNG
        x, y = int(xs.min()), int(ys.min())
        infos.append(
            {
                "id": int(s["id"]),
                "category_id": int(s["category_id"]),
                "iscrowd": 0,
                "isthing": bool(s.get("is_thing")),
                "area": int(ys.size),
                "bbox": [x, y, int(xs.max()) - x + 1, int(ys.max()) - y + 1],
                "score": None if s.get("score") is None else float(s["score"]),
            }
        )
    return infos


def _id_png(id_map: np.ndarray) -> bytes:
    """An (H, W) segment id map as RGB PNG bytes, id = R + 256 G + 256^2 B."""
    rgb = np.stack([(id_map >> shift) & 255 for shift in (0, 8, 16)], axis=-1).astype(np.uint8)  # (H, W, 3)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def _open_predictions(uri: str, endpoint_url: str | None, storage_options_json: str | None) -> BatchOutput:
    return BatchOutput(uri, storage_options(uri, endpoint_url, storage_options_json))


def _write_json(uri: str, data: Any, endpoint_url: str | None, storage_options_json: str | None) -> None:
    fs, path = open_fs(uri, storage_options(uri, endpoint_url, storage_options_json))
    write_atomic(fs, path, json.dumps(data, default=_json_scalar) + "\n")


def _json_scalar(value: Any) -> Any:
    """numpy scalars (COCOeval's category ids are np.int64) as plain Python numbers."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


# Errors that mean "this input cannot be evaluated": reported in one line, exit code 2.
_USER_ERRORS = (ValueError, KeyError, OSError)


def _error(e: BaseException) -> None:
    if isinstance(e, KeyError):
        message = f"malformed input: a record lacks the field {e}"
    elif isinstance(e, FileNotFoundError):
        message = f"not found: {e.filename or e}"
    else:
        message = str(e) or type(e).__name__
    print(f"error: {message}", file=sys.stderr)


def _print_report(report: Mapping[str, Any], out: Any) -> None:
    counts = report["images"]
    print(
        f"{counts['matched']} of {counts['gt_images']} ground-truth images have a prediction "
        f"({counts['ok']} predicted ok, {counts['failed']} failed, {counts['superseded_rows']} superseded rows, "
        f"{counts['unmatched_predictions']} not in the ground truth)",
        file=out,
    )
    print(file=out)
    print(format_table(report["metrics"]), file=out)


def _unmatched_warnings(counts: MatchCounts) -> list[str]:
    warnings = []
    if counts.unmatched_predictions:
        names = ", ".join(_basename(u) for u in counts.unmatched_predictions[:_EXAMPLES])
        warnings.append(f"{len(counts.unmatched_predictions)} predicted images are not in the ground truth: {names}")
    if counts.gt_without_prediction:
        names = ", ".join(counts.gt_without_prediction[:_EXAMPLES])
        warnings.append(
            f"{len(counts.gt_without_prediction)} ground-truth images have no ok prediction and count as empty: {names}"
        )
    return warnings
