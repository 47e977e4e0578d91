"""The compact hand-over (`pipeline.compact`) and the encode stage (`pipeline.handover.encode_rows`) against
the slow, obviously-correct reference: the full (N, H, W) masks of post-processing, encoded one by one with
`encode_segments`, as the model actor did before. Rows must be identical: RLE bytes, areas, boxes, scores,
statistics, for all three tasks, on real output of the tiny test models and on hand-made edge cases.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import torch

from m2f import model
from m2f.model.postprocess import Segments, postprocess
from m2f.model.preprocess import to_batch
from m2f.pipeline.compact import CompactPrediction, compact, id_map_dtype, pack_crops, unpack_crops
from m2f.pipeline.encode import encode_segments, image_stats
from m2f.pipeline.handover import COMPACT_SCHEMA, compact_row, compact_table, encode_rows
from m2f.pipeline.infer import Segmenter
from m2f.pipeline.predictor import Predictor
from m2f.pipeline.schema import OUTPUT_SCHEMA, ok_row, rows_to_table
from tests.test_infer import as_numpy_batch, png, prepared, tiny_model_file

TASKS = ("semantic", "instance", "panoptic")
VOLATILE = ("processed_at", "inference_ms")  # when and how fast: not the content


@pytest.fixture(scope="module")
def task_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("models")
    return {task: tiny_model_file(folder / f"{task}.safetensors", task=task, seed=3) for task in TASKS}


@pytest.fixture(scope="module")
def image_files(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for k, (w, h) in enumerate([(40, 30), (60, 45), (30, 40), (100, 20), (33, 33)]):
        path = folder / f"{k}.png"
        path.write_bytes(png(w, h, seed=10 + k))
        paths.append(str(path))
    return paths


def reference_rows(predictor: Predictor, batch: dict[str, np.ndarray], model_name: str) -> list[dict[str, Any]]:
    """The old actor's rows: full masks to the host, threshold and empty instances dropped there, then
    `encode_segments` mask by mask and `image_stats`."""
    rows = []
    for i in range(len(batch["image_uri"])):
        h, w = int(batch["image_height"][i]), int(batch["image_width"][i])
        image = np.frombuffer(batch["image"][i], np.uint8).reshape(h, w, 3).copy()
        segments = full_mask_segments(predictor, image, (int(batch["height"][i]), int(batch["width"][i])))
        height, width = int(batch["height"][i]), int(batch["width"][i])
        stats = image_stats(segments, height, width, semantic=predictor.task == "semantic")
        rows.append(
            ok_row(
                str(batch["image_uri"][i]),
                width=width,
                height=height,
                segments=segments,
                stats=stats,
                inference_ms=1.0,
                task=predictor.task,
                model=model_name,
                run_id="r",
                source_bytes=int(batch["source_bytes"][i]),
            )
        )
    return rows


def full_mask_segments(predictor: Predictor, image: np.ndarray, output_size: tuple[int, int]) -> list[dict]:
    with torch.inference_mode():
        pixels, sizes = to_batch([image], predictor.config.preprocess)  # (1, 3, Hp, Wp)
        out = predictor.net(pixels)
        (seg,) = postprocess(
            predictor.task,
            out.class_logits,
            out.mask_logits,
            config=predictor.config,
            image_sizes=sizes,
            output_sizes=[output_size],
            padded_size=tuple(pixels.shape[-2:]),
        )
    return reference_segments(predictor, seg)


def reference_segments(predictor: Predictor, seg: Segments) -> list[dict[str, Any]]:
    masks, labels, scores = seg.masks.numpy(), seg.labels.numpy(), seg.scores.numpy()  # (N, H, W), (N,), (N,)
    keep = scores >= predictor.score_threshold
    if predictor.task == "instance":
        keep &= masks.reshape(len(masks), -1).any(axis=1)
    cfg = predictor.config
    return encode_segments(
        masks[keep],
        labels[keep],
        scores[keep],
        class_names=cfg.class_names,
        is_thing=cfg.is_thing,
        category_ids=cfg.category_ids or None,
    )


def content(table: pa.Table) -> list[dict[str, Any]]:
    return [{k: v for k, v in row.items() if k not in VOLATILE} for row in table.to_pylist()]


@pytest.mark.parametrize("threshold", [None, 1.01])  # 1.01: every segment dropped, an empty prediction
@pytest.mark.parametrize("task", TASKS)
def test_rows_from_the_compact_form_equal_rows_from_full_masks(
    task_models: dict[str, str], image_files: list[str], task: str, threshold: float | None, one_thread
) -> None:
    path = task_models[task]
    threshold = 0.0 if threshold is None else threshold
    # One image per forward pass, as the reference runs: batched passes may round differently (oneDNN).
    segmenter = Segmenter(path, run_id="r", task=task, batch_size=1, score_threshold=threshold)
    batch = as_numpy_batch(prepared(image_files))
    compact_rows = segmenter(batch)
    assert compact_rows.schema == COMPACT_SCHEMA
    new = encode_rows(compact_rows)
    assert new.schema == OUTPUT_SCHEMA
    reference = rows_to_table(reference_rows(segmenter.predictor, batch, segmenter.model_name))
    assert content(new) == content(reference)  # RLE bytes, areas, boxes, scores, statistics, all of it
    counts = [r["segment_count"] for r in new.to_pylist()]
    assert (sum(counts) == 0) == (threshold > 1), counts
    formats = set(compact_rows["mask_format"].to_pylist())
    assert formats == ({"crops"} if task == "instance" else {"uint8"})


def test_real_instance_output_has_overlaps_and_border_masks(task_models: dict[str, str], image_files, one_thread):
    """The instance case above is only a check if the model's masks overlap and touch the border: they do."""
    predictor = Predictor(model.load(task_models["instance"]), task="instance")
    batch = as_numpy_batch(prepared(image_files))
    overlap = border = 0
    for i in range(len(image_files)):
        h, w = int(batch["image_height"][i]), int(batch["image_width"][i])
        image = np.frombuffer(batch["image"][i], np.uint8).reshape(h, w, 3)
        (prediction,) = predictor.predict([image], [(int(batch["height"][i]), int(batch["width"][i]))])
        masks = prediction.masks()  # (N, H, W)
        overlap += int((masks.sum(0) > 1).any())
        border += sum(m[0].any() or m[-1].any() or m[:, 0].any() or m[:, -1].any() for m in masks)
    assert overlap and border


