"""The hand-over between the model actor and the encode stage: `compact_row` -> `encode_rows`, one pair.

The actor (`pipeline.infer.Segmenter`) does accelerator work only: forward pass, post-processing and the
compact form (`pipeline.compact.CompactPrediction`), built on its device. `compact_row` lays one image's
compact form out as a COMPACT_SCHEMA row; everything after that is CPU work on a few hundred kilobytes per
image, and runs in `encode_rows`, in Ray tasks beside the actors, instead of serially inside them: RLE
encoding (`pipeline.encode`), area and bbox, per-image statistics, the output row (`pipeline.schema`).
`tests/test_rows.py` checks the pair against encoding the full masks directly.

An error row (unreadable, not an image, inference failed) passes through as the image's error row; an
image whose encoding fails becomes an error row ("encoding failed: ...") and the rest of the batch goes on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from m2f.pipeline.compact import CompactPrediction, compact_rles
from m2f.pipeline.encode import image_stats, segment_dicts
from m2f.pipeline.schema import (
    STATUS_ERROR,
    STATUS_OK,
    describe,
    error_row,
    ok_row,
    rows_to_table,
    stage_fields,
)
from m2f.pipeline.secrets import scrub, secret_values

CROPS = "crops"  # mask_format of packed, box-cropped masks (instance); else the id map's numpy dtype
RLE = "rle"  # mask_format of COCO RLE counts, one line per segment (instance masks of a large image)

# One image between the model actor and the encode stage. The columns it shares with the output row have
# their types (`stage_fields`), with sentinels instead of nulls so that they stay plain when Ray hands them
# over as numpy arrays: error "" when ok; width, height 0 and inference_ms -1 on error; source_bytes -1
# when the file could not be read; empty lists and bytes when there are no segments.
COMPACT_SCHEMA = pa.schema(
    [
        *stage_fields("image_uri", "status", "error", "task", "model", "run_id", "width", "height"),
        *stage_fields("source_bytes", "inference_ms"),
        # Per segment (N,), in output order: what the model's vocabulary says of its class, and its score.
        pa.field("category_ids", pa.list_(pa.int32())),
        pa.field("labels", pa.list_(pa.string())),
        pa.field("is_thing", pa.list_(pa.bool_())),
        pa.field("scores", pa.list_(pa.float32())),
        pa.field("mask_format", pa.string()),  # "uint8" / "int16" / "int32" id map, CROPS, RLE, or "" on error
        pa.field("boxes", pa.list_(pa.int32())),  # (N * 4,) y0, x0, y1, x1 per segment for CROPS, else empty
        pa.field("masks", pa.binary()),  # the (H, W) id map's bytes (C order), the packed crops, or RLE lines
    ]
)


def compact_row(
    uri: str,
    prediction: CompactPrediction,
    classes: tuple[list[int], list[str], list[bool]],
    *,
    model: str,
    run_id: str,
    inference_ms: float,
    source_bytes: int | None,
) -> dict[str, Any]:
    """A COMPACT_SCHEMA row for one segmented image; `classes` = (category ids, names, thing flags) of its
    segments (`Predictor.classes`)."""
    category_ids, labels, is_thing = classes
    # memoryviews, not bytes: Arrow copies them once into the row, with no full-size bytes object between
    if prediction.id_map is not None:
        mask_format, boxes, masks = prediction.id_map.dtype.name, [], _view(prediction.id_map)
    elif prediction.rle_counts is not None:
        mask_format, boxes, masks = RLE, [], b"\n".join(prediction.rle_counts)
    else:
        mask_format, boxes, masks = CROPS, prediction.boxes.ravel().tolist(), _view(prediction.bits)
    return {
        **_base(uri, task=prediction.task, model=model, run_id=run_id, source_bytes=source_bytes),
        "status": STATUS_OK,
        "width": prediction.width,
        "height": prediction.height,
        "inference_ms": inference_ms,
        "category_ids": category_ids,
        "labels": labels,
        "is_thing": is_thing,
        "scores": prediction.scores.tolist(),
        "mask_format": mask_format,
        "boxes": boxes,
        "masks": masks,
    }


def _view(array: np.ndarray) -> memoryview:
    return memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8))


def compact_error_row(
    uri: str, reason: str, *, task: str, model: str, run_id: str, source_bytes: int | None
) -> dict[str, Any]:
    """A COMPACT_SCHEMA row for an image without segments: `reason` says why."""
    if not reason:
        raise ValueError(f"an error row needs a reason (uri {uri!r})")
    return {**_base(uri, task=task, model=model, run_id=run_id, source_bytes=source_bytes), "error": reason}


def _base(uri: str, *, task: str, model: str, run_id: str, source_bytes: int | None) -> dict[str, Any]:
    return {
        "image_uri": uri,
        "status": STATUS_ERROR,
        "error": "",
        "task": task,
        "model": model,
        "run_id": run_id,
        "width": 0,
        "height": 0,
        "source_bytes": -1 if source_bytes is None else source_bytes,
        "inference_ms": -1.0,
        "category_ids": [],
        "labels": [],
        "is_thing": [],
        "scores": [],
        "mask_format": "",
        "boxes": [],
        "masks": b"",
    }


def compact_table(rows: Sequence[Mapping[str, Any]]) -> pa.Table:
    """Compact rows as a Table with exactly COMPACT_SCHEMA."""
    return pa.Table.from_pylist(list(rows), schema=COMPACT_SCHEMA)


def encode_rows(batch: pa.Table | Mapping[str, Sequence[Any]]) -> pa.Table:
    """The encode stage: COMPACT_SCHEMA rows (a Table, or numpy columns as Ray hands them) -> exactly
    OUTPUT_SCHEMA rows, one per input row, in order."""
    if isinstance(batch, pa.Table):  # the masks as views of the Arrow buffer: no bytes copy of an id map
        rows = batch.drop_columns(["masks"]).to_pylist()
        for row, masks in zip(rows, _binary_views(batch.column("masks")), strict=True):
            row["masks"] = masks
    else:
        rows = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]
    return rows_to_table([encode_row(row) for row in rows])


def _binary_views(column: pa.ChunkedArray) -> list[np.ndarray]:
    """Each value of a binary column as a uint8 array over Arrow's own buffer (no copy); nulls are empty."""
    views = []
    for chunk in column.chunks:
        _, offsets, data = chunk.buffers()
        ends = np.frombuffer(offsets, dtype=np.int32, count=len(chunk) + 1, offset=chunk.offset * 4)
        whole = np.frombuffer(data, dtype=np.uint8) if data is not None else np.zeros(0, np.uint8)
        views.extend(whole[ends[i] : ends[i + 1]] for i in range(len(chunk)))
    return views


