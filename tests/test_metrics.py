"""Metrics against slow references written here, and COCO AP against COCOeval run directly."""

from __future__ import annotations

import contextlib
import copy
import io
import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from m2f.pipeline.metrics.coco_ap import COCO_STAT_NAMES, coco_mask_ap, image_ids_by_file_name, to_coco_results
from m2f.pipeline.metrics.confusion import ConfusionMatrix
from m2f.pipeline.metrics.id_map import segments_to_id_map
from m2f.pipeline.metrics.panoptic_quality import PQAccumulator, panoptic_image_stats
from m2f.pipeline.metrics.table import format_table

# ------------------------------------------------------------------------------------------------
# Panoptic quality: slow reference over sets of pixels
# ------------------------------------------------------------------------------------------------

CATEGORIES = [
    {"id": 1, "name": "circle", "isthing": 1},
    {"id": 2, "name": "square", "isthing": 1},
    {"id": 3, "name": "sky", "isthing": 0},
    {"id": 4, "name": "ground", "isthing": 0},
]


def reference_pq_stats(pred_map, pred_segments, gt_map, gt_segments) -> dict[int, list]:
    """Category -> [iou_sum, tp, fp, fn], pixel by pixel, read as panopticapi's pq_compute reads the
    ground truth: only id 0 is void, a listed `area` is the segment's area, every listed segment counts,
    and a category's crowd region is the last one listed."""
    h, w = gt_map.shape
    gt_info = {s["id"]: s for s in gt_segments}
    pred_info = {s["id"]: s for s in pred_segments}
    gt_pixels: dict[int, set] = {}
    pred_pixels: dict[int, set] = {}
    void: set = set()
    for y in range(h):
        for x in range(w):
            g, p = int(gt_map[y, x]), int(pred_map[y, x])
            if g in gt_info:
                gt_pixels.setdefault(g, set()).add((y, x))
            elif g == 0:
                void.add((y, x))
            if p != 0:
                pred_pixels.setdefault(p, set()).add((y, x))

    stats: dict[int, list] = {}

    def stat(cat):
        return stats.setdefault(cat, [0.0, 0, 0, 0])

    matched_gt, matched_pred = set(), set()
    for g, gpix in gt_pixels.items():
        if gt_info[g].get("iscrowd", 0):
            continue
        for p, ppix in pred_pixels.items():
            if pred_info[p]["category_id"] != gt_info[g]["category_id"]:
                continue
            area = gt_info[g].get("area", len(gpix))
            iou = len(gpix & ppix) / (area + len(ppix) - len(gpix & ppix) - len(ppix & void))
            if iou > 0.5:
                assert g not in matched_gt and p not in matched_pred
                matched_gt.add(g)
                matched_pred.add(p)
                s = stat(gt_info[g]["category_id"])
                s[0] += iou
                s[1] += 1
    for g in gt_info:
        if g not in matched_gt and not gt_info[g].get("iscrowd", 0):
            stat(gt_info[g]["category_id"])[3] += 1
    crowd_of = {info["category_id"]: g for g, info in gt_info.items() if info.get("iscrowd", 0)}
    for p, ppix in pred_pixels.items():
        if p in matched_pred:
            continue
        cat = pred_info[p]["category_id"]
        crowd = gt_pixels.get(crowd_of.get(cat, -1), set())
        if len(ppix & (void | crowd)) / len(ppix) > 0.5:
            continue
        stat(cat)[2] += 1
    return stats


def reference_pq(stats: dict[int, list], cat_ids) -> float:
    values = []
    for c in cat_ids:
        iou_sum, tp, fp, fn = stats.get(c, [0.0, 0, 0, 0])
        if tp + fp + fn:
            values.append(iou_sum / (tp + fp / 2 + fn / 2))
    return sum(values) / len(values) if values else 0.0


def as_lists(stats) -> dict[int, list]:
    return {c: [s.iou_sum, s.tp, s.fp, s.fn] for c, s in stats.items()}


def assert_stats_equal(actual: dict[int, list], expected: dict[int, list]) -> None:
    assert sorted(actual) == sorted(expected)
    for c in expected:
        assert actual[c][0] == pytest.approx(expected[c][0], abs=1e-12), c
        assert actual[c][1:] == expected[c][1:], c


