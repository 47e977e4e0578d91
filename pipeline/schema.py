"""The output row, defined here once: its columns, the ok and error rows, and the image's id.

The output table has one row per listed input image, plain Arrow types only.

Readers (DuckDB, Spark, pandas, BigQuery) need no extension types and no Ray. Column names are a
contract: add columns, never rename or retype them without bumping SCHEMA_VERSION. Each field
carries its description as Arrow field metadata ("description"), so the Parquet files document
themselves; `COLUMN_DOCS` is the same text for the README. The rows that travel between the stages
before it (`pipeline.infer.WORK_SCHEMA`, `pipeline.handover.COMPACT_SCHEMA`) take the columns they share
with it from here (`stage_fields`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa

SCHEMA_VERSION = 1
STATUS_OK = "ok"
STATUS_ERROR = "error"

RLE_TYPE = pa.struct(
    [
        pa.field("size", pa.list_(pa.int32())),  # [height, width]
        pa.field("counts", pa.string()),  # COCO compressed RLE, as in COCO JSON results
    ]
)
SEGMENT_TYPE = pa.struct(
    [
        pa.field("id", pa.int32()),
        pa.field("category_id", pa.int32()),
        pa.field("label", pa.string()),
        pa.field("is_thing", pa.bool_()),
        pa.field("score", pa.float32()),
        pa.field("area", pa.int64()),
        pa.field("bbox", pa.list_(pa.float32())),  # [x, y, w, h] in pixels, COCO convention
        pa.field("rle", RLE_TYPE),
    ]
)
CLASS_FRACTION_TYPE = pa.struct(
    [
        pa.field("category_id", pa.int32()),
        pa.field("label", pa.string()),
        pa.field("fraction", pa.float32()),
    ]
)

# name -> (type, nullable, description)
_COLUMNS: list[tuple[str, pa.DataType, bool, str]] = [
    ("image_uri", pa.string(), False, "Fully qualified input URI (s3://bucket/key or an absolute local path)."),
    ("image_id", pa.string(), False, "First 16 hex characters of sha256(image_uri as UTF-8): a stable join key."),
    ("status", pa.string(), False, "'ok' or 'error'."),
    ("error", pa.string(), True, "Why the image failed ('<category>: <detail>'); null when ok."),
    ("width", pa.int32(), True, "Upright width in pixels (after EXIF orientation); null on error."),
    ("height", pa.int32(), True, "Upright height in pixels (after EXIF orientation); null on error."),
    ("task", pa.string(), False, "'semantic', 'instance' or 'panoptic'."),
    (
        "model",
        pa.string(),
        False,
        "Model name and the first 12 hex of its checkpoint's sha256, e.g. 'tiny-synthetic@3f9a1c02be71'.",
    ),
    ("run_id", pa.string(), False, "The run that wrote this row (see OUTPUT/_runs/<run_id>.json)."),
    ("schema_version", pa.int32(), False, "Version of this table layout."),
    (
        "segments",
        pa.list_(SEGMENT_TYPE),
        True,
        "Segments: id (1..N within the image), category_id, label, is_thing, score, area (pixels), "
        "bbox [x, y, w, h], rle {size [h, w], counts} (COCO compressed RLE, pycocotools.mask.decode). "
        "Empty list when nothing was found; null on error.",
    ),
    ("segment_count", pa.int32(), True, "Number of segments; null on error."),
    (
        "class_fractions",
        pa.list_(CLASS_FRACTION_TYPE),
        True,
        "Per class present: fraction of the image's pixels covered by its segments (each pixel counted "
        "once per class), sorted by category_id; null on error.",
    ),
    ("mean_score", pa.float32(), True, "Mean segment score; null when there are no segments or on error."),
    ("inference_ms", pa.float32(), True, "Model time for this image (its share of the batch), in milliseconds."),
    ("source_bytes", pa.int64(), True, "Size of the input file in bytes, when it could be read."),
    ("processed_at", pa.timestamp("us", tz="UTC"), False, "When the row was produced (UTC)."),
]

COLUMN_DOCS: dict[str, str] = {name: doc for name, _, _, doc in _COLUMNS}
_REQUIRED = tuple(name for name, _, nullable, _ in _COLUMNS if not nullable)
OUTPUT_SCHEMA = pa.schema(
    [pa.field(name, typ, nullable=nullable, metadata={"description": doc}) for name, typ, nullable, doc in _COLUMNS],
    metadata={"m2f.schema_version": str(SCHEMA_VERSION)},
)


def stage_fields(*names: str) -> list[pa.Field]:
    """The output columns `names`, in that order, as the stages before the output carry them: the same
    types, nullable and undocumented (their rows hold sentinels such as 0 or -1 instead of nulls)."""
    return [pa.field(name, OUTPUT_SCHEMA.field(name).type) for name in names]


def image_id(uri: str) -> str:
    """Stable id of an input: the first 16 hex chars of sha256 of the UTF-8 URI."""
    return _id_bytes(uri).hex()


def image_key(uri: str) -> int:
    """`image_id` as a uint64 (the same first 8 bytes of the sha256, big-endian): a key for numpy arrays."""
    return int.from_bytes(_id_bytes(uri), "big")


def _id_bytes(uri: str) -> bytes:
    return hashlib.sha256(uri.encode("utf-8")).digest()[:8]


def describe(e: BaseException) -> str:
    """An exception as an error row's detail: its type and the first line of its message."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def now_utc() -> datetime:
    return datetime.now(UTC)