def instance_segments(h: int = 13, w: int = 17) -> Segments:
    """Hand-made instance masks: overlapping, touching each border, the whole image, one pixel, a full-height
    column (its runs join across columns), one empty and one below a 0.3 threshold."""
    masks = torch.zeros(8, h, w, dtype=torch.bool)
    masks[0, 2:9, 3:12] = True
    masks[1, 5:13, 8:17] = True  # overlaps 0; bottom and right borders
    masks[2] = True  # the whole image
    masks[3, 0, 0] = True  # one pixel in the corner
    masks[4, :, 5:7] = True  # full height: a run from one column's bottom into the next one's top
    masks[6, 4:6, 0:3] = True  # left border; scored below the threshold
    masks[7, 0:2, 10:12] = True  # top border
    labels = torch.tensor([2, 2, 0, 1, 2, 2, 1, 0])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.95, 0.1, 0.4])  # 5: an empty mask, however it scores
    return Segments(masks=masks, labels=labels, scores=scores)


@pytest.mark.parametrize("threshold", [0.0, 0.3])
def test_hand_made_instance_edge_cases(task_models: dict[str, str], threshold: float) -> None:
    predictor = Predictor(model.load(task_models["instance"]), task="instance", score_threshold=threshold)
    seg = instance_segments()
    prediction = compact("instance", seg, threshold)
    assert len(prediction.scores) == (6 if threshold else 7)  # the empty mask is never kept
    expected = reference_segments(predictor, seg)
    assert predictor.encode(prediction) == expected
    classes = predictor.classes(prediction)
    row = compact_row("/x.png", prediction, classes, model="m", run_id="r", inference_ms=1.0, source_bytes=5)
    (out,) = encode_rows(compact_table([row])).to_pylist()
    assert out["status"] == "ok" and out["segment_count"] == len(expected)
    assert [s["rle"]["counts"] for s in out["segments"]] == [s["rle"]["counts"] for s in expected]
    assert [s["area"] for s in out["segments"]] == [s["area"] for s in expected]
    stats = image_stats(expected, 13, 17)  # two overlapping masks of one class: their union, counted once
    assert [f["fraction"] for f in out["class_fractions"]] == pytest.approx(
        [f["fraction"] for f in stats["class_fractions"]]
    )