def scene() -> tuple[np.ndarray, list[dict]]:
    """10x10 GT: sky on top, ground below, a circle and a square, a void strip at the right."""
    gt = np.zeros((10, 10), dtype=np.int32)
    gt[:4, :9] = 1  # sky
    gt[4:, :9] = 2  # ground
    gt[1:4, 1:4] = 3  # circle (9 px)
    gt[6:9, 5:8] = 4  # square (9 px)
    segments = [
        {"id": 1, "category_id": 3, "iscrowd": 0},
        {"id": 2, "category_id": 4, "iscrowd": 0},
        {"id": 3, "category_id": 1, "iscrowd": 0},
        {"id": 4, "category_id": 2, "iscrowd": 0},
    ]
    return gt, segments


def relabel(gt: np.ndarray, gt_segments: list[dict], shift: int = 100) -> tuple[np.ndarray, list[dict]]:
    """GT turned into a prediction with different ids (ids must not matter, only pixels)."""
    pred = np.where(gt > 0, gt + shift, 0)
    return pred, [{"id": s["id"] + shift, "category_id": s["category_id"]} for s in gt_segments]


def test_perfect_prediction_scores_one():
    gt, gt_segs = scene()
    pred, pred_segs = relabel(gt, gt_segs)
    acc = PQAccumulator()
    acc.add(pred, pred_segs, gt, gt_segs)
    summary = acc.summary(CATEGORIES)
    for group in ("All", "Things", "Stuff"):
        assert summary[group]["pq"] == pytest.approx(1.0)
        assert summary[group]["sq"] == pytest.approx(1.0)
        assert summary[group]["rq"] == pytest.approx(1.0)
    assert summary["All"]["n"] == 4 and summary["Things"]["n"] == 2 and summary["Stuff"]["n"] == 2


def test_prediction_over_void_still_perfect():
    # the prediction also paints the void strip: those pixels are outside the union
    gt, gt_segs = scene()
    pred, pred_segs = relabel(gt, gt_segs)
    pred[:4, 9] = 101
    pred[4:, 9] = 102
    stats = panoptic_image_stats(pred, pred_segs, gt, gt_segs)
    assert all(s.iou_sum == pytest.approx(s.tp) and s.fp == 0 and s.fn == 0 for s in stats.values())


def test_empty_prediction_is_all_false_negatives():
    gt, gt_segs = scene()
    acc = PQAccumulator()
    acc.add(np.zeros_like(gt), [], gt, gt_segs)
    summary = acc.summary(CATEGORIES)
    assert summary["All"] == {"pq": 0.0, "sq": 0.0, "rq": 0.0, "n": 4}
    assert [(c["tp"], c["fp"], c["fn"]) for c in summary["per_class"]] == [(0, 0, 1)] * 4


def test_one_false_positive_exact_value():
    gt, gt_segs = scene()
    pred, pred_segs = relabel(gt, gt_segs)
    pred[0:2, 6:8] = 200  # a 4-pixel circle in the sky: no GT circle there
    pred_segs.append({"id": 200, "category_id": 1})
    acc = PQAccumulator()
    acc.add(pred, pred_segs, gt, gt_segs)
    summary = acc.summary(CATEGORIES)
    by_name = {c["name"]: c for c in summary["per_class"]}
    sky_area = 36 - 9
    assert (by_name["circle"]["tp"], by_name["circle"]["fp"], by_name["circle"]["fn"]) == (1, 1, 0)
    assert by_name["circle"]["pq"] == pytest.approx(1 / 1.5)
    assert by_name["circle"]["rq"] == pytest.approx(1 / 1.5)
    assert by_name["circle"]["sq"] == pytest.approx(1.0)
    assert by_name["sky"]["pq"] == pytest.approx((sky_area - 4) / sky_area)
    assert summary["Things"]["pq"] == pytest.approx((1 / 1.5 + 1) / 2)
    assert summary["Stuff"]["pq"] == pytest.approx(((sky_area - 4) / sky_area + 1) / 2)
    assert summary["All"]["pq"] == pytest.approx((1 / 1.5 + 1 + (sky_area - 4) / sky_area + 1) / 4)
    assert_stats_equal(as_lists(acc.stats), reference_pq_stats(pred, pred_segs, gt, gt_segs))


