"""Evaluation metrics: panoptic quality, semantic mIoU and COCO mask AP.

Pure functions and small accumulators over numpy arrays and plain dicts. `m2f evaluate` streams
images through them one at a time, so memory stays flat however large the set, and each metric
can be checked on its own against a slow reference in the tests. Nothing here reads files or
knows about Ray or Parquet: the caller decodes the batch output and the ground truth.

- Panoptic quality follows Kirillov et al. (2019) exactly as COCO panopticapi's ``pq_compute``.
- mIoU comes from a confusion matrix accumulated over the whole set (not a mean of per-image IoUs).
- Mask AP is pycocotools' ``COCOeval`` with ``iouType="segm"``, untouched, so its numbers equal
  those of any other tool that runs COCOeval on the same results.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

VOID = 0  # panoptic id of unlabelled pixels, in predictions and ground truth alike
COCO_STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


# ---------------------------------------------------------------------------------------------
# Panoptic quality
# ---------------------------------------------------------------------------------------------


@dataclass
class PQStat:
    """Running counts of one category: summed IoU of matched pairs, true/false positives, false negatives.

    Kept as raw sums rather than per-image PQ because PQ is defined over the whole set: an image
    with one small segment must not weigh as much as an image with fifty.
    """

    iou_sum: float = 0.0
    tp: int = 0
    fp: int = 0
    fn: int = 0

    def merge(self, other: PQStat) -> None:
        """Add another stat's counts into this one."""
        self.iou_sum += other.iou_sum
        self.tp += other.tp
        self.fp += other.fp
        self.fn += other.fn


def _check_id_map(name: str, id_map: np.ndarray) -> np.ndarray:
    id_map = np.asarray(id_map)
    if id_map.ndim != 2:
        raise ValueError(f"{name} must be an (H, W) id map, got shape {id_map.shape}")
    if not np.issubdtype(id_map.dtype, np.integer):
        raise ValueError(f"{name} must hold integer segment ids, got dtype {id_map.dtype}")
    return id_map


