"""The predictions side of evaluation: one chosen row per image of a `m2f segment` OUTPUT, matched to GT by name.

Predictions are the part files directly under OUTPUT (`pipeline/output.py` says which names those
are), local or on object storage. An image listed more than once (a retried or resumed run) counts
once: its latest `ok` row by `processed_at`, or, when it never succeeded, its latest error row,
which leaves the image without a prediction. Predictions meet the ground truth by file name.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow.parquet as pq
from fsspec import AbstractFileSystem

from m2f.jobs.common.bad_input import BadInput
from m2f.pipeline.groundtruth import basename
from m2f.pipeline.output import list_part_files, run_file
from m2f.pipeline.schema import STATUS_OK
from m2f.pipeline.storage import Storage, open_fs

BATCH_ROWS = 64  # rows decoded at a time in the second pass: a row can hold hundreds of RLEs
EXAMPLES = 5  # how many names or runs a warning shows
_SELECT_COLUMNS = ("image_uri", "status", "processed_at", "run_id", "task")
_READ_COLUMNS = ("image_uri", "image_id", "status", "width", "height", "segments")


@dataclass(frozen=True)
class RunInfo:
    """One run that wrote chosen ok rows, with what its report says about how it segmented."""

    run_id: str
    task: str
    images: int  # chosen ok rows of this run and task
    score_threshold: float | None  # from the run report; None when the report is missing or lacks it


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
        """The counts for the JSON report, in field order; the two name lists as their lengths."""
        counts = asdict(self)
        counts["unmatched_predictions"] = len(self.unmatched_predictions)
        counts["gt_without_prediction"] = len(self.gt_without_prediction)
        return counts

    def warnings(self) -> list[str]:
        """One line per side with images the other side lacks, naming the first few."""
        warnings = []
        if self.unmatched_predictions:
            names = ", ".join(basename(u) for u in self.unmatched_predictions[:EXAMPLES])
            warnings.append(f"{len(self.unmatched_predictions)} predicted images are not in the ground truth: {names}")
        if self.gt_without_prediction:
            names = ", ".join(self.gt_without_prediction[:EXAMPLES])
            warnings.append(
                f"{len(self.gt_without_prediction)} ground-truth images have no ok prediction and count as empty: "
                f"{names}"
            )
        return warnings


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


def open_predictions(uri: str, storage: Storage) -> BatchOutput:
    return BatchOutput(uri, storage.options(uri))


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


def match_by_name(
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
        example = f" (e.g. {basename(counts.unmatched_predictions[0])})" if counts.unmatched_predictions else ""
        raise BadInput(f"no predicted image ({counts.ok} ok){example} has a file name listed in {source}")
    counts.gt_without_prediction = sorted(set(gt_keys) - set(seen))


def check_size(row: Mapping[str, Any], height: int, width: int, gt_name: str) -> None:
    """Refuse a row segmented at another size than its ground truth: its masks would not line up."""
    size = (row.get("height"), row.get("width"))
    if size != (height, width):
        raise BadInput(
            f"{row['image_uri']} was segmented at {size[1]}x{size[0]} but its ground truth {gt_name} "
            f"is {width}x{height} (width x height)"
        )