def test_prediction_mostly_on_void_is_ignored_but_half_is_not():
    gt, gt_segs = scene()
    pred, pred_segs = relabel(gt, gt_segs)
    pred[0:3, 9] = 300  # 3 px, all on void: ignored
    pred[5:9, 8:10] = 301  # 8 px, 4 on void, 4 on ground: exactly half, so a false positive
    pred_segs += [{"id": 300, "category_id": 2}, {"id": 301, "category_id": 1}]
    stats = panoptic_image_stats(pred, pred_segs, gt, gt_segs)
    assert stats[2].fp == 0
    assert stats[1].fp == 1
    assert_stats_equal(as_lists(stats), reference_pq_stats(pred, pred_segs, gt, gt_segs))


def test_unlisted_gt_ids_are_not_void_as_in_panopticapi():
    """A GT PNG id missing from segments_info matches nothing, and a prediction on it is a false
    positive: pq_compute skips such ids when matching but counts them against predictions."""
    gt, gt_segs = scene()
    gt[:, 9] = 77  # not described by any segment info
    pred, pred_segs = relabel(gt, gt_segs)
    pred[:, 9] = 0
    pred[0:3, 9] = 300
    pred_segs.append({"id": 300, "category_id": 2})
    stats = panoptic_image_stats(pred, pred_segs, gt, gt_segs)
    assert stats[2].fp == 1 and stats[2].tp == 1
    assert_stats_equal(as_lists(stats), reference_pq_stats(pred, pred_segs, gt, gt_segs))
    pred[0:3, 9] = 0  # no prediction there: the unlisted ids cost nothing
    assert panoptic_image_stats(pred, pred_segs[:-1], gt, gt_segs)[2].fp == 0


def test_a_listed_gt_segment_without_pixels_is_a_false_negative():
    gt, gt_segs = scene()
    gt_segs.append({"id": 9, "category_id": 2, "iscrowd": 0})  # listed, hidden in the PNG
    pred, pred_segs = relabel(*scene())
    stats = panoptic_image_stats(pred, pred_segs, gt, gt_segs)
    assert (stats[2].tp, stats[2].fn) == (1, 1)
    assert_stats_equal(as_lists(stats), reference_pq_stats(pred, pred_segs, gt, gt_segs))


def test_a_listed_gt_area_is_the_segments_area():
    """pq_compute takes a GT segment's area from the JSON (its `area`), not from the PNG."""
    gt, gt_segs = scene()
    pred, pred_segs = relabel(gt, gt_segs)
    exact = panoptic_image_stats(pred, pred_segs, gt, gt_segs)[1].iou_sum
    gt_segs[2]["area"] = 12  # the circle has 9 pixels
    stats = panoptic_image_stats(pred, pred_segs, gt, gt_segs)
    assert exact == 1.0 and stats[1].iou_sum == pytest.approx(9 / 12)
    assert_stats_equal(as_lists(stats), reference_pq_stats(pred, pred_segs, gt, gt_segs))


def test_the_last_listed_crowd_region_of_a_category_is_the_one_used():
    gt, gt_segs = scene()
    gt[6:9, 0:2] = 5  # two crowd regions of circles on the ground
    gt[0, 5:9] = 6
    gt_segs += [{"id": 5, "category_id": 1, "iscrowd": 1}, {"id": 6, "category_id": 1, "iscrowd": 1}]
    pred, pred_segs = relabel(*scene())
    pred[6:9, 0:2] = 400  # a circle predicted on the first crowd region only
    pred_segs.append({"id": 400, "category_id": 1})
    stats = panoptic_image_stats(pred, pred_segs, gt, gt_segs)
    assert stats[1].fp == 1  # not excused: only the last listed crowd region (id 6) counts
    assert_stats_equal(as_lists(stats), reference_pq_stats(pred, pred_segs, gt, gt_segs))


def test_crowd_region():
    gt, gt_segs = scene()
    gt[6:9, 0:3] = 5  # a crowd of circles on the ground
    gt_segs.append({"id": 5, "category_id": 1, "iscrowd": 1})
    pred, pred_segs = relabel(gt, gt_segs)
    pred_segs[-1]["category_id"] = 1  # the prediction paints the crowd as one circle: neither TP nor FP
    stats = panoptic_image_stats(pred, pred_segs, gt, gt_segs)
    assert (stats[1].tp, stats[1].fp, stats[1].fn) == (1, 0, 0)  # the crowd is no false negative either
    assert_stats_equal(as_lists(stats), reference_pq_stats(pred, pred_segs, gt, gt_segs))

    pred_segs[-1]["category_id"] = 2  # a square on a crowd of circles is a false positive
    stats = panoptic_image_stats(pred, pred_segs, gt, gt_segs)
    assert (stats[2].tp, stats[2].fp, stats[2].fn) == (1, 1, 0)
    assert_stats_equal(as_lists(stats), reference_pq_stats(pred, pred_segs, gt, gt_segs))