def _segment_table(name: str, segments: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Validate segment infos: each has an id (not the void id 0, not repeated) and a category_id."""
    table = list(segments)
    seen: set[int] = set()
    for seg in table:
        if "id" not in seg or "category_id" not in seg:
            raise ValueError(f"every entry of {name} needs 'id' and 'category_id', got {dict(seg)}")
        seg_id = int(seg["id"])
        if seg_id == VOID:
            raise ValueError(f"{name} uses id {VOID}, which is reserved for void (unlabelled) pixels")
        if seg_id in seen:
            raise ValueError(f"{name} repeats segment id {seg_id}")
        seen.add(seg_id)
    return table


def _relabel(id_map: np.ndarray, ids: Sequence[int]) -> tuple[np.ndarray, list[int]]:
    """Map segment ids to 1..N in the order of `ids` and every other value to 0.

    Compact labels keep the joint (gt, pred) histogram small whatever the raw ids are (COCO
    panoptic ids go up to 256**3), and make "not a known segment" a single label.
    Returns the relabelled map and the raw ids found in the map that `ids` does not list.
    """
    uniq, inverse = np.unique(id_map, return_inverse=True)
    position = {seg_id: i + 1 for i, seg_id in enumerate(ids)}
    lut = np.array([position.get(int(u), 0) for u in uniq], dtype=np.int64)
    unknown = [int(u) for u in uniq if int(u) != VOID and int(u) not in position]
    return lut[inverse].reshape(id_map.shape), unknown


def panoptic_image_stats(
    pred_map: np.ndarray,
    pred_segments: Iterable[Mapping[str, Any]],
    gt_map: np.ndarray,
    gt_segments: Iterable[Mapping[str, Any]],
) -> dict[int, PQStat]:
    """Per-category PQ counts of one image (the standard definition of COCO panopticapi).

    Args:
        pred_map: (H, W) int, predicted segment id per pixel; 0 = no prediction.
        pred_segments: [{id, category_id}] for the ids in `pred_map`.
        gt_map: (H, W) int, ground-truth segment id per pixel. 0, and any id missing from
            `gt_segments`, is void: it is neither matched nor counted against a prediction.
        gt_segments: [{id, category_id, iscrowd (optional, default 0)}].

    A prediction and a non-crowd GT segment of the same category match when IoU > 0.5, where the
    union leaves out the prediction's pixels on void GT (an unlabelled pixel cannot make a
    prediction wrong). IoU > 0.5 makes matches unique, so no assignment problem arises. Unmatched
    GT segments are false negatives; unmatched predictions are false positives unless more than
    half of their area lies on void or on crowd regions of their own category. Segments listed
    but with no pixel in their map are ignored (overlap resolution can hide a segment entirely).
    Unlike panopticapi, which keeps one crowd region per category, all crowd regions of a
    category count here; on COCO, which has at most one per category and image, both agree.

    Raises:
        ValueError: on shape mismatch, malformed segment infos, or predicted ids with no info.
    """
    pred_map = _check_id_map("pred_map", pred_map)
    gt_map = _check_id_map("gt_map", gt_map)
    if pred_map.shape != gt_map.shape:
        raise ValueError(f"pred_map has shape {pred_map.shape} but gt_map has shape {gt_map.shape}")
    preds = _segment_table("pred_segments", pred_segments)
    gts = _segment_table("gt_segments", gt_segments)

    pred_lab, unknown = _relabel(pred_map, [int(s["id"]) for s in preds])
    if unknown:
        raise ValueError(f"pred_map contains segment ids {unknown[:10]} that pred_segments does not describe")
    gt_lab, _ = _relabel(gt_map, [int(s["id"]) for s in gts])  # unknown GT ids are void by definition

    n_gt, n_pred = len(gts), len(preds)
    joint = gt_lab * (n_pred + 1) + pred_lab
    counts = np.bincount(joint.ravel(), minlength=(n_gt + 1) * (n_pred + 1)).reshape(n_gt + 1, n_pred + 1)
    gt_area = counts.sum(axis=1)  # (n_gt + 1,) row 0 = void
    pred_area = counts.sum(axis=0)  # (n_pred + 1,) column 0 = unpredicted
    pred_cat = [0] + [int(s["category_id"]) for s in preds]
    gt_cat = [0] + [int(s["category_id"]) for s in gts]
    gt_crowd = [False] + [bool(s.get("iscrowd", 0)) for s in gts]

    stats: dict[int, PQStat] = {}
    gt_matched = np.zeros(n_gt + 1, dtype=bool)
    pred_matched = np.zeros(n_pred + 1, dtype=bool)
    for g, p in zip(*np.nonzero(counts[1:, 1:]), strict=True):
        g, p = int(g) + 1, int(p) + 1
        if gt_crowd[g] or gt_cat[g] != pred_cat[p]:
            continue
        inter = int(counts[g, p])
        union = int(pred_area[p] + gt_area[g]) - inter - int(counts[0, p])
        iou = inter / union
        if iou > 0.5:
            stat = stats.setdefault(gt_cat[g], PQStat())
            stat.tp += 1
            stat.iou_sum += iou
            gt_matched[g] = pred_matched[p] = True

    for g in range(1, n_gt + 1):
        if gt_area[g] > 0 and not gt_matched[g] and not gt_crowd[g]:
            stats.setdefault(gt_cat[g], PQStat()).fn += 1

    for p in range(1, n_pred + 1):
        if pred_area[p] == 0 or pred_matched[p]:
            continue
        ignored = int(counts[0, p])
        ignored += sum(int(counts[g, p]) for g in range(1, n_gt + 1) if gt_crowd[g] and gt_cat[g] == pred_cat[p])
        if ignored / pred_area[p] > 0.5:
            continue
        stats.setdefault(pred_cat[p], PQStat()).fp += 1
    return stats


def _category_fields(category: Any) -> tuple[int, str, bool]:
    """(id, name, isthing) of a category given as a COCO dict or as an object with those attributes."""
    get = category.get if isinstance(category, Mapping) else lambda key, default=None: getattr(category, key, default)
    cat_id, isthing = get("id"), get("isthing")
    if cat_id is None or isthing is None:
        raise ValueError(f"a category needs 'id' and 'isthing' to split PQ into things and stuff, got {category}")
    return int(cat_id), str(get("name", cat_id)), bool(isthing)


def _pq_of(stat: PQStat) -> tuple[float, float, float]:
    denom = stat.tp + 0.5 * stat.fp + 0.5 * stat.fn
    pq = stat.iou_sum / denom
    sq = stat.iou_sum / stat.tp if stat.tp else 0.0
    rq = stat.tp / denom
    return pq, sq, rq


def _pq_average(stats: Mapping[int, PQStat], cat_ids: Iterable[int]) -> dict[str, float | int]:
    """Unweighted mean over categories that occur (tp + fp + fn > 0); zeros when none does.

    A category with no true positive contributes SQ = 0, as in panopticapi, so that the
    identity PQ = SQ x RQ holds per class though not for the averages.
    """
    totals = np.zeros(3)
    n = 0
    for cat_id in cat_ids:
        stat = stats.get(cat_id)
        if stat is None or stat.tp + stat.fp + stat.fn == 0:
            continue
        totals += _pq_of(stat)
        n += 1
    pq, sq, rq = (totals / n).tolist() if n else (0.0, 0.0, 0.0)
    return {"pq": pq, "sq": sq, "rq": rq, "n": n}


def pq_summary(stats: Mapping[int, PQStat], categories: Iterable[Any]) -> dict[str, Any]:
    """PQ, SQ and RQ averaged over All / Things / Stuff categories, plus one entry per category.

    Args:
        stats: category id -> accumulated counts.
        categories: the dataset's categories, COCO panoptic style dicts ({id, name, isthing}) or
            objects with those attributes. Categories that never occur are reported with None.

    Raises:
        ValueError: when `stats` holds a category id the list does not know, since silently
            dropping it would hide a mapping mistake between model classes and dataset ids.
    """
    fields = [_category_fields(c) for c in categories]
    known = {cat_id for cat_id, _, _ in fields}
    strays = sorted(set(stats) - known)
    if strays:
        raise ValueError(f"category ids {strays} occur in predictions or ground truth but not in categories")
    per_class = []
    for cat_id, name, isthing in fields:
        stat = stats.get(cat_id, PQStat())
        occurs = stat.tp + stat.fp + stat.fn > 0
        pq, sq, rq = _pq_of(stat) if occurs else (None, None, None)
        row = {"id": cat_id, "name": name, "isthing": isthing, "pq": pq, "sq": sq, "rq": rq}
        per_class.append(row | {"tp": stat.tp, "fp": stat.fp, "fn": stat.fn})
    return {
        "All": _pq_average(stats, [c for c, _, _ in fields]),
        "Things": _pq_average(stats, [c for c, _, thing in fields if thing]),
        "Stuff": _pq_average(stats, [c for c, _, thing in fields if not thing]),
        "per_class": per_class,
    }


class PQAccumulator:
    """Panoptic quality over a set of images, fed one image at a time."""

    def __init__(self) -> None:
        self.stats: dict[int, PQStat] = {}
        self.num_images = 0

    def add(
        self,
        pred_map: np.ndarray,
        pred_segments: Iterable[Mapping[str, Any]],
        gt_map: np.ndarray,
        gt_segments: Iterable[Mapping[str, Any]],
    ) -> None:
        """Score one image; arguments as in `panoptic_image_stats`."""
        for cat_id, stat in panoptic_image_stats(pred_map, pred_segments, gt_map, gt_segments).items():
            self.stats.setdefault(cat_id, PQStat()).merge(stat)
        self.num_images += 1

    def summary(self, categories: Iterable[Any]) -> dict[str, Any]:
        """See `pq_summary`."""
        return pq_summary(self.stats, categories)


def _decode_rle(rle: Mapping[str, Any]) -> np.ndarray:
    """(H, W) uint8 mask from a COCO RLE, compressed (str or bytes counts) or uncompressed (list)."""
    if "size" not in rle or "counts" not in rle:
        raise ValueError(f"an RLE needs 'size' and 'counts', got keys {sorted(rle)}")
    h, w = (int(v) for v in rle["size"])
    counts = rle["counts"]
    if isinstance(counts, list):
        encoded = mask_utils.frPyObjects({"size": [h, w], "counts": counts}, h, w)
    else:
        encoded = {"size": [h, w], "counts": counts.encode("ascii") if isinstance(counts, str) else bytes(counts)}
    return mask_utils.decode(encoded)


def segments_to_id_map(segments: Sequence[Mapping[str, Any]], height: int, width: int) -> np.ndarray:
    """(H, W) int32 panoptic id map painted from RLE segments, so RLE output can be scored for PQ.

    Args:
        segments: [{rle: {size, counts}, id (optional)}]; without an id a segment gets its
            1-based position in the list, the same numbering the caller should give its infos.
        height, width: image size; every RLE must have exactly this size.

    Where masks overlap, the earlier segment keeps the pixel: batch output lists segments by
    falling score, so the most confident one wins, as in Mask2Former's panoptic inference.
    Pixels that no segment covers stay 0 (void).
    """
    id_map = np.zeros((height, width), dtype=np.int32)
    taken = np.zeros((height, width), dtype=bool)
    for position, seg in enumerate(segments, start=1):
        if "rle" not in seg:
            raise ValueError(f"segment {position} has no 'rle'")
        seg_id = int(seg.get("id", position))
        if seg_id == VOID:
            raise ValueError(f"segment {position} has id {VOID}, which is reserved for void pixels")
        mask = _decode_rle(seg["rle"]).astype(bool)
        if mask.shape != (height, width):
            raise ValueError(f"segment {position} has an RLE of size {mask.shape}, expected {(height, width)}")
        paint = mask & ~taken
        id_map[paint] = seg_id
        taken |= paint
    return id_map


# ---------------------------------------------------------------------------------------------
# Semantic segmentation: mIoU
# ---------------------------------------------------------------------------------------------


class ConfusionMatrix:
    """Pixel counts of (ground-truth class, predicted class) over a set, for mIoU and accuracy.

    Rows are GT classes 0..K-1; columns are predicted classes 0..K-1 plus one last column for
    pixels the prediction leaves unlabelled (value `ignore_index`), which count as wrong. GT
    pixels equal to `ignore_index` are not evaluated at all.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        if 0 <= ignore_index < num_classes:
            raise ValueError(f"ignore_index {ignore_index} collides with class {ignore_index} of {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = np.zeros((num_classes, num_classes + 1), dtype=np.int64)  # (K, K + 1)

    def add(self, pred: np.ndarray, gt: np.ndarray) -> None:
        """Count one image: `pred` and `gt` are (H, W) integer class maps of the same shape."""
        pred, gt = np.asarray(pred), np.asarray(gt)
        if pred.shape != gt.shape:
            raise ValueError(f"pred has shape {pred.shape} but gt has shape {gt.shape}")
        for name, arr in (("pred", pred), ("gt", gt)):
            if not np.issubdtype(arr.dtype, np.integer):
                raise ValueError(f"{name} must hold integer class ids, got dtype {arr.dtype}")
        k = self.num_classes
        valid = gt != self.ignore_index
        gt_v = gt[valid].astype(np.int64)
        pred_v = pred[valid].astype(np.int64)
        bad_gt = (gt_v < 0) | (gt_v >= k)
        if bad_gt.any():
            raise ValueError(f"gt holds class ids {np.unique(gt_v[bad_gt])[:10].tolist()} outside 0..{k - 1}")
        unlabelled = pred_v == self.ignore_index
        bad_pred = ((pred_v < 0) | (pred_v >= k)) & ~unlabelled
        if bad_pred.any():
            raise ValueError(f"pred holds class ids {np.unique(pred_v[bad_pred])[:10].tolist()} outside 0..{k - 1}")
        pred_v[unlabelled] = k
        self.matrix += np.bincount(gt_v * (k + 1) + pred_v, minlength=k * (k + 1)).reshape(k, k + 1)

    def summary(self, class_names: Sequence[str] | None = None) -> dict[str, Any]:
        """mIoU, mean class accuracy, pixel accuracy and per-class IoU / accuracy.

        IoU_c = TP / (TP + FP + FN). mIoU averages over the classes that occur: those with a GT
        pixel or a prediction on an evaluated (non-ignored) pixel. A class never seen in either
        has an undefined IoU, is left out of the mean and reported as None; counting it as 0 or 1
        would reward or punish a model for classes the data does not contain. Class accuracy
        (TP / GT pixels) is averaged over classes present in the GT. Averages are 0.0 when
        nothing has been counted.
        """
        k = self.num_classes
        names = [str(c) for c in range(k)] if class_names is None else list(class_names)
        if len(names) != k:
            raise ValueError(f"got {len(names)} class names for {k} classes")
        tp = np.diag(self.matrix[:, :k]).astype(np.float64)
        gt_pixels = self.matrix.sum(axis=1).astype(np.float64)
        pred_pixels = self.matrix[:, :k].sum(axis=0).astype(np.float64)
        union = gt_pixels + pred_pixels - tp
        seen, in_gt = union > 0, gt_pixels > 0
        iou = np.divide(tp, union, out=np.zeros(k), where=seen)
        acc = np.divide(tp, gt_pixels, out=np.zeros(k), where=in_gt)
        total = gt_pixels.sum()
        per_class = [
            {
                "class": names[c],
                "iou": float(iou[c]) if seen[c] else None,
                "accuracy": float(acc[c]) if in_gt[c] else None,
            }
            for c in range(k)
        ]
        return {
            "mIoU": float(iou[seen].mean()) if seen.any() else 0.0,
            "mean_accuracy": float(acc[in_gt].mean()) if in_gt.any() else 0.0,
            "pixel_accuracy": float(tp.sum() / total) if total else 0.0,
            "per_class": per_class,
        }


# ---------------------------------------------------------------------------------------------
# COCO mask AP
# ---------------------------------------------------------------------------------------------


def _basename(path: str) -> str:
    return str(path).rstrip("/").rsplit("/", 1)[-1]


def image_ids_by_file_name(gt: Mapping[str, Any]) -> dict[str, int]:
    """Basename of each image's file_name -> image id, from a COCO json.

    Basenames, because the batch output names images by full URI (s3://bucket/val/0001.jpg)
    while COCO jsons name them relative to an image folder (0001.jpg or val/0001.jpg).
    """
    return _basename_index({img["file_name"]: img["id"] for img in gt.get("images", [])})


def _basename_index(file_name_to_image_id: Mapping[str, int]) -> dict[str, int]:
    index: dict[str, int] = {}
    for file_name, image_id in file_name_to_image_id.items():
        key = _basename(file_name)
        if key in index and index[key] != image_id:
            raise ValueError(f"file name {key!r} names two images ({index[key]} and {image_id}); cannot match by name")
        index[key] = int(image_id)
    return index


class CocoResults(NamedTuple):
    """COCO results for the matched rows, and the image_uri of every row with no match in the GT."""

    results: list[dict[str, Any]]
    unmatched: list[str]


def to_coco_results(
    rows: Iterable[Mapping[str, Any]],
    file_name_to_image_id: Mapping[str, int],
    category_map: Mapping[int, int] | None = None,
) -> CocoResults:
    """Batch-output rows -> COCO detection results ({image_id, category_id, segmentation, score}).

    Args:
        rows: [{image_uri, segments: [{category_id, score, rle: {size, counts}}]}], as read from
            the batch job's Parquet.
        file_name_to_image_id: GT file name -> image id (see `image_ids_by_file_name`). Rows match
            by basename, so directories on either side do not matter.
        category_map: model category id -> GT category id, when they differ. It also filters:
            segments of categories it does not name are dropped (stuff classes of a panoptic
            model, when scoring instance AP).

    Rows with no matching image are skipped and listed in `unmatched`, so the caller can warn
    rather than fail when it evaluates on a subset. RLE counts come out as str, ready for JSON.
    """
    index = _basename_index(file_name_to_image_id)
    results: list[dict[str, Any]] = []
    unmatched: list[str] = []
    for row in rows:
        uri = row.get("image_uri")
        if not uri:
            raise ValueError(f"a batch-output row has no image_uri (keys {sorted(row)})")
        image_id = index.get(_basename(uri))
        if image_id is None:
            unmatched.append(str(uri))
            continue
        for seg in row.get("segments") or []:
            category_id = int(seg["category_id"])
            if category_map is not None:
                if category_id not in category_map:
                    continue
                category_id = int(category_map[category_id])
            if seg.get("score") is None:
                raise ValueError(f"a segment of {uri} has no score, which COCO AP needs to rank detections")
            rle = seg["rle"]
            counts = rle["counts"]
            counts = counts.decode("ascii") if isinstance(counts, bytes) else counts
            segmentation = {"size": [int(v) for v in rle["size"]], "counts": counts}
            results.append(
                {
                    "image_id": image_id,
                    "category_id": category_id,
                    "segmentation": segmentation,
                    "score": float(seg["score"]),
                }
            )
    return CocoResults(results, unmatched)


def _coco_gt(gt: Mapping[str, Any]) -> COCO:
    """A COCO object over a shallow copy of `gt`: COCOeval writes into annotation dicts.

    Missing `iscrowd` defaults to 0 and missing `area` is computed from the mask, since
    COCOeval needs both and hand-made jsons often leave them out.
    """
    for key in ("images", "annotations", "categories"):
        if key not in gt:
            raise ValueError(f"ground truth is not a COCO instances json: it has no {key!r}")
    images = {img["id"]: img for img in gt["images"]}
    annotations = []
    for ann in gt["annotations"]:
        ann = dict(ann)
        ann.setdefault("iscrowd", 0)
        if "area" not in ann:
            img = images.get(ann["image_id"])
            if img is None:
                raise ValueError(f"annotation {ann.get('id')} refers to image {ann['image_id']}, which is not listed")
            segm = ann["segmentation"]
            if isinstance(segm, list):  # polygons
                rle = mask_utils.merge(mask_utils.frPyObjects(segm, img["height"], img["width"]))
            elif isinstance(segm["counts"], list):  # uncompressed RLE
                rle = mask_utils.frPyObjects(segm, *segm["size"])
            else:
                rle = segm
            ann["area"] = float(mask_utils.area(rle))
        annotations.append(ann)
    coco = COCO()
    coco.dataset = dict(gt) | {"annotations": annotations}
    coco.createIndex()
    return coco


def _coco_dt(coco_gt: COCO, results: Sequence[Mapping[str, Any]]) -> COCO:
    """Results as a COCO object; `loadRes` is used whenever it can be, so numbers equal COCOeval's."""
    image_ids = set(coco_gt.getImgIds())
    strays = sorted({r["image_id"] for r in results} - image_ids)
    if strays:
        raise ValueError(f"results refer to image ids {strays[:10]} that the ground truth does not have")
    if results:
        return coco_gt.loadRes([dict(r) for r in results])
    # loadRes cannot take an empty list; no detections is still a valid (all-zero) evaluation
    coco_dt = COCO()
    coco_dt.dataset = {"images": list(coco_gt.dataset["images"]), "categories": coco_gt.dataset["categories"]}
    coco_dt.dataset["annotations"] = []
    coco_dt.createIndex()
    return coco_dt


def coco_mask_ap(gt: Mapping[str, Any], results: Sequence[Mapping[str, Any]], *, quiet: bool = True) -> dict[str, Any]:
    """COCO mask AP/AR of `results` against a COCO instances json, via pycocotools' COCOeval.

    Args:
        gt: a COCO instances json as a dict (images, annotations, categories); not modified.
        results: COCO results [{image_id, category_id, segmentation: RLE, score}].
        quiet: silence the progress and summary lines COCO and COCOeval print.

    Returns:
        The 12 COCOeval stats by name (AP, AP50, ..., ARl; -1 where COCOeval has nothing to
        measure, e.g. no small objects), and `per_class`: AP at IoU .50:.95 per category
        (None for a category with no GT).
    """
    for i, res in enumerate(results):
        missing = {"image_id", "category_id", "segmentation", "score"} - set(res)
        if missing:
            raise ValueError(f"result {i} lacks {sorted(missing)}")
    sink = contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext()
    with sink:
        coco_gt = _coco_gt(gt)
        coco_dt = _coco_dt(coco_gt, results)
        evaluator = COCOeval(coco_gt, coco_dt, iouType="segm")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    summary: dict[str, Any] = {name: float(v) for name, v in zip(COCO_STAT_NAMES, evaluator.stats, strict=True)}
    precision = evaluator.eval["precision"]  # (T, R, K, A, M): IoU thr, recall thr, class, area, max dets
    per_class = []
    for k, cat_id in enumerate(evaluator.params.catIds):
        p = precision[:, :, k, 0, -1]  # area "all", 100 detections
        p = p[p > -1]
        name = coco_gt.cats[cat_id].get("name", str(cat_id))
        per_class.append({"id": int(cat_id), "name": name, "AP": float(p.mean()) if p.size else None})
    summary["per_class"] = per_class
    return summary


# ---------------------------------------------------------------------------------------------
# Terminal output
# ---------------------------------------------------------------------------------------------


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return text == "-"
    return True


def _grid(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Aligned columns: numbers right-aligned so their digits line up, text left-aligned."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    numeric = [bool(rows) and all(_is_number(r[i]) for r in rows) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        parts = [c.rjust(w) if num else c.ljust(w) for c, w, num in zip(cells, widths, numeric, strict=True)]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def format_table(summary: Mapping[str, Any]) -> str:
    """Plain-text tables of any summary this module returns, for the terminal.

    Generic over the shape rather than one formatter per metric: top-level numbers go in one
    row (the COCO stats, mIoU), dicts of numbers become one row each (PQ's All / Things /
    Stuff), and lists of dicts become a table each (per-class results). Numbers show three
    decimals; None (a metric that is undefined) shows as "-".
    """
    scalars = {k: v for k, v in summary.items() if not isinstance(v, (Mapping, list))}
    groups = {k: v for k, v in summary.items() if isinstance(v, Mapping)}
    tables = {k: v for k, v in summary.items() if isinstance(v, list)}
    blocks = []
    if scalars:
        header = list(scalars)
        blocks.append(_grid(header, [[_cell(scalars[k]) for k in header]]))
    if groups:
        columns = list(dict.fromkeys(c for group in groups.values() for c in group))
        rows = [[name, *(_cell(group.get(c)) for c in columns)] for name, group in groups.items()]
        blocks.append(_grid(["", *columns], rows))
    for title, items in tables.items():
        if not items:
            continue
        columns = list(dict.fromkeys(c for item in items for c in item))
        rows = [[_cell(item.get(c)) for c in columns] for item in items]
        blocks.append(f"{title}:\n" + _grid(columns, rows))
    return "\n\n".join(blocks)
