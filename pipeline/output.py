"""The OUTPUT folder's contract: its layout, what a part file is, and how one is written and read.

Every reader and writer of OUTPUT goes through here (the segment job's writer and ledger, previews,
evaluation, the benchmarks), so they cannot disagree on which files hold rows. OUTPUT holds:

    part-<run_id>-<seq:06d>.parquet   the rows (pipeline/schema.py's OUTPUT_SCHEMA), directly under OUTPUT
    _runs/<run_id>.json / .log        each run's report and log; _runs/<run_id>-work/ its work manifests
    _runs/_lease.json                 the lease of the run that holds OUTPUT now (jobs/segment/lease.py)
    _previews/                        PNG previews and their index.html
    _quarantine/                      part files that could not be read, moved aside by a later run
    .<name>.m2f-tmp-*                 an atomic write in progress (storage.write_atomic)

Only names matching PART_PATTERN are rows: a stray `*.parquet`, or anything in a `_` folder, is not.
"""

from __future__ import annotations

import io
import posixpath
import re
import secrets
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec import AbstractFileSystem

from m2f.pipeline.storage import is_temporary

PART_PATTERN = re.compile(r"^part-.+\.parquet$")
RUNS_DIR = "_runs"
PREVIEWS_DIR = "_previews"
QUARANTINE_DIR = "_quarantine"
COMPRESSION = "zstd"


def new_run_id() -> str:
    """UTC timestamp plus a short random suffix: sortable, and unique across concurrent starts."""
    return f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


def part_name(root: str, run_id: str, sequence: int) -> str:
    """The path of a run's `sequence`-th part file: names sort by run, then in commit order."""
    return posixpath.join(root, f"part-{run_id}-{sequence:06d}.parquet")


def is_part_file(path: str) -> bool:
    name = posixpath.basename(path.rstrip("/"))
    return bool(PART_PATTERN.match(name)) and not is_temporary(name)


def list_part_files(fs: AbstractFileSystem, root: str) -> list[str]:
    """The part files directly under `root`, sorted (the listing is fetched afresh, not from a cache)."""
    fs.invalidate_cache(root)  # object stores cache listings; a run may have committed since
    entries = fs.ls(root, detail=True)
    return sorted(e["name"] for e in entries if e.get("type") == "file" and is_part_file(e["name"]))


def run_file(root: str, run_id: str, suffix: str) -> str:
    """`_runs/<run_id><suffix>`: the report (".json"), the log (".log") or the work manifests ("-work")."""
    return posixpath.join(root, RUNS_DIR, f"{run_id}{suffix}")


def preview_index(root: str) -> str:
    """The page that lists a run's previews."""
    return posixpath.join(root, PREVIEWS_DIR, "index.html")


def parquet_bytes(table: pa.Table) -> bytes:
    """A part file's bytes, ready for `storage.write_atomic`."""
    sink = io.BytesIO()
    pq.write_table(table, sink, compression=COMPRESSION)
    return sink.getvalue()


def read_part(fs: AbstractFileSystem, path: str, columns: list[str] | None = None) -> pa.Table:
    with fs.open(path, "rb") as f:
        return pq.read_table(f, columns=columns)