def test_things_and_stuff_are_averaged_separately():
    gt, gt_segs = scene()
    pred, pred_segs = relabel(gt, gt_segs)
    pred[pred == 103] = 101  # the circle is predicted as sky: circle FN, sky IoU drops
    pred_segs = [s for s in pred_segs if s["id"] != 103]
    acc = PQAccumulator()
    acc.add(pred, pred_segs, gt, gt_segs)
    summary = acc.summary(CATEGORIES + [{"id": 9, "name": "unused", "isthing": 1}])
    sky = 27 / 36
    assert summary["Things"] == pytest.approx({"pq": 0.5, "sq": 0.5, "rq": 0.5, "n": 2})
    assert summary["Stuff"] == pytest.approx({"pq": (sky + 1) / 2, "sq": (sky + 1) / 2, "rq": 1.0, "n": 2})
    assert summary["All"]["n"] == 4
    unused = summary["per_class"][-1]
    assert unused["name"] == "unused" and unused["pq"] is None


def random_case(rng: np.random.Generator, h: int = 12, w: int = 12):
    """Random rectangles over a void background, with crowd regions, and a noisy prediction."""
    gt = np.zeros((h, w), dtype=np.int64)
    gt_segs = []
    for seg_id in range(1, rng.integers(2, 7)):
        y0, x0 = rng.integers(0, h - 2), rng.integers(0, w - 2)
        y1, x1 = y0 + rng.integers(2, h - y0 + 1), x0 + rng.integers(2, w - x0 + 1)
        gt[y0:y1, x0:x1] = seg_id * 7  # sparse ids
        gt_segs.append({"id": seg_id * 7, "category_id": int(rng.integers(1, 5)), "iscrowd": int(rng.random() < 0.2)})
    gt_segs = [s for s in gt_segs if (gt == s["id"]).any()]
    pred, pred_segs = relabel(gt, gt_segs, shift=1000)
    for s in pred_segs:
        if rng.random() < 0.2:
            s["category_id"] = int(rng.integers(1, 5))
    noise = rng.random((h, w)) < rng.uniform(0.0, 0.4)
    choices = np.array([0] + [s["id"] for s in pred_segs] + [5000, 5001])
    pred[noise] = rng.choice(choices, size=int(noise.sum()))
    pred_segs += [{"id": 5000, "category_id": int(rng.integers(1, 5))}, {"id": 5001, "category_id": 1}]
    present = set(np.unique(pred).tolist())
    return pred, [s for s in pred_segs if s["id"] in present], gt, gt_segs


def test_random_maps_match_reference():
    rng = np.random.default_rng(0)
    acc = PQAccumulator()
    total: dict[int, list] = {}
    for _ in range(40):
        pred, pred_segs, gt, gt_segs = random_case(rng)
        expected = reference_pq_stats(pred, pred_segs, gt, gt_segs)
        assert_stats_equal(as_lists(panoptic_image_stats(pred, pred_segs, gt, gt_segs)), expected)
        acc.add(pred, pred_segs, gt, gt_segs)
        for c, s in expected.items():
            total[c] = [a + b for a, b in zip(total.get(c, [0.0, 0, 0, 0]), s, strict=True)]
    assert_stats_equal(as_lists(acc.stats), total)
    summary = acc.summary(CATEGORIES)
    assert summary["All"]["pq"] == pytest.approx(reference_pq(total, [1, 2, 3, 4]))
    assert summary["Things"]["pq"] == pytest.approx(reference_pq(total, [1, 2]))
    assert summary["Stuff"]["pq"] == pytest.approx(reference_pq(total, [3, 4]))
    assert acc.num_images == 40


