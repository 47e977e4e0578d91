"""OUTPUT's ledger for resuming exactly once: which images already have an ok row, and what is left.

Image ids are compared as uint64 (the 16 hex digits of `schema.image_id`) in sorted NumPy arrays, so
the driver holds 8 bytes per image, not a Python set of strings: tens of millions of images fit.
The listing is streamed, WORK_CHUNK URIs at a time, into work-manifest Parquet files of at most
WORK_FILE_ROWS URIs, which the Ray Data pipeline reads back; the driver never holds more than one chunk.

Nothing is deleted before its replacement is committed. A run removes an image's earlier rows only after
it has committed the image's new row (`supersede`, at the end of the run), so while a run goes a reader
may see two rows for an image, told apart by `run_id`; the run's end leaves one. An `--overwrite` run that
was interrupted is resumed, not restarted, by the next `--overwrite` run with the same model and task: its
ok rows count as done (`interrupted_overwrites`), and the earlier rows of those images go at the end.
"""

from __future__ import annotations

import json
import logging
import posixpath
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from fsspec import AbstractFileSystem

from m2f.pipeline.output import PREVIEWS_DIR, QUARANTINE_DIR, RUNS_DIR, is_part_file, parquet_bytes, read_part
from m2f.pipeline.schema import STATUS_ERROR, STATUS_OK, image_key
from m2f.pipeline.sources import Listing
from m2f.pipeline.storage import Storage, is_temporary, remove_temporaries, with_retries, write_atomic

log = logging.getLogger(__name__)

WORK_CHUNK = 100_000  # URIs of the listing taken at a time: the most the driver holds at once
WORK_FILE_ROWS = 2048  # URIs per work-manifest file: one Ray Data block each, small beside the run's budget


# --- image ids as uint64 --------------------------------------------------------------------------


_HEX = np.full(256, 255, dtype=np.uint8)
_HEX[np.frombuffer(b"0123456789", np.uint8)] = np.arange(10)
_HEX[np.frombuffer(b"abcdef", np.uint8)] = np.arange(10, 16)
_HEX[np.frombuffer(b"ABCDEF", np.uint8)] = np.arange(10, 16)


