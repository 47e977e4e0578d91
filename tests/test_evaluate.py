"""`m2f evaluate` and `m2f export-coco` on real Parquet files and real ground truth.

Mask AP is checked against pycocotools' COCOeval run here on the same predictions, PQ against exact
values worked out by hand and a slow reference over boolean masks, mIoU against per-class pixel
counts. Predictions are written with `pipeline.schema` and `pipeline.encode`, as `m2f segment` does.

The panoptic export is scored by `panoptic_files_pq`, written here from the COCO panoptic format
(panopticapi is not on PyPI): it reads the exported PNGs and JSON as `pq_compute` does, checks what
`pq_compute` checks, and must give `m2f evaluate`'s PQ on the same predictions.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections import defaultdict
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

from m2f.cli import app
from m2f.jobs.evaluate.export_coco import export_coco, stable_image_id
from m2f.jobs.evaluate.job import EvaluateConfig, run
from m2f.pipeline.encode import encode_segments, image_stats
from m2f.pipeline.metrics.coco_ap import COCO_STAT_NAMES
from m2f.pipeline.schema import error_row, image_id, ok_row, rows_to_table
from m2f.pipeline.training.synthetic import SYNTHETIC_CATEGORIES, THING_IDS, generate

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


def pred_row(
    name: str,
    segments: list[dict[str, Any]],
    h: int,
    w: int,
    *,
    minutes: int = 0,
    task: str = "panoptic",
    run_id: str = "run-1",
) -> dict[str, Any]:
    row = ok_row(
        f"{IMAGE_DIR}/{name}",
        width=w,
        height=h,
        segments=segments,
        stats=image_stats(segments, h, w),
        inference_ms=1.0,
        task=task,
        model="test@sha256:0",
        run_id=run_id,
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
    target = args[args.index("--json") + 1] if "--json" in args else None
    if target == "-" and result.exit_code == 0:
        report = json.loads(result.stdout.splitlines()[-1])
    elif target and result.exit_code == 0 and "://" not in target:
        report = json.loads(Path(target).read_text())
    return result.exit_code, result.output, report


def with_run_report(folder: str, run_id: str, score_threshold: float | None) -> None:
    """The run report `m2f segment` writes beside its rows, reduced to what evaluate reads."""
    (Path(folder) / "_runs").mkdir(exist_ok=True)
    report = {"run_id": run_id, "config": {"score_threshold": score_threshold}}
    (Path(folder) / "_runs" / f"{run_id}.json").write_text(json.dumps(report))


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
    # Panoptic segments scored as instances: allowed, with a warning in the output and the JSON.
    assert report["runs"] == [{"run_id": "run-1", "task": "panoptic", "images": 6, "score_threshold": None}]
    assert any("panoptic segments do not overlap" in w for w in report["warnings"])
    assert "warning: 6 predicted images come from panoptic run(s) run-1" in output


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


def thing_rows(synthetic: dict[str, Any], task: str, run_id: str) -> list[dict[str, Any]]:
    """Exact thing masks of every synthetic scene, as rows of one run of `task`."""
    rows = []
    for image, gt in synthetic["scenes"]:
        things = [(m, c) for m, c in gt if c in THING_IDS]
        segments = segments_of([m for m, _ in things], [c for _, c in things], [0.9] * len(things))
        rows.append(pred_row(image["file_name"], segments, image["height"], image["width"], task=task, run_id=run_id))
    return rows


@pytest.mark.parametrize("threshold", [0.5, 0.0, None])
def test_score_threshold_of_the_run_report_is_warned_about_for_ap(
    threshold: float | None, synthetic: dict[str, Any], tmp_path: Path
) -> None:
    predictions = write_parts(tmp_path / "out", thing_rows(synthetic, "instance", "run-t"))
    if threshold is not None:
        with_run_report(predictions, "run-t", threshold)
    gt = str(synthetic["root"] / "instances.json")
    code, output, report = evaluate_cli(predictions, gt, "--gt-format", "coco-instances", "--json", "-")
    assert code == 0, output
    assert report["runs"] == [{"run_id": "run-t", "task": "instance", "images": 6, "score_threshold": threshold}]
    warned = [w for w in report["warnings"] if "--score-threshold" in w]
    if threshold:
        assert warned == [
            "run run-t (6 images) kept only segments scoring >= 0.5 (--score-threshold): mask AP ranks all "
            "detections, up to 100 per image, so the threshold lowers AP; segment with --score-threshold 0 for "
            "an AP comparable with COCO's"
        ]
        assert f"warning: {warned[0]}" in output
    else:
        assert warned == [] and report["warnings"] == []  # an unknown threshold (no report) is not warned about
    # PQ is computed from thresholded panoptic output by design: no warning there.
    panoptic = str(synthetic["root"] / "panoptic.json")
    code, output, report = evaluate_cli(predictions, panoptic, "--json", "-")
    assert code == 0 and not any("--score-threshold" in w for w in report["warnings"])


def test_json_dash_prints_the_metrics_as_the_last_line_of_stdout(synthetic: dict[str, Any], tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["evaluate", synthetic["predictions"], str(synthetic["root"] / "panoptic.json"), "--json", "-"]
    )
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 1  # nothing but the JSON, in one line
    report = json.loads(lines[-1])
    assert set(report) == {"gt_format", "predictions", "ground_truth", "images", "runs", "warnings", "metrics"}
    assert report["images"]["matched"] == 5
    assert len(report["warnings"]) == 2  # one unmatched prediction, one GT image without prediction
    assert "pq" in result.stderr and "Things" in result.stderr
    assert "warning: 1 predicted images are not in the ground truth: not-in-gt.png" in result.stderr
    # The same report as --json FILE writes.
    out = tmp_path / "m.json"
    code, output, from_file = evaluate_cli(
        synthetic["predictions"], str(synthetic["root"] / "panoptic.json"), "--json", str(out)
    )
    assert code == 0 and from_file == report
    assert "metrics written to" in output
    # A bad input leaves stdout empty: a scheduler finds no JSON and the exit code says why.
    result = runner.invoke(app, ["evaluate", str(tmp_path / "nope"), str(out), "--json", "-"])
    assert result.exit_code == 2 and result.stdout == "" and "predictions not found" in result.stderr


def test_semantic_runs_are_refused_for_ap_and_warned_about_for_pq(synthetic: dict[str, Any], tmp_path: Path) -> None:
    predictions = write_parts(tmp_path / "out", thing_rows(synthetic, "semantic", "run-s"))
    instances = str(synthetic["root"] / "instances.json")
    result = runner.invoke(app, ["evaluate", predictions, instances, "--gt-format", "coco-instances", "--json", "-"])
    assert result.exit_code == 2, result.output
    assert result.stdout == "" and "Traceback" not in result.output
    assert "6 predicted images come from semantic run(s) run-s" in result.stderr
    assert "not instance AP" in result.stderr
    code, output, report = evaluate_cli(predictions, str(synthetic["root"] / "panoptic.json"), "--json", "-")
    assert code == 0, output
    assert report["warnings"] == [
        "6 predicted images come from semantic run(s) run-s: a semantic segment merges every instance of its "
        "class, so PQ Things is not panoptic PQ (PQ Stuff is)"
    ]
    # The semantic metric of a semantic run: nothing to warn about.
    code, output, report = evaluate_cli(
        predictions, str(synthetic["root"] / "semantic"), "--gt-format", "semantic", "--json", "-"
    )
    assert code == 0 and report["warnings"] == []
    # An export is a conversion: it warns, and leaves the choice to whoever scores the file.
    result = runner.invoke(app, ["export-coco", predictions, str(tmp_path / "r.json")])
    assert result.exit_code == 0 and "warning: 6 predicted images come from semantic run(s)" in result.output


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


def test_export_coco_without_gt_uses_52_bit_ids_and_leaves_out_stuff(synthetic: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    result = runner.invoke(app, ["export-coco", synthetic["predictions"], str(out)])
    assert result.exit_code == 0, result.output
    results = json.loads(out.read_text())
    rows = synthetic["rows"]
    segments = [s for r in rows for s in r["segments"]]
    things = [s for s in segments if s["is_thing"]]
    assert 0 < len(things) < len(segments)  # the synthetic scenes have sky and ground
    assert len(results) == len(things)
    assert {r["category_id"] for r in results} <= set(THING_IDS)
    expected_ids = {int(image_id(r["image_uri"])[:13], 16) for r in rows}
    assert {r["image_id"] for r in results} == expected_ids
    assert stable_image_id(rows[0]["image_id"]) == int(rows[0]["image_id"][:13], 16)
    assert all(0 < i < 2**52 for i in expected_ids)
    # A reader that parses every number as a double (JavaScript, jq) gets the same ids.
    as_doubles = json.loads(out.read_text(), parse_int=float)
    assert [int(r["image_id"]) for r in as_doubles] == [r["image_id"] for r in results]
    assert all(isinstance(r["segmentation"]["counts"], str) for r in results)
    assert f"wrote {len(results)} results from 6 images" in result.output
    assert f"{len(segments) - len(things)} stuff segments (is_thing false) left out" in result.output
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
    things = [s for r in synthetic["rows"][:5] for s in r["segments"] if s["is_thing"]]  # not-in-gt.png skipped
    assert len(results) == len(things)
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


def test_export_coco_refuses_two_images_on_one_52_bit_id(tmp_path: Path) -> None:
    rows = [
        pred_row("a.png", [], 10, 10) | {"image_id": "0123456789abc000"},
        pred_row("b.png", [], 10, 10) | {"image_id": "0123456789abcfff"},  # the same first 13 hex digits
    ]
    predictions = write_parts(tmp_path / "out", rows)
    result = runner.invoke(app, ["export-coco", predictions, str(tmp_path / "r.json")])
    assert result.exit_code == 2
    assert "share the first 13 hex digits" in result.output and "--gt" in result.output
    result = runner.invoke(app, ["export-coco", predictions, str(tmp_path / "r.json"), "--format", "detections"])
    assert result.exit_code == 2 and "--format must be one of" in result.output


# ------------------------------------------------------------------------------------------------
# export-coco --format panoptic, scored from its files
# ------------------------------------------------------------------------------------------------


def read_id_png(path: Path) -> np.ndarray:
    """(H, W) segment ids of a COCO panoptic PNG, read as pq_compute reads it: the pixels as they are
    stored, no mode conversion, so anything but a 3-channel RGB PNG fails here as it would there."""
    pixels = np.array(Image.open(path), dtype=np.uint32)
    assert pixels.ndim == 3 and pixels.shape[2] == 3, f"{path} is not an RGB PNG"
    return pixels[..., 0] + 256 * pixels[..., 1] + 256 * 256 * pixels[..., 2]


def panoptic_files_pq(gt_json: Path, pred_json: Path) -> dict[str, Any]:
    """PQ / SQ / RQ of COCO panoptic prediction files against COCO panoptic GT files.

    Written from the format's definition: each JSON's PNG folder is the JSON's path without
    `.json`; annotations meet by image_id and every GT image needs a prediction; the ids in a
    predicted PNG (0 = void) and its segments_info must be the same set, and every predicted
    category must be a GT category. A GT and a predicted segment of one category match when
    IoU > 0.5, the union leaving out predicted pixels on void; unmatched predictions lying more
    than half on void or on a crowd region of their category are not false positives.
    """
    gt, pred = json.loads(gt_json.read_text()), json.loads(pred_json.read_text())
    gt_dir, pred_dir = gt_json.with_suffix(""), pred_json.with_suffix("")
    isthing = {c["id"]: bool(c["isthing"]) for c in gt["categories"]}
    predictions = {a["image_id"]: a for a in pred["annotations"]}
    tally: dict[int, list[float]] = defaultdict(lambda: [0.0, 0, 0, 0])  # category -> [iou sum, tp, fp, fn]
    for gt_ann in gt["annotations"]:
        pred_ann = predictions[gt_ann["image_id"]]
        gt_ids = read_id_png(gt_dir / gt_ann["file_name"])
        pred_ids = read_id_png(pred_dir / pred_ann["file_name"])
        assert gt_ids.shape == pred_ids.shape
        gt_segments = {s["id"]: s for s in gt_ann["segments_info"]}
        pred_segments = {s["id"]: s for s in pred_ann["segments_info"]}
        assert set(np.unique(pred_ids).tolist()) - {0} == set(pred_segments), "PNG and segments_info disagree"
        assert all(s["category_id"] in isthing for s in pred_segments.values()), "unknown category"
        void = gt_ids == 0
        matched_gt, matched_pred = set(), set()
        for g, gs in gt_segments.items():
            if gs.get("iscrowd", 0):
                continue
            for p, ps in pred_segments.items():
                if gs["category_id"] != ps["category_id"]:
                    continue
                g_mask, p_mask = gt_ids == g, pred_ids == p
                inter = int((g_mask & p_mask).sum())
                union = int(g_mask.sum() + p_mask.sum()) - inter - int((p_mask & void).sum())
                if inter / union > 0.5:
                    tally[gs["category_id"]][0] += inter / union
                    tally[gs["category_id"]][1] += 1
                    matched_gt.add(g)
                    matched_pred.add(p)
        for g, gs in gt_segments.items():
            if g not in matched_gt and not gs.get("iscrowd", 0):
                tally[gs["category_id"]][3] += 1
        for p, ps in pred_segments.items():
            if p in matched_pred:
                continue
            p_mask = pred_ids == p
            crowd = [
                g for g, gs in gt_segments.items() if gs.get("iscrowd", 0) and gs["category_id"] == ps["category_id"]
            ]
            ignored = int((p_mask & (void | np.isin(gt_ids, crowd))).sum())
            if ignored / p_mask.sum() <= 0.5:
                tally[ps["category_id"]][2] += 1

    def average(things: bool | None) -> dict[str, float]:
        values = []
        for c, thing in isthing.items():
            iou, tp, fp, fn = tally.get(c, [0.0, 0, 0, 0])
            if (things is None or thing == things) and tp + fp + fn:
                values.append((iou / (tp + fp / 2 + fn / 2), iou / tp if tp else 0.0, tp / (tp + fp / 2 + fn / 2)))
        pq, sq, rq = np.mean(values, axis=0) if values else (0.0, 0.0, 0.0)
        return {"pq": pq, "sq": sq, "rq": rq, "n": len(values)}

    return {"All": average(None), "Things": average(True), "Stuff": average(False)}


def test_panoptic_export_scores_like_evaluate(synthetic: dict[str, Any], tmp_path: Path) -> None:
    gt = synthetic["root"] / "panoptic.json"
    out = tmp_path / "panoptic_pred.json"
    result = runner.invoke(
        app, ["export-coco", synthetic["predictions"], str(out), "--gt", str(gt), "--format", "panoptic"]
    )
    assert result.exit_code == 0, result.output
    assert "wrote 6 panoptic annotations" in result.output  # five predicted, and the sixth GT image empty
    assert "1 ground-truth images have no ok prediction: written as empty" in result.output
    document = json.loads(out.read_text())
    assert sorted(a["image_id"] for a in document["annotations"]) == [1, 2, 3, 4, 5, 6]
    assert document["categories"] == json.loads(gt.read_text())["categories"]
    assert sorted(p.name for p in (tmp_path / "panoptic_pred").iterdir()) == sorted(
        a["file_name"] for a in document["annotations"]
    )
    code, output, report = evaluate_cli(synthetic["predictions"], str(gt), "--json", "-")
    assert code == 0, output
    assert_groups(report["metrics"], panoptic_files_pq(gt, out))
    assert 0.2 < report["metrics"]["All"]["pq"] < 0.95


def test_panoptic_export_encodes_ids_and_lists_only_visible_segments(tmp_path: Path) -> None:
    _, _, gt = hand_gt()
    inner = np.zeros((10, 10), dtype=bool)
    inner[2:3, 2:3] = True  # inside the circle, with a lower score: hidden where masks overlap
    segments = segments_of([gt["circle"], gt["sky"], gt["ground"], inner], [1, 4, 5, 2], [0.9, 0.8, 0.7, 0.6])
    for segment, new_id in zip(segments, [CIRCLE_ID, SKY_ID, GROUND_ID, 9], strict=True):
        segment["id"] = new_id  # ids in all three PNG channels
    predictions = write_parts(tmp_path / "out", [pred_row("a.jpg", segments, 10, 10, task="instance")])
    out = tmp_path / "pan.json"
    assert export_coco(predictions, str(out), result_format="panoptic") == 0
    document = json.loads(out.read_text())
    (annotation,) = document["annotations"]
    stable = stable_image_id(image_id(f"{IMAGE_DIR}/a.jpg"))
    assert annotation["image_id"] == stable and annotation["file_name"] == "a.png"
    assert document["images"] == [{"id": stable, "file_name": "a.jpg", "height": 10, "width": 10}]
    ids = read_id_png(tmp_path / "pan" / "a.png")
    assert set(np.unique(ids).tolist()) == {CIRCLE_ID, SKY_ID, GROUND_ID}
    np.testing.assert_array_equal(ids == CIRCLE_ID, gt["circle"])
    info = {s["id"]: s for s in annotation["segments_info"]}
    assert set(info) == {CIRCLE_ID, SKY_ID, GROUND_ID}  # the hidden segment 9 is not listed
    assert info[CIRCLE_ID] | {"score": None} == {
        "id": CIRCLE_ID,
        "category_id": 1,
        "iscrowd": 0,
        "isthing": True,
        "area": 9,
        "bbox": [1, 1, 3, 3],
        "score": None,
    }
    assert info[SKY_ID]["area"] == 50 - 9 and info[SKY_ID]["isthing"] is False
    assert [c["id"] for c in document["categories"]] == [1, 2, 4, 5]  # those the segments name
    # Scored from its own files (the export is a valid panoptic GT too): a perfect match.
    metrics = panoptic_files_pq(out, out)
    assert metrics["All"] == {"pq": 1.0, "sq": 1.0, "rq": 1.0, "n": 3}
    # Against a GT, segments of categories it does not list are refused, as pq_compute refuses them.
    gt_json = write_panoptic_gt(tmp_path, ["a.jpg"])
    data = json.loads(gt_json.read_text())
    data["categories"] = [c for c in data["categories"] if c["id"] != 2]
    gt_json.write_text(json.dumps(data))
    result = runner.invoke(app, ["export-coco", predictions, str(out), "--gt", str(gt_json), "--format", "panoptic"])
    assert result.exit_code == 2 and "category ids [2] are not among the categories" in result.output
    result = runner.invoke(app, ["export-coco", predictions, str(tmp_path / "pan.txt"), "--format", "panoptic"])
    assert result.exit_code == 2 and "must end in .json" in result.output


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
        ("no_parquet", "no part-*.parquet files"),
        ("instances_as_panoptic", "segments_info"),
        ("panoptic_as_instances", "segmentation"),
        ("not_json", "not valid JSON"),
        ("missing_gt", "ground truth not found"),
        ("semantic_without_classes", "no class list"),
        ("masks_with_instances", "--masks applies to coco-panoptic only"),
        ("no_match", "no predicted image (1 ok) (e.g. zzz.png) has a file name listed in"),
        ("size_mismatch", "was segmented at 12x10"),
        ("gt_image_without_file_name", "images[0] lacks 'file_name'"),
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
    nameless = json.loads(gt_json.read_text())
    del nameless["images"][0]["file_name"]  # a KeyError deep in the scorer, were it not checked where it is read
    (tmp_path / "nameless.json").write_text(json.dumps(nameless))
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
        "gt_image_without_file_name": [predictions, str(tmp_path / "nameless.json"), "--masks", str(tmp_path)],
    }[case]
    code, output, _ = evaluate_cli(*args)
    assert code == 2, output
    assert message in output
    assert "Traceback" not in output
    if case == "missing_predictions":
        assert export_coco(str(tmp_path / "nope"), str(tmp_path / "r.json")) == 2