def test_id_maps_take_the_smallest_dtype_and_round_trip() -> None:
    assert [id_map_dtype(n) for n in (0, 255, 256, 32767, 32768)] == [torch.uint8, torch.uint8] + [torch.int16] * 2 + [
        torch.int32
    ]
    h, w, n = 20, 30, 300  # 300 disjoint segments: an int16 map
    owner = torch.arange(h * w).view(h, w) % (n + 1)  # 0 = void
    masks = owner[None] == torch.arange(1, n + 1)[:, None, None]  # (N, H, W)
    seg = Segments(masks=masks, labels=torch.zeros(n, dtype=torch.int64), scores=torch.ones(n))
    prediction = compact("semantic", seg, 0.0)
    assert prediction.id_map.dtype == np.int16
    np.testing.assert_array_equal(prediction.masks(), masks.numpy())
    panoptic = compact("panoptic", Segments(masks=masks, labels=seg.labels, scores=seg.scores, panoptic=owner.int()), 0)
    np.testing.assert_array_equal(panoptic.panoptic, owner.numpy())


@pytest.mark.parametrize("use_numpy", [False, True])  # the torch ops a GPU runs, numpy's on a CPU
def test_pack_crops_is_np_packbits(use_numpy: bool) -> None:
    masks = torch.rand(5, 23, 19, generator=torch.Generator().manual_seed(0)) > 0.6  # (N, H, W)
    boxes = torch.tensor(
        [[0, 0, 23, 19], [3, 4, 9, 5], [22, 18, 23, 19], [1, 2, 4, 17], [5, 0, 6, 19]], dtype=torch.int32
    )
    bits = pack_crops(masks, boxes, use_numpy=use_numpy).numpy()
    crops = [masks[i, y0:y1, x0:x1].numpy() for i, (y0, x0, y1, x1) in enumerate(boxes.tolist())]
    np.testing.assert_array_equal(bits, np.concatenate([np.packbits(c.ravel()) for c in crops]))
    for got, want in zip(unpack_crops(boxes.numpy(), bits), crops, strict=True):
        np.testing.assert_array_equal(got, want)


def test_error_rows_pass_through_and_a_corrupt_row_fails_alone(task_models: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "bad.png").write_text("not an image")
    files = [str(tmp_path / "missing.png"), str(tmp_path / "bad.png")]
    (tmp_path / "ok.png").write_bytes(png(40, 30))
    files.append(str(tmp_path / "ok.png"))
    compact_rows = Segmenter(task_models["panoptic"], run_id="r")(as_numpy_batch(prepared(files))).to_pylist()
    corrupt = {**compact_rows[2], "image_uri": "/corrupt.png", "masks": compact_rows[2]["masks"][:-1]}
    rows = encode_rows(compact_table([*compact_rows, corrupt])).to_pylist()
    assert [r["status"] for r in rows] == ["error", "error", "ok", "error"]
    assert rows[0]["error"] == "unreadable: file not found" and rows[0]["source_bytes"] is None
    assert rows[1]["error"].startswith("not an image") and rows[1]["source_bytes"] == 12
    assert rows[0]["segments"] is None and rows[0]["width"] is None and rows[0]["inference_ms"] is None
    assert rows[3]["error"].startswith("encoding failed: ValueError:") and rows[3]["segments"] is None
    assert {r["task"] for r in rows} == {"panoptic"} and {r["run_id"] for r in rows} == {"r"}
    # Ray's "numpy" batches of the same rows give the same output rows.
    again = encode_rows(as_numpy_batch(compact_table(compact_rows)))
    assert content(again) == content(encode_rows(compact_table(compact_rows)))


def test_prediction_masks_are_the_kept_full_masks(task_models: dict[str, str]) -> None:
    seg = instance_segments()
    prediction = compact("instance", seg, 0.3)
    assert isinstance(prediction, CompactPrediction) and prediction.id_map is None
    keep = (seg.scores >= 0.3) & seg.masks.flatten(1).any(1)
    np.testing.assert_array_equal(prediction.masks(), seg.masks[keep].numpy())