def ids_to_keys(ids: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """16-hex-digit image ids -> (N,) uint64, vectorised. Raises ValueError on anything else."""
    values = ids.to_numpy(zero_copy_only=False) if len(ids) else np.empty(0, object)
    if len(values) and (pc.any(pc.not_equal(pc.utf8_length(ids), 16)).as_py() or ids.null_count):
        raise ValueError("image_id values must be 16 hex digits")
    digits = _HEX[np.frombuffer(np.asarray(values, dtype="S16").tobytes(), np.uint8)].reshape(-1, 16)  # (N, 16)
    if (digits == 255).any():
        raise ValueError("image_id values must be 16 hex digits")
    shifts = np.arange(60, -1, -4, dtype=np.uint64)  # most significant digit first
    return np.bitwise_or.reduce(digits.astype(np.uint64) << shifts, axis=1)


def isin_sorted(values: np.ndarray, sorted_keys: np.ndarray) -> np.ndarray:
    """values (N,) uint64 -> (N,) bool: present in `sorted_keys` (ascending, unique)."""
    if len(sorted_keys) == 0 or len(values) == 0:
        return np.zeros(len(values), dtype=bool)
    at = np.searchsorted(sorted_keys, values).clip(max=len(sorted_keys) - 1)
    return sorted_keys[at] == values


# --- what OUTPUT already holds --------------------------------------------------------------------


@dataclass
class Existing:
    """The state of OUTPUT before the run."""

    ok_keys: np.ndarray  # (N,) uint64, sorted unique: images with an ok row
    parts: list[str]  # readable part files
    with_errors: list[str]  # the part files holding at least one error row
    resumed_keys: np.ndarray = field(default_factory=lambda: np.empty(0, np.uint64))  # ok in `resumed` runs
    other_model_rows: int = 0  # ok rows made with another model or task
    duplicate_ok_rows: int = 0  # ok rows of an image that has another ok row (none unless files were copied in)
    quarantined: list[str] = field(default_factory=list)
    temporaries_removed: int = 0


def scan_output(
    fs: AbstractFileSystem, root: str, *, model: str, task: str, resumed: frozenset[str] = frozenset()
) -> Existing:
    """Read `image_id`/`status` of every part file under `root`; clean up after killed runs.

    `resumed`: run ids of interrupted overwrite runs this run continues; their ok rows' images are
    collected in `resumed_keys`.

    Temporaries (hidden, with the temporary marker) are removed; a part file that cannot be read as our
    schema is moved to `_quarantine/` so that neither this run nor a reader of the dataset trips on it.
    """
    if not fs.exists(root):
        return Existing(np.empty(0, np.uint64), [], [])
    fs.invalidate_cache(root)
    entries = fs.ls(root, detail=True)
    temporaries = [e["name"] for e in entries if is_temporary(e["name"])]
    for sub in (RUNS_DIR, PREVIEWS_DIR):
        folder = posixpath.join(root, sub)
        if fs.isdir(folder):
            temporaries += [p for p in fs.ls(folder, detail=False) if is_temporary(p)]
    existing = Existing(np.empty(0, np.uint64), [], [], temporaries_removed=remove_temporaries(fs, temporaries))
    ok_chunks, resumed_chunks = [], []
    parts = sorted(e["name"] for e in entries if e["type"] == "file" and is_part_file(e["name"]))
    for path in parts:
        try:
            table = read_part(fs, path, ["image_id", "status", "task", "model", "run_id"])
            keys = ids_to_keys(table["image_id"])
        except Exception as e:
            existing.quarantined.append(_quarantine(fs, root, path, e))
            continue
        ok = pc.equal(table["status"], STATUS_OK).to_numpy(zero_copy_only=False)
        ok_chunks.append(keys[ok])
        if resumed:
            mine = pc.is_in(table["run_id"], pa.array(sorted(resumed), pa.string())).to_numpy(zero_copy_only=False)
            resumed_chunks.append(keys[ok & mine])
        same = pc.and_(pc.equal(table["task"], task), pc.equal(table["model"], model)).to_numpy(zero_copy_only=False)
        existing.other_model_rows += int((ok & ~same).sum())
        existing.parts.append(path)
        if not ok.all():
            existing.with_errors.append(path)
    if ok_chunks:
        all_ok = np.concatenate(ok_chunks)
        existing.ok_keys = np.unique(all_ok)
        existing.duplicate_ok_rows = len(all_ok) - len(existing.ok_keys)
    if resumed_chunks:
        existing.resumed_keys = np.unique(np.concatenate(resumed_chunks))
    return existing


def _quarantine(fs: AbstractFileSystem, root: str, path: str, e: Exception) -> str:
    target = posixpath.join(root, QUARANTINE_DIR, posixpath.basename(path))
    fs.makedirs(posixpath.dirname(target), exist_ok=True)
    fs.mv(path, target)
    log.warning("moved unreadable part file %s to %s (%s)", path, target, type(e).__name__)
    return target


def drop_superseded_errors(fs: AbstractFileSystem, paths: list[str], ok_keys: np.ndarray) -> int:
    """Remove from `paths` the error rows of images that have an ok row (`ok_keys`, sorted uint64): what a
    run killed after committing a retried image's new row leaves. Each file is rewritten atomically, or
    deleted once empty. Returns the number of rows removed."""
    removed = 0
    for path in paths:
        table = read_part(fs, path, ["image_id", "status"])
        error = pc.equal(table["status"], STATUS_ERROR).to_numpy(zero_copy_only=False)
        removed += _remove_rows(fs, path, error & isin_sorted(ids_to_keys(table["image_id"]), ok_keys))
    return removed


def _remove_rows(fs: AbstractFileSystem, path: str, drop: np.ndarray) -> int:
    """Rewrite the part file at `path` without the rows where `drop` (N,) is True (atomically), or delete
    it when no row is left; returns how many rows went."""
    if not drop.any():
        return 0
    if drop.all():
        fs.rm(path)
    else:
        kept = read_part(fs, path).filter(pa.array(~drop))
        write_atomic(fs, path, parquet_bytes(kept))
    return int(drop.sum())


def supersede(
    fs: AbstractFileSystem, paths: list[str], new_keys: np.ndarray, keep_runs: frozenset[str] = frozenset()
) -> int:
    """Remove from `paths` (files written before this run) every row of an image in `new_keys` (sorted
    uint64: images whose new row is committed), except the ok rows of `keep_runs`. Each file is rewritten
    atomically, or deleted once empty. Returns the number of rows removed."""
    removed = 0
    if not len(new_keys):
        return 0
    for path in paths:
        if not fs.exists(path):
            continue
        table = read_part(fs, path, ["image_id", "status", "run_id"])
        drop = isin_sorted(ids_to_keys(table["image_id"]), new_keys)
        if keep_runs:
            kept_run = pc.is_in(table["run_id"], pa.array(sorted(keep_runs), pa.string()))
            keep = pc.and_(kept_run, pc.equal(table["status"], STATUS_OK)).to_numpy(zero_copy_only=False)
            drop &= ~keep
        removed += _remove_rows(fs, path, drop)
    return removed


INTERRUPTED = frozenset({"running", "cancelled", "failed", "stalled"})


def interrupted_overwrites(fs: AbstractFileSystem, root: str, *, model: str, task: str) -> frozenset[str]:
    """Run ids of the `--overwrite` runs with this model and task that did not complete, newest first
    back to the newest overwrite run that completed or used another model: what a new `--overwrite`
    run with the same model continues instead of starting over."""
    folder = posixpath.join(root, RUNS_DIR)
    if not fs.isdir(folder):
        return frozenset()
    reports = sorted(p for p in fs.ls(folder, detail=False) if p.endswith(".json") and not is_temporary(p))
    chain = []
    for path in reversed(reports):
        try:
            report = json.loads(fs.cat_file(path))
        except (FileNotFoundError, ValueError):  # removed meanwhile, or not a report: other errors are raised
            continue
        if not report.get("config", {}).get("overwrite"):
            continue
        same = report.get("model", {}).get("label") == model and report.get("model", {}).get("task") == task
        if not same or report.get("status") not in INTERRUPTED:
            break
        chain.append(report["run_id"])
    return frozenset(chain)


# --- the work manifest ----------------------------------------------------------------------------


@dataclass
class WorkPlan:
    files: list[str]  # work-manifest Parquet files (paths on the output filesystem)
    pending: np.ndarray  # (N,) uint64 sorted: the images this run processes
    listed: int = 0
    duplicates: int = 0
    already_done: int = 0


def plan_work(listing: Listing, done_keys: np.ndarray, *, fs: AbstractFileSystem, folder: str) -> WorkPlan:
    """Stream the listing into work-manifest files of at most WORK_FILE_ROWS URIs, leaving out images that are
    done (`done_keys`, sorted uint64: an ok row, or under --overwrite an ok row of an interrupted overwrite
    run this one continues) and URIs listed before. The driver holds one chunk of URIs and 8 bytes per
    listed image."""
    seen = np.empty(0, np.uint64)  # sorted keys of every URI listed so far
    plan = WorkPlan(files=[], pending=np.empty(0, np.uint64))
    pending_chunks = []
    for chunk in listing.batches(WORK_CHUNK):
        keys = np.fromiter((image_key(u) for u in chunk), dtype=np.uint64, count=len(chunk))
        keep = np.zeros(len(chunk), dtype=bool)
        keep[np.unique(keys, return_index=True)[1]] = True  # the first of repeats within the chunk
        keep &= ~isin_sorted(keys, seen)
        plan.listed += len(chunk)
        plan.duplicates += int(len(chunk) - keep.sum())
        fresh = np.sort(keys[keep])
        seen = np.insert(seen, np.searchsorted(seen, fresh), fresh)
        done = keep & isin_sorted(keys, done_keys)
        plan.already_done += int(done.sum())
        keep &= ~done
        if keep.any():
            uris = [u for u, k in zip(chunk, keep.tolist(), strict=True) if k]
            for start in range(0, len(uris), WORK_FILE_ROWS):
                part = pa.array(uris[start : start + WORK_FILE_ROWS], pa.string())
                plan.files.append(_write_work_file(fs, folder, f"work-{len(plan.files):06d}", part))
            pending_chunks.append(keys[keep])
    if pending_chunks:
        plan.pending = np.sort(np.concatenate(pending_chunks))
    return plan


def remaining_work(
    plan: WorkPlan, done_keys: np.ndarray, *, fs: AbstractFileSystem, folder: str, round: int
) -> WorkPlan:
    """`plan` less the images in `done_keys` (sorted uint64: committed since it was made), as new work files
    `work-r<round>-NNNNNN.parquet` in `folder`; the plan's own files are removed once those are in place.
    For a pipeline started again within a run (a smaller actor pool after a node was lost)."""
    rest = WorkPlan(files=[], pending=np.setdiff1d(plan.pending, done_keys, assume_unique=True))
    rest.listed, rest.duplicates, rest.already_done = plan.listed, plan.duplicates, plan.already_done
    for old in plan.files:
        uris = with_retries(lambda old=old: read_part(fs, old, ["image_uri"]))["image_uri"]
        keys = np.fromiter((image_key(u) for u in uris.to_pylist()), dtype=np.uint64, count=len(uris))
        left = uris.filter(pa.array(~isin_sorted(keys, done_keys)))
        if len(left):
            rest.files.append(_write_work_file(fs, folder, f"work-r{round}-{len(rest.files):06d}", left))
    for old in plan.files:
        fs.rm(old)
    return rest


def _write_work_file(fs: AbstractFileSystem, folder: str, name: str, uris: pa.Array | pa.ChunkedArray) -> str:
    """One work-manifest file, `folder/name.parquet`, of the column image_uri; returns its path."""
    path = posixpath.join(folder, f"{name}.parquet")
    write_atomic(fs, path, parquet_bytes(pa.table({"image_uri": uris})))
    return path


def read_work_files(batch: pa.Table, *, output: str, storage: Storage) -> pa.Table:
    """The URIs of the work-manifest files named in `batch` (paths on OUTPUT's filesystem)."""
    fs, _ = storage.open(output)
    paths = batch["path"].to_pylist()
    tables = [with_retries(lambda path=path: read_part(fs, path, ["image_uri"])) for path in paths]
    return pa.concat_tables(tables) if tables else pa.table({"image_uri": pa.array([], pa.string())})


def remove_stale_work(fs: AbstractFileSystem, root: str) -> None:
    """Work manifests of runs that were killed.

    Safe because it runs only while this run holds OUTPUT's lease (segment/lease.py, taken before the plan):
    no other run can be live on OUTPUT, so every other run's manifests are a dead run's.
    """
    folder = posixpath.join(root, RUNS_DIR)
    if not fs.isdir(folder):
        return
    for entry in fs.ls(folder, detail=True):
        if entry["type"] == "directory" and entry["name"].rstrip("/").endswith("-work"):
            fs.rm(entry["name"], recursive=True)
