"""Committing results while the run goes: the driver's part-file writer.

Rows leave the model actors as Ray Data blocks and arrive in the driver, which hands them to one
`PartWriter`. The writer buffers them and commits a part file when `rows_per_file` rows wait, or when the
oldest waiting row has waited `flush_seconds`, whichever comes first; `close()` commits the rest. Files are
uploaded by one background thread, so the driver keeps pulling results while a file is written; at most
`max_queued` files wait for it, after which `add()` blocks, and that back-pressure travels up the Ray Data
pipeline. So the driver holds at most (max_queued + 2) files' worth of rows, whatever the input's size: one
filling, `max_queued` queued, one uploading (four with MAX_QUEUED = 2).

Why the driver writes, and not Ray tasks or writer actors (see also segment/job.py's docstring):
- a commit by size *or age* needs one owner of the buffer with a clock; Ray Data tasks only see the
  blocks they are given (a row-count repartition before the write stage was a barrier: nothing was
  written until the last model task ended);
- on SIGTERM the process that receives the signal already holds every result that left the model, and
  writes it straight to storage: nothing to ask of a Ray that may be shutting down or gone;
- a writer actor would be one more process to lose with its node, taking uncommitted rows with it.
The cost: every row crosses to the driver's node. Rows are compact (RLE masks, statistics); one writer
thread encodes and uploads well over a thousand rows a second (bench/), more than the model actors of a
large GPU cluster produce.

Part files are named `part-<run_id>-<sequence>.parquet` and written atomically (`write_atomic`, which
retries transient storage errors); a write that still fails fails the run, keeping every earlier file.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from fsspec import AbstractFileSystem

from m2f.jobs.common.configs import FLUSH_SECONDS
from m2f.jobs.segment.resume import ids_to_keys
from m2f.pipeline.output import parquet_bytes, part_name
from m2f.pipeline.schema import OUTPUT_SCHEMA, STATUS_OK
from m2f.pipeline.storage import write_atomic

MAX_QUEUED = 2  # files waiting for the upload thread before add() blocks


@dataclass
class Commit:
    """One part file, committed."""

    file: str
    ok: int
    error: int
    inference_ms: float  # summed model time of the ok rows
    error_reasons: Counter[str] = field(default_factory=Counter)
    keys: np.ndarray = field(default_factory=lambda: np.empty(0, np.uint64))  # (N,) uint64 image keys


def error_category(reason: str) -> str:
    """The fixed part of an error reason: "truncated or corrupt: ..." -> "truncated or corrupt"."""
    return reason.split(":", 1)[0].strip() or "unknown"


def describe_rows(table: pa.Table, file: str = "") -> Commit:
    """Counts of an OUTPUT_SCHEMA table, as its commit will report them."""
    status = pc.equal(table["status"], STATUS_OK)
    ok = int(pc.sum(status).as_py() or 0)
    reasons = Counter(error_category(r) for r in table["error"].to_pylist() if r is not None)
    inference_ms = pc.sum(pc.if_else(status, table["inference_ms"], 0.0)).as_py() or 0.0
    return Commit(file, ok, table.num_rows - ok, float(inference_ms), reasons, ids_to_keys(table["image_id"]))


class PartWriter:
    """Buffers OUTPUT_SCHEMA rows and commits them as part files under `root` (see the module docstring).

    `on_commit(commit)` is called from the upload thread after each file is in place. A write that fails
    after its retries is raised from the next `add()` or `close()`; nothing more is written after it.
    """

    def __init__(
        self,
        fs: AbstractFileSystem,
        root: str,
        run_id: str,
        *,
        rows_per_file: int,
        flush_seconds: float = FLUSH_SECONDS,
        on_commit: Callable[[Commit], None] | None = None,
        max_queued: int = MAX_QUEUED,
    ) -> None:
        if rows_per_file < 1:
            raise ValueError(f"rows_per_file must be >= 1, got {rows_per_file}")
        self.fs, self.root, self.run_id = fs, root, run_id
        self.rows_per_file = rows_per_file
        self.flush_seconds = flush_seconds
        self.on_commit = on_commit
        self._lock = threading.Lock()  # guards the buffer and the sequence number
        self._buffer: list[pa.Table] = []
        self._buffered = 0  # rows in _buffer
        self._oldest: float | None = None  # monotonic time the oldest buffered row arrived
        self._sequence = 0
        self._queue: queue.Queue[tuple[str, pa.Table] | None] = queue.Queue(maxsize=max_queued)
        self._failure: BaseException | None = None
        self._idle = threading.Event()  # set while nothing is queued or being written
        self._idle.set()
        self._pending = 0  # files queued or being written
        self._pending_rows = 0  # the rows in them
        self._thread = threading.Thread(target=self._upload_loop, name="m2f-part-writer", daemon=True)
        self._thread.start()

    # --- producers ------------------------------------------------------------------------------

    def add(self, table: pa.Table) -> None:
        """Buffer `table`; commit a file for every `rows_per_file` rows buffered. May block (back-pressure)."""
        self._raise_failure()
        if not table.num_rows:
            return
        table = table.select(OUTPUT_SCHEMA.names).cast(OUTPUT_SCHEMA)
        with self._lock:
            if self._oldest is None:
                self._oldest = time.monotonic()
            self._buffer.append(table)
            self._buffered += table.num_rows
            files = []
            while self._buffered >= self.rows_per_file:
                files.append(self._cut(self.rows_per_file))
        for item in files:
            self._enqueue(item)

    def flush_if_due(self) -> bool:
        """Commit everything buffered if its oldest row has waited `flush_seconds`; True if it did."""
        with self._lock:
            due = self._oldest is not None and time.monotonic() - self._oldest >= self.flush_seconds
            item = self._cut(self._buffered) if due and self._buffered else None
        if item is not None:
            self._enqueue(item)
        return item is not None

    def close(self, timeout: float | None = None) -> bool:
        """Commit what is buffered and wait for every file; True when all are in place within `timeout`,
        and the writer takes nothing more. Raises the write failure, if there was one."""
        done = self._commit_all(timeout)
        if done:
            self._queue.put(None)  # the upload thread ends
        self._raise_failure()
        return done

    def drain(self, timeout: float | None = None) -> bool:
        """Commit what is buffered and wait for every file, as `close` does, but stay open for more rows."""
        done = self._commit_all(timeout)
        self._raise_failure()
        return done

    @property
    def failure(self) -> BaseException | None:
        """The write that failed after its retries, if one did."""
        return self._failure

    @property
    def buffered(self) -> int:
        with self._lock:
            return self._buffered

    @property
    def uncommitted(self) -> int:
        """Rows handed to the writer and not yet in a part file: buffered, queued or being written."""
        with self._lock:
            return self._buffered + self._pending_rows

    # --- internals ------------------------------------------------------------------------------

    def _commit_all(self, timeout: float | None) -> bool:
        """Queue what is buffered and wait until every file is written; False if `timeout` passed first."""
        with self._lock:
            item = self._cut(self._buffered) if self._buffered else None
        deadline = None if timeout is None else time.monotonic() + timeout
        if item is not None and not self._enqueue(item, deadline):
            self._put_back(item)  # the queue stayed full: the rows wait in the buffer for the next call
            return False
        return self._idle.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))

    def _cut(self, rows: int) -> tuple[str, pa.Table]:
        """Take the first `rows` buffered rows as the next file (under the lock)."""
        table = pa.concat_tables(self._buffer)
        head, rest = table.slice(0, rows), table.slice(rows)
        self._buffer = [rest] if rest.num_rows else []
        self._buffered = rest.num_rows
        self._oldest = time.monotonic() if rest.num_rows else None  # the rest arrived with the cut rows at worst
        name = part_name(self.root, self.run_id, self._sequence)
        self._sequence += 1
        self._pending += 1
        self._pending_rows += head.num_rows
        self._idle.clear()
        return name, head.combine_chunks()

    def _put_back(self, item: tuple[str, pa.Table]) -> None:
        """Undo `_cut` for a file that never reached the queue (its name is not reused: names may skip)."""
        with self._lock:
            table = item[1]
            self._buffer.insert(0, table)
            self._buffered += table.num_rows
            self._oldest = 0.0  # overdue: these rows were already on their way to a file
            self._pending -= 1
            self._pending_rows -= table.num_rows
            if not self._pending:
                self._idle.set()

    def _enqueue(self, item: tuple[str, pa.Table], deadline: float | None = None) -> bool:
        while True:
            self._raise_failure()
            wait = 1.0 if deadline is None else min(1.0, deadline - time.monotonic())
            if wait <= 0:  # out of time, but a free place in the queue costs nothing to take
                try:
                    self._queue.put_nowait(item)
                    return True
                except queue.Full:
                    return False
            try:
                self._queue.put(item, timeout=wait)
                return True
            except queue.Full:
                continue

    def _upload_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            path, table = item
            try:
                if self._failure is None:
                    commit = describe_rows(table, path)
                    write_atomic(self.fs, path, parquet_bytes(table))
                    if self.on_commit is not None:
                        self.on_commit(commit)
            except BaseException as e:  # kept for the producer: the run fails, earlier files stay
                self._failure = e
            finally:
                with self._lock:
                    self._pending -= 1
                    self._pending_rows -= table.num_rows
                    if not self._pending:
                        self._idle.set()

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure
