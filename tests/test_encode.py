"""encode_segments / image_stats against numpy references, RLEs from id maps and crops against pycocotools'
own encoder, and the output table end to end
(rows -> Arrow with OUTPUT_SCHEMA -> Parquet -> DuckDB unnest -> pycocotools decode)."""

from __future__ import annotations

import datetime as dt
import hashlib

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pycocotools import mask as mask_utils

from m2f.pipeline.encode import encode_segments, image_stats, rles_from_crops, rles_from_id_map
from m2f.pipeline.schema import (
    COLUMN_DOCS,
    OUTPUT_SCHEMA,
    SCHEMA_VERSION,
    error_row,
    image_id,
    image_key,
    ok_row,
    rows_to_table,
)

CLASSES = ["person", "car", "sky"]
IS_THING = [True, True, False]
CATEGORY_IDS = [1, 3, 119]


def _random_masks(n: int, height: int, width: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    masks = rng.random((n, height, width)) < rng.uniform(0.05, 0.6, size=(n, 1, 1))  # (N, H, W)
    masks[0] = False  # an empty mask
    masks[1] = False
    masks[1, 3:7, 5:11] = True  # a plain rectangle
    return masks


def _reference_bbox(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return [0.0, 0.0, 0.0, 0.0]
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


@pytest.mark.parametrize(("height", "width"), [(17, 23), (1, 1), (5, 400)])
def test_rle_round_trip_area_and_bbox(height: int, width: int) -> None:
    masks = _random_masks(6, max(height, 8), max(width, 12), seed=height * width)[:, :height, :width]
    labels = np.array([0, 1, 2, 0, 1, 2])
    scores = np.linspace(0.9, 0.4, 6, dtype=np.float32)
    segments = encode_segments(masks, labels, scores, class_names=CLASSES, is_thing=IS_THING)
    assert [s["id"] for s in segments] == [1, 2, 3, 4, 5, 6]
    for seg, mask, label, score in zip(segments, masks, labels, scores, strict=True):
        rle = seg["rle"]
        assert isinstance(rle["counts"], str) and rle["size"] == [height, width]
        decoded = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()})
        np.testing.assert_array_equal(decoded.astype(bool), mask)
        assert seg["area"] == int(mask.sum())
        assert seg["bbox"] == pytest.approx(_reference_bbox(mask))
        assert seg["category_id"] == label and seg["label"] == CLASSES[label]
        assert seg["is_thing"] is IS_THING[label]
        assert seg["score"] == pytest.approx(float(score))


def test_category_ids_map_class_indices() -> None:
    masks = np.ones((2, 3, 3), bool)
    segments = encode_segments(
        masks, np.array([2, 0]), np.array([0.5, 0.7]), class_names=CLASSES, is_thing=IS_THING, category_ids=CATEGORY_IDS
    )
    assert [(s["category_id"], s["label"], s["is_thing"]) for s in segments] == [
        (119, "sky", False),
        (1, "person", True),
    ]


def test_non_contiguous_masks_encode_correctly() -> None:
    big = _random_masks(4, 20, 30, seed=7)
    view = big[:, ::2, 1::3]  # strided view, not C-contiguous
    segments = encode_segments(view, np.zeros(4, int), np.ones(4), class_names=CLASSES, is_thing=IS_THING)
    for seg, mask in zip(segments, view, strict=True):
        rle = {"size": seg["rle"]["size"], "counts": seg["rle"]["counts"]}
        np.testing.assert_array_equal(mask_utils.decode(rle).astype(bool), mask)


def test_integer_masks_are_accepted() -> None:
    masks = _random_masks(3, 9, 11, seed=3)
    as_uint8 = encode_segments(
        masks.astype(np.uint8) * 255, np.zeros(3, int), np.ones(3), class_names=CLASSES, is_thing=IS_THING
    )
    assert as_uint8 == encode_segments(masks, np.zeros(3, int), np.ones(3), class_names=CLASSES, is_thing=IS_THING)


def test_no_masks_give_no_segments() -> None:
    empty = encode_segments(np.zeros((0, 4, 5), bool), np.zeros(0), np.zeros(0), class_names=CLASSES, is_thing=IS_THING)
    assert empty == []
    assert image_stats(empty, 4, 5) == {"segment_count": 0, "class_fractions": [], "mean_score": None}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"masks": np.zeros((4, 4), bool)}, "masks must be"),
        ({"masks": np.zeros((2, 4, 4), np.float32)}, "threshold them first"),
        ({"labels": np.zeros(3, int)}, "labels"),
        ({"labels": np.array([0, 3])}, r"labels must lie in \[0, 3\)"),
        ({"labels": np.array([0.0, 1.0])}, "must be integers"),
        ({"is_thing": [True]}, "is_thing has 1 entries for 3 classes"),
        ({"category_ids": [1, 2]}, "category_ids has 2 entries"),
    ],
)
def test_bad_input_is_a_value_error(kwargs: dict, message: str) -> None:
    args = {
        "masks": np.zeros((2, 4, 4), bool),
        "labels": np.array([0, 1]),
        "scores": np.array([0.5, 0.5]),
        "class_names": CLASSES,
        "is_thing": IS_THING,
        "category_ids": None,
    } | kwargs
    with pytest.raises(ValueError, match=message):
        encode_segments(
            args["masks"],
            args["labels"],
            args["scores"],
            class_names=args["class_names"],
            is_thing=args["is_thing"],
            category_ids=args["category_ids"],
        )


def _hand_built_instances() -> list[dict]:
    """A 4x5 image: two overlapping 'person' masks, one 'car' mask overlapping a person."""
    masks = np.zeros((3, 4, 5), bool)
    masks[0, 0:2, 0:2] = True  # person, 4 px
    masks[1, 1:3, 1:3] = True  # person, 4 px, overlaps the first in 1 px -> union 7 px
    masks[2, 2:4, 2:5] = True  # car, 6 px
    return encode_segments(
        masks, np.array([0, 0, 1]), np.array([0.9, 0.6, 0.3]), class_names=CLASSES, is_thing=IS_THING
    )


def test_instance_stats_count_each_pixel_once_per_class() -> None:
    stats = image_stats(_hand_built_instances(), 4, 5)
    assert stats["segment_count"] == 3
    assert stats["mean_score"] == pytest.approx(0.6)
    assert stats["class_fractions"] == [
        {"category_id": 0, "label": "person", "fraction": pytest.approx(7 / 20)},
        {"category_id": 1, "label": "car", "fraction": pytest.approx(6 / 20)},
    ]


def test_semantic_stats_partition_the_image() -> None:
    label_map = np.array([[0, 0, 2, 2], [0, 1, 2, 2], [1, 1, 2, 2]])  # (H, W) class per pixel
    present = np.unique(label_map)
    masks = label_map[None] == present[:, None, None]  # (N, H, W)
    segments = encode_segments(masks, present, np.ones(len(present)), class_names=CLASSES, is_thing=IS_THING)
    stats = image_stats(segments, 3, 4, semantic=True)
    fractions = {f["label"]: f["fraction"] for f in stats["class_fractions"]}
    assert fractions == {"person": pytest.approx(3 / 12), "car": pytest.approx(3 / 12), "sky": pytest.approx(6 / 12)}
    assert sum(fractions.values()) == pytest.approx(1.0)


def test_stats_reject_a_size_mismatch() -> None:
    with pytest.raises(ValueError, match="RLE size"):
        image_stats(_hand_built_instances(), 5, 4)
    with pytest.raises(ValueError, match="positive"):
        image_stats([], 0, 4)


def test_image_id_is_a_stable_sha256_prefix() -> None:
    uri = "s3://bucket/dir with space/ümlaut café.jpg"
    assert image_id(uri) == hashlib.sha256(uri.encode("utf-8")).hexdigest()[:16]
    assert len(image_id("/a.jpg")) == 16 and image_id("/a.jpg") != image_id("/b.jpg")


def test_image_key_is_image_id_as_a_uint64() -> None:
    for uri in ("/a.jpg", "s3://bucket/dir/é.png", ""):
        assert image_key(uri) == int(image_id(uri), 16)
        assert np.array([image_key(uri)], dtype=np.uint64)[0] == image_key(uri)  # fits a uint64
    assert image_key("/a.jpg") != image_key("/b.jpg")


def test_schema_is_plain_arrow_and_documented() -> None:
    names = OUTPUT_SCHEMA.names
    for column in ("image_uri", "image_id", "status", "error", "width", "height", "task", "model", "run_id"):
        assert column in names
    for column in ("schema_version", "segments", "segment_count", "class_fractions", "mean_score"):
        assert column in names
    assert OUTPUT_SCHEMA.field("processed_at").type == pa.timestamp("us", tz="UTC")
    assert all(not isinstance(f.type, pa.ExtensionType) for f in OUTPUT_SCHEMA)
    assert set(COLUMN_DOCS) == set(names)
    assert all(f.metadata[b"description"] for f in OUTPUT_SCHEMA)


def _rows() -> list[dict]:
    segments = _hand_built_instances()
    meta = {"task": "instance", "model": "tiny@sha256:0123abcd", "run_id": "run-1"}
    return [
        ok_row(
            "/data/a.jpg",
            width=5,
            height=4,
            segments=segments,
            stats=image_stats(segments, 4, 5),
            inference_ms=12.5,
            source_bytes=1234,
            **meta,
        ),
        ok_row(
            "/data/blank.png", width=3, height=2, segments=[], stats=image_stats([], 2, 3), inference_ms=1.0, **meta
        ),
        error_row("/data/broken.jpg", "truncated or corrupt: image file is truncated", **meta),
    ]


def test_rows_to_parquet_to_duckdb_unnest(tmp_path) -> None:
    table = rows_to_table(_rows())
    assert table.schema == OUTPUT_SCHEMA
    path = tmp_path / "part-0.parquet"
    pq.write_table(table, path)
    assert pq.read_schema(path).equals(OUTPUT_SCHEMA, check_metadata=False)

    con = duckdb.connect()
    summary = con.execute(
        f"SELECT status, count(*), sum(segment_count) FROM read_parquet('{path}') GROUP BY status ORDER BY status"
    ).fetchall()
    assert summary == [("error", 1, None), ("ok", 2, 3)]
    segments = con.execute(
        f"""
        SELECT image_id, height, width, s.id, s.label, s.area, s.bbox, s.rle.size, s.rle.counts
        FROM (SELECT image_id, height, width, unnest(segments) AS s FROM read_parquet('{path}'))
        ORDER BY s.id
        """
    ).fetchall()
    assert len(segments) == 3 and {row[0] for row in segments} == {image_id("/data/a.jpg")}
    for _, height, width, _, _, area, bbox, size, counts in segments:
        mask = mask_utils.decode({"size": size, "counts": counts.encode()})
        assert mask.shape == (height, width) and int(mask.sum()) == area
        assert bbox == pytest.approx(_reference_bbox(mask.astype(bool)))
    fractions = con.execute(
        f"SELECT f.label, f.fraction FROM (SELECT unnest(class_fractions) AS f FROM read_parquet('{path}')) ORDER BY 1"
    ).fetchall()
    assert fractions == [("car", pytest.approx(0.3)), ("person", pytest.approx(0.35))]
    # typeof/epoch instead of fetching the TIMESTAMPTZ itself (DuckDB's Python fetch of it needs pytz).
    error, version, kind, epoch_us = con.execute(
        f"""SELECT error, schema_version, typeof(processed_at), epoch_us(processed_at)
        FROM read_parquet('{path}') WHERE status = 'error'"""
    ).fetchone()
    assert error.startswith("truncated") and version == SCHEMA_VERSION
    assert kind == "TIMESTAMP WITH TIME ZONE"
    now = dt.datetime.now(dt.UTC).timestamp() * 1e6
    assert now - 600e6 < epoch_us <= now


def test_rows_to_table_is_strict() -> None:
    good = error_row("/x.jpg", "empty file", task="semantic", model="m", run_id="r")
    with pytest.raises(ValueError, match="unknown columns"):
        rows_to_table([good | {"extra": 1}])
    with pytest.raises(ValueError, match="missing columns"):
        rows_to_table([{k: v for k, v in good.items() if k != "task"}])
    with pytest.raises(ValueError, match=r"required columns \['run_id'\]"):
        rows_to_table([good | {"run_id": None}])
    with pytest.raises(ValueError, match="reason"):
        error_row("/x.jpg", "", task="semantic", model="m", run_id="r")


@pytest.mark.parametrize("scan_below", [0.0, 1.01])  # every crop pasted into a full mask / every one scanned
@pytest.mark.parametrize("seed", range(40))
def test_rles_from_id_maps_and_crops_are_pycocotools_bytes(seed: int, scan_below: float) -> None:
    """Run-length encoding from an id map or from box crops gives the bytes `mask_utils.encode` gives for
    the full masks: random maps and masks, full-height strips whose runs join across columns, whole images."""
    rng = np.random.default_rng(seed)
    h, w = (int(v) for v in rng.integers(1, 24, size=2))
    n = int(rng.integers(0, 7))
    id_map = rng.integers(0, n + 1, size=(h, w)).astype(np.uint8)  # (H, W)
    if seed % 3 == 0:
        id_map = np.repeat(id_map[:, :1], w, axis=1)  # whole columns of one id
    for i, rle in enumerate(rles_from_id_map(id_map, n)):
        assert rle == mask_utils.encode(np.asfortranarray((id_map == i + 1).astype(np.uint8)))
    masks = rng.random((n, h, w)) < rng.random()  # (N, H, W), overlapping
    if seed % 4 == 0:
        masks[:] = True
    masks = [m for m in masks if m.any()]
    boxes, crops = [], []
    for m in masks:
        rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
        y0, x0, y1, x1 = rows[0], cols[0], rows[-1] + 1, cols[-1] + 1
        boxes.append((y0, x0, y1, x1))
        crops.append(m[y0:y1, x0:x1])
    for m, rle in zip(
        masks, rles_from_crops(crops, np.array(boxes).reshape(-1, 4), h, w, scan_below=scan_below), strict=True
    ):
        assert rle == mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))


def test_rles_from_compact_forms_refuse_what_does_not_fit() -> None:
    with pytest.raises(ValueError, match="expected"):
        rles_from_id_map(np.full((2, 2), 3, np.uint8), 2)
    with pytest.raises(ValueError, match="does not fit"):
        rles_from_crops([np.ones((2, 2), bool)], np.array([[0, 0, 2, 2]]), 1, 5)