def test_panoptic_input_errors():
    gt, gt_segs = scene()
    pred, pred_segs = relabel(gt, gt_segs)
    with pytest.raises(ValueError, match="does not describe"):
        panoptic_image_stats(pred, pred_segs[:-1], gt, gt_segs)
    with pytest.raises(ValueError, match="shape"):
        panoptic_image_stats(pred[:5], pred_segs, gt, gt_segs)
    with pytest.raises(ValueError, match="repeats"):
        panoptic_image_stats(pred, pred_segs + pred_segs[:1], gt, gt_segs)
    with pytest.raises(ValueError, match="reserved"):
        panoptic_image_stats(pred, pred_segs, gt, gt_segs + [{"id": 0, "category_id": 1}])
    with pytest.raises(ValueError, match="integer"):
        panoptic_image_stats(pred.astype(float), pred_segs, gt, gt_segs)
    acc = PQAccumulator()
    acc.add(pred, pred_segs, gt, gt_segs)
    with pytest.raises(ValueError, match=r"\[4\]"):
        acc.summary(CATEGORIES[:3])
    with pytest.raises(ValueError, match="isthing"):
        acc.summary([{"id": c["id"], "name": c["name"]} for c in CATEGORIES])


# ------------------------------------------------------------------------------------------------
# RLE segments -> id map
# ------------------------------------------------------------------------------------------------


def encode(mask: np.ndarray, as_bytes: bool = False) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(rle["size"]), "counts": rle["counts"] if as_bytes else rle["counts"].decode("ascii")}


def test_segments_to_id_map_paints_earlier_segments_on_top():
    a = np.zeros((6, 8), dtype=bool)
    a[1:4, 1:5] = True
    b = np.zeros((6, 8), dtype=bool)
    b[2:6, 3:8] = True
    id_map = segments_to_id_map([{"id": 5, "rle": encode(a)}, {"id": 9, "rle": encode(b, as_bytes=True)}], 6, 8)
    expected = np.zeros((6, 8), dtype=np.int32)
    expected[b] = 9
    expected[a] = 5
    np.testing.assert_array_equal(id_map, expected)
    # without ids, segments are numbered by position
    by_position = segments_to_id_map([{"rle": encode(a)}, {"rle": encode(b)}], 6, 8)
    np.testing.assert_array_equal(by_position, np.select([expected == 5, expected == 9], [1, 2], 0))


def test_segments_to_id_map_round_trip_scores_perfect():
    gt, gt_segs = scene()
    segments = [{"id": s["id"], "category_id": s["category_id"], "rle": encode(gt == s["id"])} for s in gt_segs]
    pred = segments_to_id_map(segments, *gt.shape)
    np.testing.assert_array_equal(pred, gt)
    acc = PQAccumulator()
    acc.add(pred, segments, gt, gt_segs)
    assert acc.summary(CATEGORIES)["All"]["pq"] == pytest.approx(1.0)


def test_segments_to_id_map_errors():
    rle = encode(np.ones((4, 4), dtype=bool))
    with pytest.raises(ValueError, match="size"):
        segments_to_id_map([{"id": 1, "rle": rle}], 4, 5)
    with pytest.raises(ValueError, match="reserved"):
        segments_to_id_map([{"id": 0, "rle": rle}], 4, 4)
    with pytest.raises(ValueError, match="no 'rle'"):
        segments_to_id_map([{"id": 1}], 4, 4)


# ------------------------------------------------------------------------------------------------
# mIoU
# ------------------------------------------------------------------------------------------------


def reference_miou(pairs, num_classes: int, ignore: int = 255):
    """Per-class (tp, fp, fn) by looping over pixels; unlabelled predictions count as misses."""
    tp, fp, fn = [0] * num_classes, [0] * num_classes, [0] * num_classes
    correct = total = 0
    for pred, gt in pairs:
        for p, g in zip(pred.ravel().tolist(), gt.ravel().tolist(), strict=True):
            if g == ignore:
                continue
            total += 1
            if p == g:
                tp[g] += 1
                correct += 1
            else:
                fn[g] += 1
                if p != ignore:
                    fp[p] += 1
    ious = [tp[c] / (tp[c] + fp[c] + fn[c]) if tp[c] + fp[c] + fn[c] else None for c in range(num_classes)]
    seen = [v for v in ious if v is not None]
    return sum(seen) / len(seen), correct / total, ious