def _base_row(uri: str, *, task: str, model: str, run_id: str) -> dict[str, Any]:
    return {
        "image_uri": uri,
        "image_id": image_id(uri),
        "task": task,
        "model": model,
        "run_id": run_id,
        "schema_version": SCHEMA_VERSION,
        "processed_at": now_utc(),
    }


def error_row(
    uri: str, reason: str, *, task: str, model: str, run_id: str, source_bytes: int | None = None
) -> dict[str, Any]:
    """The row for an input that produced no segmentation (unreadable, not an image, ...)."""
    if not reason:
        raise ValueError(f"an error row needs a reason (uri {uri!r})")
    return {
        **_base_row(uri, task=task, model=model, run_id=run_id),
        "status": STATUS_ERROR,
        "error": reason,
        "width": None,
        "height": None,
        "segments": None,
        "segment_count": None,
        "class_fractions": None,
        "mean_score": None,
        "inference_ms": None,
        "source_bytes": source_bytes,
    }


def ok_row(
    uri: str,
    *,
    width: int,
    height: int,
    segments: list[dict[str, Any]],
    stats: Mapping[str, Any],
    inference_ms: float | None,
    task: str,
    model: str,
    run_id: str,
    source_bytes: int | None = None,
) -> dict[str, Any]:
    """The row for a segmented image; `segments` as `pipeline.encode.segment_dicts` makes them (from the
    compact form's RLEs, or `encode_segments` of full masks), `stats` from `image_stats`."""
    return {
        **_base_row(uri, task=task, model=model, run_id=run_id),
        "status": STATUS_OK,
        "error": None,
        "width": width,
        "height": height,
        "segments": segments,
        "segment_count": stats["segment_count"],
        "class_fractions": stats["class_fractions"],
        "mean_score": stats["mean_score"],
        "inference_ms": inference_ms,
        "source_bytes": source_bytes,
    }


def rows_to_table(rows: Iterable[Mapping[str, Any]]) -> pa.Table:
    """Rows (dicts) as a Table with exactly OUTPUT_SCHEMA.

    Strict on purpose, since the columns are a contract: a missing or unknown column, or a null in
    a required column, raises ValueError naming it (pyarrow itself does not check nullability).
    """
    rows = list(rows)
    for row in rows:
        missing = [name for name in COLUMN_DOCS if name not in row]
        unknown = [name for name in row if name not in COLUMN_DOCS]
        if missing or unknown:
            raise ValueError(f"row for {row.get('image_uri')!r}: missing columns {missing}, unknown columns {unknown}")
        nulls = [name for name in _REQUIRED if row[name] is None]
        if nulls:
            raise ValueError(f"row for {row.get('image_uri')!r}: required columns {nulls} are null")
    return pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA)
