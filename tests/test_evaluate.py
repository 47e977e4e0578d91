"""`m2f evaluate` and `m2f export-coco` on real Parquet files and real ground truth.

Mask AP is checked against pycocotools' COCOeval run here on the same predictions, PQ against exact
values worked out by hand and a slow reference over boolean masks, mIoU against per-class pixel
counts. Predictions are written with `pipeline.schema` and `pipeline.encode`, as `m2f segment` does.
"""

from __future__ import annotations

import contextlib
import io
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from typer.testing import CliRunner

from cli import app
from jobs.evaluate import EvaluateConfig, export_coco, run, stable_image_id
from pipeline.encode import encode_segments, image_stats
from pipeline.metrics import COCO_STAT_NAMES
from pipeline.schema import error_row, image_id, ok_row, rows_to_table
from pipeline.synthetic import SYNTHETIC_CATEGORIES, THING_IDS, generate

CATEGORY_IDS = [c["id"] for c in SYNTHETIC_CATEGORIES]
CLASS_NAMES = [c["name"] for c in SYNTHETIC_CATEGORIES]
IS_THING = [bool(c["isthing"]) for c in SYNTHETIC_CATEGORIES]
INDEX = {cid: k for k, cid in enumerate(CATEGORY_IDS)}
T0 = datetime(2025, 1, 1, tzinfo=UTC)
IMAGE_DIR = "/data/images"  # predictions name images by URI; only the basename has to match the GT
runner = CliRunner()


# ------------------------------------------------------------------------------------------------
# Writing batch output
# ------------------------------------------------------------------------------------------------


def segments_of(masks: list[np.ndarray], category_ids: list[int], scores: list[float]) -> list[dict[str, Any]]:
    """Batch-output segments of (H, W) bool masks, encoded as `m2f segment` encodes them."""
    if not masks:
        return []
    return encode_segments(
        np.stack(masks),
        np.array([INDEX[c] for c in category_ids]),
        np.array(scores, dtype=np.float32),
        class_names=CLASS_NAMES,
        is_thing=IS_THING,
        category_ids=CATEGORY_IDS,
    )


def pred_row(name: str, segments: list[dict[str, Any]], h: int, w: int, *, minutes: int = 0) -> dict[str, Any]:
    row = ok_row(
        f"{IMAGE_DIR}/{name}",
        width=w,
        height=h,
        segments=segments,
        stats=image_stats(segments, h, w),
        inference_ms=1.0,
        task="panoptic",
        model="test@sha256:0",
        run_id="run-1",
    )
    return row | {"processed_at": T0 + timedelta(minutes=minutes)}


def failed_row(name: str, *, minutes: int = 0) -> dict[str, Any]:
    row = error_row(f"{IMAGE_DIR}/{name}", "decode: truncated", task="panoptic", model="test@sha256:0", run_id="r")
    return row | {"processed_at": T0 + timedelta(minutes=minutes)}


def write_parts(folder: Path, *parts: list[dict[str, Any]]) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    for k, rows in enumerate(parts):
        pq.write_table(rows_to_table(rows), folder / f"part-{k:05d}.parquet")
    return str(folder)


def evaluate_cli(*args: str) -> tuple[int, str, dict[str, Any] | None]:
    """Run `m2f evaluate` through the CLI; returns exit code, all output and the --json report."""
    result = runner.invoke(app, ["evaluate", *args])
    report = None
    if "--json" in args and result.exit_code == 0 and "://" not in args[args.index("--json") + 1]:
        report = json.loads(Path(args[args.index("--json") + 1]).read_text())
    return result.exit_code, result.output, report


# ------------------------------------------------------------------------------------------------
# A synthetic ground truth and imperfect predictions of it
# ------------------------------------------------------------------------------------------------