def encode_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """One compact row -> its output row: segments (COCO RLE, area, bbox), statistics, or the error row."""
    uri = str(row["image_uri"])
    source_bytes = None if int(row["source_bytes"]) < 0 else int(row["source_bytes"])
    names = {"task": str(row["task"]), "model": str(row["model"]), "run_id": str(row["run_id"])}
    if str(row["status"]) != STATUS_OK:
        return error_row(uri, str(row["error"]) or "unknown error", **names, source_bytes=source_bytes)
    height, width = int(row["height"]), int(row["width"])
    try:
        segments = compact_segments(row)
        stats = image_stats(segments, height, width, semantic=names["task"] == "semantic")
    except Exception as e:  # a corrupt row fails its image, never the job
        reason = f"encoding failed: {scrub(describe(e), secret_values())}"
        return error_row(uri, reason, **names, source_bytes=source_bytes)
    return ok_row(
        uri,
        width=width,
        height=height,
        segments=segments,
        stats=stats,
        inference_ms=float(row["inference_ms"]),
        **names,
        source_bytes=source_bytes,
    )


def compact_segments(row: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The `segments` of one ok compact row. ValueError when its parts do not fit together."""
    height, width = int(row["height"]), int(row["width"])
    scores = np.asarray(row["scores"], dtype=np.float32)  # (N,)
    n = len(scores)
    per_segment = [list(row[name]) for name in ("category_ids", "labels", "is_thing")]
    if any(len(values) != n for values in per_segment):
        raise ValueError(f"per-segment columns of lengths {[len(v) for v in per_segment]} for {n} scores")
    data = np.frombuffer(row["masks"], dtype=np.uint8)
    fmt = str(row["mask_format"])
    if fmt == RLE:  # COCO's counts use the characters 48..111: a newline separates them
        counts = data.tobytes().split(b"\n") if n else []
        if len(counts) != n:
            raise ValueError(f"{len(counts)} RLEs for {n} segments")
        rles = [{"size": [height, width], "counts": c} for c in counts]
    elif fmt == CROPS:
        boxes = np.asarray(row["boxes"], dtype=np.int64).reshape(-1, 4)  # (N, 4)
        rles = compact_rles(height, width, n, boxes=boxes, bits=data)
    else:
        if fmt not in ("uint8", "int16", "int32") or data.size != height * width * np.dtype(fmt).itemsize:
            raise ValueError(f"{data.size} mask bytes in format {fmt!r} for a {height}x{width} image")
        rles = compact_rles(height, width, n, id_map=data.view(fmt).reshape(height, width))
    return segment_dicts(rles, *per_segment, scores)
