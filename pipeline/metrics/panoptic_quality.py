"""Panoptic quality (PQ, SQ, RQ) over a set of images, fed one image at a time.

Follows Kirillov et al. (2019) exactly as COCO panopticapi's ``pq_compute``. Counts are kept per
category as raw sums, so memory stays flat however large the set, and `m2f evaluate` and
`jobs.evaluate.quality` agree with any tool that runs panopticapi on the same PNGs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from m2f.pipeline.metrics.id_map import VOID


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
    """Per-category PQ counts of one image, as COCO panopticapi's `pq_compute` counts them.

    Args:
        pred_map: (H, W) int, predicted segment id per pixel; 0 = no prediction.
        pred_segments: [{id, category_id}] for the ids in `pred_map`.
        gt_map: (H, W) int, ground-truth segment id per pixel; 0 = void (unlabelled).
        gt_segments: [{id, category_id, iscrowd (default 0), area (default: its pixels in gt_map)}].

    A prediction and a non-crowd GT segment of the same category match when IoU > 0.5, where the
    union leaves out the prediction's pixels on void GT. IoU > 0.5 makes matches unique, so no
    assignment problem arises. Every listed non-crowd GT segment left unmatched is a false negative,
    also one with no pixel in `gt_map`. An unmatched prediction is a false positive unless more than
    half of it lies on void or on its category's crowd region (the last listed, when there are
    several). Where the ground truth disagrees with itself, panopticapi's reading is the one kept:
    a GT id missing from `gt_segments` is not void but matches nothing (a prediction on it counts
    against the prediction), and a listed `area` is used as the segment's area. A prediction listed
    with no pixel is skipped (panopticapi refuses such a file; `m2f export-coco` never writes one).

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
    n_gt, n_pred = len(gts), len(preds)
    gt_lab, unlisted = _relabel(gt_map, [int(s["id"]) for s in gts])
    if unlisted:  # GT ids missing from gt_segments: a label of their own, matched by nothing, not void
        gt_lab[np.isin(gt_map, unlisted)] = n_gt + 1

    rows = n_gt + 2  # void, the listed GT segments, the unlisted ids
    joint = gt_lab * (n_pred + 1) + pred_lab
    counts = np.bincount(joint.ravel(), minlength=rows * (n_pred + 1)).reshape(rows, n_pred + 1)
    pixels = counts.sum(axis=1)  # (rows,)
    gt_area = [0] + [int(s.get("area", pixels[g])) for g, s in enumerate(gts, start=1)]
    pred_area = counts.sum(axis=0)  # (n_pred + 1,) column 0 = unpredicted
    pred_cat = [0] + [int(s["category_id"]) for s in preds]
    gt_cat = [0] + [int(s["category_id"]) for s in gts]
    gt_crowd = [False] + [bool(s.get("iscrowd", 0)) for s in gts]

    stats: dict[int, PQStat] = {}
    gt_matched = np.zeros(n_gt + 1, dtype=bool)
    pred_matched = np.zeros(n_pred + 1, dtype=bool)
    for g, p in zip(*np.nonzero(counts[1 : n_gt + 1, 1:]), strict=True):
        g, p = int(g) + 1, int(p) + 1
        if gt_crowd[g] or gt_cat[g] != pred_cat[p]:
            continue
        inter = int(counts[g, p])
        union = int(pred_area[p]) + gt_area[g] - inter - int(counts[0, p])
        iou = inter / union
        if iou > 0.5:
            stat = stats.setdefault(gt_cat[g], PQStat())
            stat.tp += 1
            stat.iou_sum += iou
            gt_matched[g] = pred_matched[p] = True

    crowd_of: dict[int, int] = {}  # category -> its crowd region's row: the last listed, as panopticapi keeps
    for g in range(1, n_gt + 1):
        if gt_crowd[g]:
            crowd_of[gt_cat[g]] = g
        elif not gt_matched[g]:
            stats.setdefault(gt_cat[g], PQStat()).fn += 1

    for p in range(1, n_pred + 1):
        if pred_area[p] == 0 or pred_matched[p]:
            continue
        ignored = int(counts[0, p])
        if pred_cat[p] in crowd_of:
            ignored += int(counts[crowd_of[pred_cat[p]], p])
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