def test_miou_matches_loop_reference_with_ignore():
    rng = np.random.default_rng(1)
    k = 6
    cm = ConfusionMatrix(k)
    pairs = []
    for _ in range(5):
        gt = rng.integers(0, k - 1, size=(9, 11))  # class 5 never occurs in the GT...
        gt[rng.random(gt.shape) < 0.2] = 255
        pred = np.where(rng.random(gt.shape) < 0.6, gt, rng.integers(0, k - 1, size=gt.shape))
        pred[rng.random(gt.shape) < 0.1] = 255  # unlabelled predictions
        pred[0, 0], gt[0, 0] = 5, 255  # ...and is predicted only on an ignored pixel
        pairs.append((pred, gt))
        cm.add(pred, gt)
    miou, pixel_acc, ious = reference_miou(pairs, k)
    summary = cm.summary([f"c{i}" for i in range(k)])
    assert summary["mIoU"] == pytest.approx(miou)
    assert summary["pixel_accuracy"] == pytest.approx(pixel_acc)
    assert [c["iou"] for c in summary["per_class"]] == pytest.approx(ious)
    assert summary["per_class"][5] == {"class": "c5", "iou": None, "accuracy": None}


def test_miou_counts_a_class_only_predicted():
    cm = ConfusionMatrix(3)
    cm.add(np.array([[0, 2], [1, 1]]), np.array([[0, 0], [1, 1]]))
    summary = cm.summary()
    assert [c["iou"] for c in summary["per_class"]] == pytest.approx([0.5, 1.0, 0.0])
    assert summary["mIoU"] == pytest.approx(0.5)
    assert summary["pixel_accuracy"] == pytest.approx(0.75)
    assert summary["mean_accuracy"] == pytest.approx(0.75)


def test_miou_errors():
    with pytest.raises(ValueError, match="collides"):
        ConfusionMatrix(300, ignore_index=255)
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="outside"):
        cm.add(np.zeros((2, 2), dtype=int), np.full((2, 2), 3))
    with pytest.raises(ValueError, match="outside"):
        cm.add(np.full((2, 2), 7), np.zeros((2, 2), dtype=int))
    with pytest.raises(ValueError, match="shape"):
        cm.add(np.zeros((2, 3), dtype=int), np.zeros((2, 2), dtype=int))
    with pytest.raises(ValueError, match="class names"):
        cm.summary(["a", "b"])


# ------------------------------------------------------------------------------------------------
# COCO mask AP
# ------------------------------------------------------------------------------------------------