def read_panoptic(root: Path) -> list[tuple[dict[str, Any], list[tuple[np.ndarray, int]]]]:
    """[(image, [(mask, category_id)])] of a synthetic set, decoded from its panoptic PNGs."""
    data = json.loads((root / "panoptic.json").read_text())
    annotations = {a["image_id"]: a for a in data["annotations"]}
    out = []
    for image in data["images"]:
        annotation = annotations[image["id"]]
        rgb = np.asarray(Image.open(root / "panoptic" / annotation["file_name"]).convert("RGB"), dtype=np.int64)
        ids = rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]
        out.append((image, [(ids == s["id"], s["category_id"]) for s in annotation["segments_info"]]))
    return out


def perturb(rng: np.random.Generator, gt: list[tuple[np.ndarray, int]]) -> list[tuple[np.ndarray, int, float]]:
    """Predictions of one image: exact, shifted, cut, relabelled and missed segments, plus a false positive."""
    h, w = gt[0][0].shape
    preds = []
    for mask, category_id in gt:
        action = rng.integers(5)
        if action == 1:  # shifted by a few pixels
            mask = np.roll(mask, tuple(rng.integers(-8, 9, size=2)), axis=(0, 1))
        elif action == 2:  # a chunk cut away
            y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
            mask = mask.copy()
            mask[y : y + h // 3, x : x + w // 3] = False
        elif action == 3 and category_id in THING_IDS:  # the wrong thing class
            category_id = int(rng.choice([c for c in THING_IDS if c != category_id]))
        elif action == 4 and rng.random() < 0.5:  # missed
            continue
        if mask.any():
            preds.append((mask, category_id, float(rng.uniform(0.05, 1.0))))
    box = np.zeros((h, w), dtype=bool)
    y, x = rng.integers(0, h - 20), rng.integers(0, w - 20)
    box[y : y + 20, x : x + 20] = True
    preds.append((box, int(rng.choice(THING_IDS)), float(rng.uniform(0.05, 1.0))))
    preds.sort(key=lambda p: -p[2])  # batch output lists segments by falling score
    return preds


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Six synthetic scenes; predictions for the first five (the sixth has none), one extra image not in the GT."""
    root = tmp_path_factory.mktemp("synthetic")
    generate(str(root), 6, seed=11)
    scenes = read_panoptic(root)
    rng = np.random.default_rng(0)
    preds = {image["file_name"]: perturb(rng, gt) for image, gt in scenes[:5]}
    rows = []
    for image, _ in scenes[:5]:
        p = preds[image["file_name"]]
        segments = segments_of([m for m, _, _ in p], [c for _, c, _ in p], [s for _, _, s in p])
        rows.append(pred_row(image["file_name"], segments, image["height"], image["width"]))
    stray = np.zeros((40, 30), dtype=bool)
    stray[5:20, 5:20] = True
    rows.append(pred_row("not-in-gt.png", segments_of([stray], [1], [0.9]), 40, 30))
    predictions = write_parts(root / "predictions", rows[:3], rows[3:])
    return {"root": root, "scenes": scenes, "preds": preds, "rows": rows, "predictions": predictions}


# ------------------------------------------------------------------------------------------------
# COCO mask AP
# ------------------------------------------------------------------------------------------------


def direct_cocoeval(instances_json: Path, rows: list[dict[str, Any]]) -> np.ndarray:
    """The 12 COCOeval stats of every segment of `rows`, run here without the job."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(instances_json))
        ids = {img["file_name"]: img["id"] for img in coco_gt.dataset["images"]}
        results = [
            {
                "image_id": ids[row["image_uri"].rsplit("/", 1)[-1]],
                "category_id": s["category_id"],
                "segmentation": {"size": s["rle"]["size"], "counts": s["rle"]["counts"]},
                "score": s["score"],
            }
            for row in rows
            if row["image_uri"].rsplit("/", 1)[-1] in ids
            for s in row["segments"]
        ]
        evaluator = COCOeval(coco_gt, coco_gt.loadRes(results), iouType="segm")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator.stats


def test_mask_ap_equals_cocoeval_run_directly(synthetic: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "metrics.json"
    gt = synthetic["root"] / "instances.json"
    code, output, report = evaluate_cli(
        synthetic["predictions"], str(gt), "--gt-format", "coco-instances", "--json", str(out)
    )
    assert code == 0, output
    expected = direct_cocoeval(gt, synthetic["rows"])
    got = [report["metrics"][name] for name in COCO_STAT_NAMES]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    assert 0.05 < report["metrics"]["AP"] < 0.95  # imperfect, so the comparison means something
    assert report["metrics"]["segments_outside_gt_categories"] > 0  # sky and ground are not instances
    assert report["images"]["matched"] == 5
    assert report["images"]["gt_images"] == 6
    assert report["images"]["unmatched_predictions"] == 1
    assert report["images"]["gt_without_prediction"] == 1
    assert "AP50" in output and "not-in-gt.png" in output and "000006.png" in output


def test_perfect_predictions_give_ap_one(synthetic: dict[str, Any], tmp_path: Path) -> None:
    rows = []
    for k, (image, gt) in enumerate(synthetic["scenes"]):
        things = [(m, c) for m, c in gt if c in THING_IDS]
        scores = [1.0 - 0.01 * i for i in range(len(things))]
        segments = segments_of([m for m, _ in things], [c for _, c in things], scores)
        rows.append(pred_row(image["file_name"], segments, image["height"], image["width"], minutes=k))
    predictions = write_parts(tmp_path / "perfect", rows)
    config = EvaluateConfig(
        predictions, str(synthetic["root"] / "instances.json"), "coco-instances", json_out=str(tmp_path / "m.json")
    )
    assert run(config) == 0
    metrics = json.loads((tmp_path / "m.json").read_text())["metrics"]
    assert metrics["AP"] == metrics["AP50"] == metrics["AP75"] == 1.0


# ------------------------------------------------------------------------------------------------
# Panoptic quality
# ------------------------------------------------------------------------------------------------


def reference_pq(pairs: list[tuple[list[tuple[np.ndarray, int]], list[tuple[np.ndarray, int]]]]) -> dict[str, Any]:
    """PQ / SQ / RQ straight from the definition, on boolean masks (no void, no crowd).

    `pairs`: per image (GT [(mask, category)], predictions [(mask, category)] in paint order: a
    pixel belongs to the first prediction that covers it).
    """
    stats: dict[int, list[float]] = {}  # category -> [iou_sum, tp, fp, fn]
    for gt, preds in pairs:
        taken = np.zeros_like(gt[0][0])
        visible = []
        for mask, category in preds:
            visible.append((mask & ~taken, category))
            taken |= mask
        matched_gt, matched_pred = set(), set()
        for g, (gm, gc) in enumerate(gt):
            for p, (pm, pc) in enumerate(visible):
                iou = (gm & pm).sum() / max((gm | pm).sum(), 1)
                if gc == pc and iou > 0.5:
                    stats.setdefault(gc, [0.0, 0, 0, 0])
                    stats[gc][0] += iou
                    stats[gc][1] += 1
                    matched_gt.add(g)
                    matched_pred.add(p)
        for g, (gm, gc) in enumerate(gt):
            if g not in matched_gt and gm.any():
                stats.setdefault(gc, [0.0, 0, 0, 0])[3] += 1
        for p, (pm, pc) in enumerate(visible):
            if p not in matched_pred and pm.any():
                stats.setdefault(pc, [0.0, 0, 0, 0])[2] += 1

    def average(category_ids: list[int]) -> dict[str, float]:
        rows = []
        for c in category_ids:
            if c in stats:
                iou_sum, tp, fp, fn = stats[c]
                denom = tp + fp / 2 + fn / 2
                rows.append((iou_sum / denom, iou_sum / tp if tp else 0.0, tp / denom))
        pq, sq, rq = np.mean(rows, axis=0) if rows else (0.0, 0.0, 0.0)
        return {"pq": pq, "sq": sq, "rq": rq, "n": len(rows)}

    return {
        "All": average(CATEGORY_IDS),
        "Things": average([c["id"] for c in SYNTHETIC_CATEGORIES if c["isthing"]]),
        "Stuff": average([c["id"] for c in SYNTHETIC_CATEGORIES if not c["isthing"]]),
    }


def assert_groups(metrics: dict[str, Any], expected: dict[str, dict[str, float]]) -> None:
    for group, values in expected.items():
        for key, value in values.items():
            assert metrics[group][key] == pytest.approx(value, abs=1e-12), (group, key)


def test_pq_on_synthetic_scenes_equals_slow_reference(synthetic: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "pq.json"
    gt = synthetic["root"] / "panoptic.json"
    code, output, report = evaluate_cli(synthetic["predictions"], str(gt), "--json", str(out))
    assert code == 0, output
    pairs = []
    for image, segments in synthetic["scenes"]:
        preds = synthetic["preds"].get(image["file_name"], [])  # the sixth image: an empty prediction
        pairs.append((segments, [(m, c) for m, c, _ in preds]))
    expected = reference_pq(pairs)
    assert_groups(report["metrics"], expected)
    assert 0.2 < report["metrics"]["All"]["pq"] < 0.95
    assert "Things" in output and "per_class" in output


# A hand-built 10 x 10 scene: sky above ground, a 3 x 3 circle in the sky. Ids use all three PNG
# channels (70000 = 112 + 17 * 256 + 1 * 65536) to check the decoding.
SKY_ID, GROUND_ID, CIRCLE_ID = 70000, 5, 300


def hand_gt() -> tuple[np.ndarray, list[dict[str, Any]], dict[str, np.ndarray]]:
    ids = np.full((10, 10), GROUND_ID, dtype=np.int64)
    ids[:5] = SKY_ID
    ids[1:4, 1:4] = CIRCLE_ID
    infos = [
        {"id": SKY_ID, "category_id": 4, "iscrowd": 0},
        {"id": GROUND_ID, "category_id": 5, "iscrowd": 0},
        {"id": CIRCLE_ID, "category_id": 1, "iscrowd": 0},
    ]
    return ids, infos, {"sky": ids == SKY_ID, "ground": ids == GROUND_ID, "circle": ids == CIRCLE_ID}


def write_panoptic_gt(folder: Path, names: list[str], stem: str = "panoptic_val") -> Path:
    """COCO panoptic JSON + PNG folder named by the JSON's stem, every image the hand-built scene."""
    ids, infos, _ = hand_gt()
    (folder / stem).mkdir(parents=True)
    rgb = np.stack([(ids >> s) & 255 for s in (0, 8, 16)], axis=-1).astype(np.uint8)
    images, annotations = [], []
    for k, name in enumerate(names, start=1):
        png = name.rsplit(".", 1)[0] + ".png"
        Image.fromarray(rgb).save(folder / stem / png)
        images.append({"id": k, "file_name": name, "height": 10, "width": 10})
        annotations.append({"image_id": k, "file_name": png, "segments_info": infos})
    categories = [{k: v for k, v in c.items() if k != "color"} for c in SYNTHETIC_CATEGORIES]
    path = folder / f"{stem}.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def hand_predictions(case: str) -> list[tuple[np.ndarray, int]]:
    _, _, gt = hand_gt()
    if case == "empty":
        return []
    if case == "perfect":
        return [(gt["circle"], 1), (gt["sky"], 4), (gt["ground"], 5)]
    # One false positive: a 2 x 2 triangle in the ground's corner, which the ground prediction leaves out.
    fp = np.zeros((10, 10), dtype=bool)
    fp[8:, 8:] = True
    return [(gt["circle"], 1), (gt["sky"], 4), (gt["ground"] & ~fp, 5), (fp, 3)]


# Worked by hand. one_fp: ground IoU = 46 / 50 = 0.92; circle and sky exact; triangle tp 0, fp 1.
HAND_EXPECTED = {
    "perfect": {
        "All": {"pq": 1.0, "sq": 1.0, "rq": 1.0, "n": 3},
        "Things": {"pq": 1.0, "sq": 1.0, "rq": 1.0, "n": 1},
        "Stuff": {"pq": 1.0, "sq": 1.0, "rq": 1.0, "n": 2},
    },
    "empty": {
        "All": {"pq": 0.0, "sq": 0.0, "rq": 0.0, "n": 3},
        "Things": {"pq": 0.0, "sq": 0.0, "rq": 0.0, "n": 1},
        "Stuff": {"pq": 0.0, "sq": 0.0, "rq": 0.0, "n": 2},
    },
    "one_fp": {
        "All": {"pq": (1 + 1 + 0.92 + 0) / 4, "sq": (1 + 1 + 0.92 + 0) / 4, "rq": 3 / 4, "n": 4},
        "Things": {"pq": 0.5, "sq": 0.5, "rq": 0.5, "n": 2},
        "Stuff": {"pq": 0.96, "sq": 0.96, "rq": 1.0, "n": 2},
    },
}


@pytest.mark.parametrize("case", ["perfect", "empty", "one_fp"])
def test_pq_on_hand_built_cases(case: str, tmp_path: Path) -> None:
    gt_json = write_panoptic_gt(tmp_path, ["a.jpg"])
    preds = hand_predictions(case)
    segments = segments_of([m for m, _ in preds], [c for _, c in preds], [0.9 - 0.1 * k for k in range(len(preds))])
    predictions = write_parts(tmp_path / "out", [pred_row("a.jpg", segments, 10, 10)])
    code, output, report = evaluate_cli(predictions, str(gt_json), "--json", str(tmp_path / "pq.json"))
    assert code == 0, output
    assert_groups(report["metrics"], HAND_EXPECTED[case])
    _, _, gt = hand_gt()
    assert_groups(report["metrics"], reference_pq([([(gt["sky"], 4), (gt["ground"], 5), (gt["circle"], 1)], preds)]))
    per_class = {c["name"]: c for c in report["metrics"]["per_class"]}
    if case == "empty":
        assert [per_class[n]["fn"] for n in ("circle", "sky", "ground")] == [1, 1, 1]
    if case == "one_fp":
        assert (per_class["triangle"]["tp"], per_class["triangle"]["fp"], per_class["triangle"]["pq"]) == (0, 1, 0.0)
        assert per_class["ground"]["sq"] == pytest.approx(0.92)
        assert per_class["rectangle"]["pq"] is None  # never occurs


def test_duplicates_choose_latest_ok_row_and_skip_temporaries_and_subfolders(tmp_path: Path) -> None:
    gt_json = write_panoptic_gt(tmp_path, ["a.png", "b.png"])
    perfect = hand_predictions("perfect")
    good = segments_of([m for m, _ in perfect], [c for _, c in perfect], [0.9, 0.8, 0.7])
    out = tmp_path / "out"
    write_parts(
        out,
        [failed_row("a.png", minutes=1), pred_row("b.png", [], 10, 10, minutes=1), failed_row("c.png", minutes=1)],
        [pred_row("a.png", good, 10, 10, minutes=2), pred_row("b.png", good, 10, 10, minutes=2)],
        [failed_row("b.png", minutes=3)],  # a later failure does not undo an ok row
    )
    # Rows that would spoil the score if they were read: empty predictions, newer than all others.
    spoilers = rows_to_table([pred_row(n, [], 10, 10, minutes=9) for n in ("a.png", "b.png")])
    pq.write_table(spoilers, out / ".part-00003.parquet.m2f-tmp-0123abcd")
    pq.write_table(spoilers, out / ".hidden.parquet")
    (out / "_runs").mkdir()
    pq.write_table(spoilers, out / "_runs" / "part-00000.parquet")
    (out / "_runs" / "run-1.json").write_text("{}")
    (out / "_previews").mkdir()
    Image.new("RGB", (10, 10)).save(out / "_previews" / "a.png")

    code, output, report = evaluate_cli(str(out), str(gt_json), "--json", str(tmp_path / "m.json"))
    assert code == 0, output
    assert report["metrics"]["All"]["pq"] == 1.0
    assert report["images"] == {
        "prediction_files": 3,
        "rows": 6,
        "images": 3,
        "superseded_rows": 3,
        "failed": 1,
        "ok": 2,
        "gt_images": 2,
        "matched": 2,
        "unmatched_predictions": 0,
        "gt_without_prediction": 0,
    }


def test_masks_option_overrides_png_folder(tmp_path: Path) -> None:
    gt_json = write_panoptic_gt(tmp_path, ["a.png"])
    moved = tmp_path / "elsewhere"
    (tmp_path / "panoptic_val").rename(moved)
    perfect = hand_predictions("perfect")
    predictions = write_parts(
        tmp_path / "out", [pred_row("a.png", segments_of([m for m, _ in perfect], [1, 4, 5], [0.9, 0.8, 0.7]), 10, 10)]
    )
    code, output, _ = evaluate_cli(predictions, str(gt_json))
    assert code == 2 and "panoptic PNG folder not found" in output
    code, output, _ = evaluate_cli(predictions, str(gt_json), "--masks", str(moved), "--json", str(tmp_path / "j"))
    assert code == 0, output
    assert json.loads((tmp_path / "j").read_text())["metrics"]["All"]["pq"] == 1.0


# ------------------------------------------------------------------------------------------------
# mIoU
# ------------------------------------------------------------------------------------------------


def reference_iou(pairs: list[tuple[np.ndarray, np.ndarray]], k: int) -> list[float | None]:
    """Per-class IoU over the whole set from pixel counts; `pairs` = (gt, pred) class maps, 255 = none."""
    tp, fp, fn = np.zeros(k), np.zeros(k), np.zeros(k)
    for gt, pred in pairs:
        valid = gt != 255
        for c in range(k):
            tp[c] += ((gt == c) & (pred == c) & valid).sum()
            fp[c] += ((gt != c) & (pred == c) & valid).sum()
            fn[c] += ((gt == c) & (pred != c) & valid).sum()
    return [tp[c] / (tp[c] + fp[c] + fn[c]) if tp[c] + fp[c] + fn[c] else None for c in range(k)]


def paint(preds: list[tuple[np.ndarray, int]], shape: tuple[int, int], index: dict[int, int]) -> np.ndarray:
    out = np.full(shape, 255, dtype=np.int64)
    for mask, category_id in reversed(preds):  # earlier segments win: paint them last
        out[mask] = index[category_id]
    return out


def test_miou_on_synthetic_masks_equals_reference(synthetic: dict[str, Any], tmp_path: Path) -> None:
    root = synthetic["root"]
    config = EvaluateConfig(synthetic["predictions"], str(root / "semantic"), "semantic", json_out=str(tmp_path / "s"))
    assert run(config) == 0  # classes from panoptic.json beside the folder
    metrics = json.loads((tmp_path / "s").read_text())["metrics"]
    pairs = []
    for image, _ in synthetic["scenes"]:
        gt = np.asarray(Image.open(root / "semantic" / image["file_name"])).astype(np.int64)
        preds = [(m, c) for m, c, _ in synthetic["preds"].get(image["file_name"], [])]
        pairs.append((gt, paint(preds, gt.shape, INDEX)))
    expected = reference_iou(pairs, len(CATEGORY_IDS))
    assert [c["class"] for c in metrics["per_class"]] == CLASS_NAMES
    assert [c["iou"] for c in metrics["per_class"]] == pytest.approx(expected, abs=1e-12)
    assert metrics["mIoU"] == pytest.approx(np.mean([v for v in expected if v is not None]), abs=1e-12)


def test_miou_hand_built_with_categories_json_and_ignore(tmp_path: Path) -> None:
    # Classes listed out of order: sorted by id, index 0 = "sky" (id 4), index 1 = "ground" (id 5).
    folder = tmp_path / "labels"
    folder.mkdir()
    (folder / "categories.json").write_text(json.dumps([{"id": 5, "name": "ground"}, {"id": 4, "name": "sky"}]))
    gt = np.array([[0, 0, 0, 0], [0, 0, 255, 255], [1, 1, 1, 1], [1, 1, 1, 1]], dtype=np.uint8)
    Image.fromarray(gt).save(folder / "x.png")
    sky = np.zeros((4, 4), dtype=bool)
    sky[:3] = True  # 12 px: 6 on sky, 2 on ignore, 4 on ground
    ground = np.zeros((4, 4), dtype=bool)
    ground[3, :2] = True  # 2 px on ground; the other 2 ground pixels are left unlabelled
    predictions = write_parts(
        tmp_path / "out", [pred_row("x.jpg", segments_of([sky, ground], [4, 5], [0.9, 0.8]), 4, 4)]
    )
    code, output, report = evaluate_cli(
        predictions, str(folder), "--gt-format", "semantic", "--json", str(tmp_path / "m")
    )
    assert code == 0, output
    # sky: tp 6, fp 4, fn 0 -> 0.6; ground: tp 2, fp 0, fn 6 -> 0.25
    assert [c["iou"] for c in report["metrics"]["per_class"]] == pytest.approx([0.6, 0.25])
    assert report["metrics"]["mIoU"] == pytest.approx(0.425)
    assert report["metrics"]["pixel_accuracy"] == pytest.approx(8 / 14)
    # The class list may live anywhere when named explicitly.
    elsewhere = tmp_path / "classes.json"
    (folder / "categories.json").rename(elsewhere)
    assert run(EvaluateConfig(predictions, str(folder), "semantic", json_out=str(tmp_path / "m2"))) == 2
    config = EvaluateConfig(
        predictions, str(folder), "semantic", json_out=str(tmp_path / "m2"), categories=str(elsewhere)
    )
    assert run(config) == 0
    assert json.loads((tmp_path / "m2").read_text())["metrics"]["mIoU"] == pytest.approx(0.425)


# ------------------------------------------------------------------------------------------------
# export-coco
# ------------------------------------------------------------------------------------------------


def test_export_coco_without_gt_uses_stable_ids(synthetic: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    result = runner.invoke(app, ["export-coco", synthetic["predictions"], str(out)])
    assert result.exit_code == 0, result.output
    results = json.loads(out.read_text())
    rows = synthetic["rows"]
    assert len(results) == sum(len(r["segments"]) for r in rows)
    expected_ids = {int(image_id(r["image_uri"])[:15], 16) for r in rows}
    assert {r["image_id"] for r in results} == expected_ids
    assert stable_image_id(rows[0]["image_id"]) == int(rows[0]["image_id"][:15], 16)
    assert all(isinstance(r["segmentation"]["counts"], str) for r in results)
    assert f"wrote {len(results)} results from 6 images" in result.output
    coco = COCO()
    coco.dataset = {"images": [{"id": i} for i in expected_ids], "annotations": [], "categories": []}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
        loaded = coco.loadRes(str(out))
    assert len(loaded.getAnnIds()) == len(results)


def test_export_coco_with_gt_uses_its_ids_and_skips_unmatched(synthetic: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    gt = synthetic["root"] / "instances.json"
    assert export_coco(synthetic["predictions"], str(out), str(gt)) == 0
    results = json.loads(out.read_text())
    assert len(results) == sum(len(r["segments"]) for r in synthetic["rows"][:5])  # not-in-gt.png skipped
    assert {r["image_id"] for r in results} == {1, 2, 3, 4, 5}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(gt))
        loaded = coco_gt.loadRes(str(out))
    assert len(loaded.getAnnIds()) == len(results)
    first = results[0]["segmentation"]
    decoded = mask_utils.decode({"size": first["size"], "counts": first["counts"].encode("ascii")})
    assert decoded.shape == tuple(first["size"]) and decoded.any()
    result = runner.invoke(app, ["export-coco", synthetic["predictions"], str(out), "--gt", str(gt)])
    assert result.exit_code == 0 and "1 images skipped" in result.output


# ------------------------------------------------------------------------------------------------
# Object storage and bad input
# ------------------------------------------------------------------------------------------------


def test_predictions_and_metrics_on_s3(tmp_path: Path, s3_fs, s3_bucket: str, s3_server: str) -> None:
    gt_json = write_panoptic_gt(tmp_path, ["a.png"])
    perfect = hand_predictions("perfect")
    local = write_parts(
        tmp_path / "out", [pred_row("a.png", segments_of([m for m, _ in perfect], [1, 4, 5], [0.9, 0.8, 0.7]), 10, 10)]
    )
    s3_fs.put(f"{local}/part-00000.parquet", f"{s3_bucket}/run/part-00000.parquet")
    s3_fs.pipe(f"{s3_bucket}/run/_runs/run-1.json", b"{}")
    code, output, _ = evaluate_cli(
        f"s3://{s3_bucket}/run", str(gt_json), "--json", f"s3://{s3_bucket}/eval/pq.json", "--endpoint-url", s3_server
    )
    assert code == 0, output
    s3_fs.invalidate_cache()
    report = json.loads(s3_fs.cat(f"{s3_bucket}/eval/pq.json"))
    assert report["metrics"]["All"]["pq"] == 1.0
    assert report["predictions"] == f"s3://{s3_bucket}/run"


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing_predictions", "predictions not found"),
        ("no_parquet", "no *.parquet files"),
        ("instances_as_panoptic", "segments_info"),
        ("panoptic_as_instances", "segmentation"),
        ("not_json", "not valid JSON"),
        ("missing_gt", "ground truth not found"),
        ("semantic_without_classes", "no class list"),
        ("masks_with_instances", "--masks applies to coco-panoptic only"),
        ("no_match", "no predicted image (1 ok) (e.g. zzz.png) has a file name listed in"),
        ("size_mismatch", "was segmented at 12x10"),
    ],
)
def test_bad_input_exits_2_with_a_clear_message(case: str, message: str, tmp_path: Path) -> None:
    gt_json = write_panoptic_gt(tmp_path, ["a.png"])
    size = (10, 12) if case == "size_mismatch" else (10, 10)
    name = "zzz.png" if case == "no_match" else "a.png"
    predictions = write_parts(tmp_path / "out", [pred_row(name, [], *size)])
    instances = tmp_path / "instances.json"
    instances.write_text(json.dumps({"images": [], "annotations": [{"id": 1, "image_id": 1}], "categories": []}))
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "empty").mkdir()
    (tmp_path / "labels").mkdir()
    Image.fromarray(np.zeros((10, 10), dtype=np.uint8)).save(tmp_path / "labels" / "a.png")
    args = {
        "missing_predictions": [str(tmp_path / "nope"), str(gt_json)],
        "no_parquet": [str(tmp_path / "empty"), str(gt_json)],
        "instances_as_panoptic": [predictions, str(instances)],
        "panoptic_as_instances": [predictions, str(gt_json), "--gt-format", "coco-instances"],
        "not_json": [predictions, str(tmp_path / "bad.json")],
        "missing_gt": [predictions, str(tmp_path / "absent.json")],
        "semantic_without_classes": [predictions, str(tmp_path / "labels"), "--gt-format", "semantic"],
        "masks_with_instances": [predictions, str(instances), "--gt-format", "coco-instances", "--masks", "x"],
        "no_match": [predictions, str(gt_json)],
        "size_mismatch": [predictions, str(gt_json)],
    }[case]
    code, output, _ = evaluate_cli(*args)
    assert code == 2, output
    assert message in output
    assert "Traceback" not in output
    if case == "missing_predictions":
        assert export_coco(str(tmp_path / "nope"), str(tmp_path / "r.json")) == 2