def disk(h: int, w: int, cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def box(h: int, w: int, y0: int, x0: int, y1: int, x1: int) -> np.ndarray:
    m = np.zeros((h, w), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def coco_gt() -> dict:
    """Three images, two categories, RLE and polygon annotations, a crowd, and sizes spanning S/M/L."""
    images = [
        {"id": 11, "file_name": "val/a.jpg", "height": 120, "width": 160},
        {"id": 12, "file_name": "val/b.jpg", "height": 120, "width": 160},
        {"id": 13, "file_name": "c.png", "height": 64, "width": 64},
    ]
    masks = [
        (11, 1, disk(120, 160, 60, 60, 56), 0),  # large
        (11, 2, box(120, 160, 80, 100, 110, 150), 0),  # medium
        (11, 1, disk(120, 160, 100, 20, 4), 0),  # small
        (12, 2, box(120, 160, 10, 10, 60, 90), 0),
        (12, 1, disk(120, 160, 80, 120, 20), 0),
        (12, 2, box(120, 160, 70, 10, 110, 60), 1),  # crowd
        (13, 1, disk(64, 64, 30, 30, 10), 0),
    ]
    annotations = []
    for ann_id, (image_id, cat, m, crowd) in enumerate(masks, start=1):
        rle = encode(m)
        area = float(mask_utils.area({"size": rle["size"], "counts": rle["counts"].encode()}))
        annotations.append(
            {
                "id": ann_id,
                "image_id": image_id,
                "category_id": cat,
                "segmentation": rle,
                "area": area,
                "iscrowd": crowd,
            }
        )
    # a polygon annotation: a triangle in image 13
    poly = [[40.0, 40.0, 60.0, 40.0, 50.0, 60.0]]
    area = float(mask_utils.area(mask_utils.merge(mask_utils.frPyObjects(poly, 64, 64))))
    annotations.append(
        {
            "id": 99,
            "image_id": 13,
            "category_id": 2,
            "segmentation": poly,
            "area": area,
            "iscrowd": 0,
            "bbox": [40, 40, 20, 20],
        }
    )
    categories = [{"id": 1, "name": "circle"}, {"id": 2, "name": "rectangle"}]
    return {"images": images, "annotations": annotations, "categories": categories}


def gt_masks(gt: dict) -> list[tuple[int, int, np.ndarray]]:
    """(image_id, category_id, mask) of every non-crowd GT annotation."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = copy.deepcopy(gt)
        coco.createIndex()
    return [
        (a["image_id"], a["category_id"], coco.annToMask(a).astype(bool))
        for a in coco.dataset["annotations"]
        if not a["iscrowd"]
    ]


def noisy_results(gt: dict, seed: int = 0) -> list[dict]:
    """Shifted GT masks with random scores, a wrong-class duplicate, and a spurious detection."""
    rng = np.random.default_rng(seed)
    results = []
    for image_id, cat, m in gt_masks(gt):
        shifted = np.roll(m, shift=(int(rng.integers(-3, 4)), int(rng.integers(-3, 4))), axis=(0, 1))
        results.append(
            {"image_id": image_id, "category_id": cat, "segmentation": encode(shifted), "score": float(rng.random())}
        )
        if rng.random() < 0.4:
            results.append(
                {"image_id": image_id, "category_id": 3 - cat, "segmentation": encode(m), "score": float(rng.random())}
            )
    results.append(
        {"image_id": 12, "category_id": 1, "segmentation": encode(box(120, 160, 0, 100, 30, 150)), "score": 0.9}
    )
    return results


def cocoeval_directly(gt: dict, results: list[dict]) -> np.ndarray:
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = copy.deepcopy(gt)
        coco.createIndex()
        dt = coco.loadRes(copy.deepcopy(results))
        ev = COCOeval(coco, dt, iouType="segm")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_coco_mask_ap_equals_cocoeval(seed):
    gt = coco_gt()
    results = noisy_results(gt, seed)
    before = copy.deepcopy((gt, results))
    stats = coco_mask_ap(gt, results)
    expected = cocoeval_directly(gt, results)
    assert [stats[name] for name in COCO_STAT_NAMES] == pytest.approx(expected.tolist())
    assert 0 < stats["AP"] < 1
    assert (gt, results) == before  # COCOeval writes into annotations; ours must work on copies
    assert [c["name"] for c in stats["per_class"]] == ["circle", "rectangle"]


def test_coco_mask_ap_perfect_results():
    gt = coco_gt()
    results = [{"image_id": i, "category_id": c, "segmentation": encode(m), "score": 1.0} for i, c, m in gt_masks(gt)]
    stats = coco_mask_ap(gt, results)
    for name in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100"):
        assert stats[name] == pytest.approx(1.0), name
    assert [c["AP"] for c in stats["per_class"]] == pytest.approx([1.0, 1.0])


def test_coco_mask_ap_no_results_is_zero():
    stats = coco_mask_ap(coco_gt(), [])
    assert stats["AP"] == 0.0 and stats["AR100"] == 0.0


def test_coco_mask_ap_fills_missing_area_and_iscrowd():
    gt = coco_gt()
    results = noisy_results(gt)
    bare = copy.deepcopy(gt)
    for ann in bare["annotations"]:
        if not ann["iscrowd"]:
            del ann["iscrowd"]
        del ann["area"]
    stats = coco_mask_ap(bare, results)
    assert [stats[n] for n in COCO_STAT_NAMES] == pytest.approx(cocoeval_directly(gt, results).tolist())


def test_coco_mask_ap_errors():
    gt = coco_gt()
    with pytest.raises(ValueError, match="image ids"):
        coco_mask_ap(
            gt, [{"image_id": 999, "category_id": 1, "segmentation": encode(box(4, 4, 0, 0, 2, 2)), "score": 1}]
        )
    with pytest.raises(ValueError, match="lacks"):
        coco_mask_ap(gt, [{"image_id": 11, "category_id": 1, "score": 1}])
    with pytest.raises(ValueError, match="annotations"):
        coco_mask_ap({"images": [], "categories": []}, [])


def test_coco_mask_ap_quiet_flag(capsys):
    gt = coco_gt()
    coco_mask_ap(gt, noisy_results(gt))
    assert capsys.readouterr().out == ""
    coco_mask_ap(gt, noisy_results(gt), quiet=False)
    assert "Average Precision" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------
# Batch output rows -> COCO results
# ------------------------------------------------------------------------------------------------


def test_to_coco_results_matches_by_file_name():
    gt = coco_gt()
    m = box(120, 160, 10, 10, 60, 90)
    rle_bytes = encode(m, as_bytes=True)
    rows = [
        {"image_uri": "s3://bucket/images/b.jpg", "segments": [{"category_id": 1, "score": 0.8, "rle": rle_bytes}]},
        {"image_uri": "/data/elsewhere/c.png", "segments": []},
        {
            "image_uri": "s3://bucket/images/unknown.jpg",
            "segments": [{"category_id": 0, "score": 0.5, "rle": rle_bytes}],
        },
        {"image_uri": "a.jpg", "segments": None},
    ]
    index = image_ids_by_file_name(gt)
    assert index == {"a.jpg": 11, "b.jpg": 12, "c.png": 13}
    results, unmatched = to_coco_results(rows, index)
    assert unmatched == ["s3://bucket/images/unknown.jpg"]
    assert results == [
        {
            "image_id": 12,
            "category_id": 1,
            "segmentation": {"size": [120, 160], "counts": rle_bytes["counts"].decode()},
            "score": 0.8,
        }
    ]
    json.dumps(results)  # str counts: writable as a results file

    # keys with directories match too, and a category map renames and filters
    rows[0]["segments"].append({"category_id": 7, "score": 0.3, "rle": rle_bytes})
    results, _ = to_coco_results(rows, {img["file_name"]: img["id"] for img in gt["images"]}, category_map={0: 1, 1: 2})
    assert [(r["image_id"], r["category_id"]) for r in results] == [(12, 2)]


def test_to_coco_results_feeds_coco_mask_ap():
    gt = coco_gt()
    names = {img["id"]: img["file_name"] for img in gt["images"]}
    rows: dict[int, dict] = {}
    for image_id, cat, m in gt_masks(gt):
        row = rows.setdefault(image_id, {"image_uri": f"gs://b/{names[image_id].split('/')[-1]}", "segments": []})
        row["segments"].append({"category_id": cat - 1, "score": 0.9, "rle": encode(m, as_bytes=True)})
    results, unmatched = to_coco_results(list(rows.values()), image_ids_by_file_name(gt), category_map={0: 1, 1: 2})
    assert unmatched == []
    assert coco_mask_ap(gt, results)["AP"] == pytest.approx(1.0)


def test_to_coco_results_errors():
    with pytest.raises(ValueError, match="two images"):
        to_coco_results([], {"x/a.jpg": 1, "y/a.jpg": 2})
    with pytest.raises(ValueError, match="no score"):
        rle = encode(box(4, 4, 0, 0, 2, 2))
        to_coco_results([{"image_uri": "a.jpg", "segments": [{"category_id": 1, "rle": rle}]}], {"a.jpg": 1})
    with pytest.raises(ValueError, match="image_uri"):
        to_coco_results([{"segments": []}], {"a.jpg": 1})


# ------------------------------------------------------------------------------------------------
# Terminal table
# ------------------------------------------------------------------------------------------------


def test_format_table_renders_every_summary():
    gt, gt_segs = scene()
    pred, pred_segs = relabel(gt, gt_segs)
    acc = PQAccumulator()
    acc.add(pred, pred_segs, gt, gt_segs)
    text = format_table(acc.summary(CATEGORIES))
    lines = text.splitlines()
    assert lines[0].split() == ["pq", "sq", "rq", "n"]
    assert lines[2].split() == ["All", "1.000", "1.000", "1.000", "4"]
    assert "per_class:" in text and "circle" in text

    cm = ConfusionMatrix(2)
    cm.add(np.array([[0, 1]]), np.array([[0, 0]]))
    text = format_table(cm.summary(["sky", "ground"]))
    assert text.splitlines()[0].split() == ["mIoU", "mean_accuracy", "pixel_accuracy"]
    assert "0.250" in text  # mIoU: (0.5 + 0) / 2

    gt_json = coco_gt()
    text = format_table(coco_mask_ap(gt_json, noisy_results(gt_json)))
    assert text.splitlines()[0].split() == list(COCO_STAT_NAMES)
