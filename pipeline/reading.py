"""Reading listed images without trusting them: inspect each object first, read at most a bounded number of
bytes, give up on a read that does not finish, and hold a bounded number of bytes per task.

Anyone upstream can put anything into a bucket or a manifest: `/dev/zero`, a FIFO that never yields, a
sparse 2 GB "jpg", a socket, a folder. Each becomes that image's error row, never a full node or a stalled
run:

- **Inspected before it is read.** A local path is `stat`ed (following links, as a reader would) and only a
  regular file is opened, then checked again on the open descriptor (`fstat`), so a file swapped for a FIFO
  between the two is still refused; an object is `info`ed (S3: a HEAD). Anything else reads
  `not a regular file: <kind>`; a size over the limit reads `too large: N bytes > limit L`, unread.
- **Bounded reads.** A read never returns more than `max_file_bytes + 1` bytes, whatever the size said
  (a file that grew, a server with no Content-Length): one byte over is enough to call it too large.
- **Deadlines.** Each read runs in a daemon thread and is given `timeout_s` plus time for its size; one that
  has not finished by then is that image's `unreadable: read timed out ...` (the thread is abandoned, and
  being a daemon it never holds the worker's exit).
- **A byte budget per task.** Reads run ahead of decoding only while the bytes read and not yet decoded stay
  under `budget_bytes` (one file larger than the budget is read alone), so a batch of large files costs
  one budget, not the batch's sum.
"""

from __future__ import annotations

import os
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any

from fsspec import AbstractFileSystem

from m2f.pipeline.storage import is_local, with_retries

DEFAULT_MAX_FILE_BYTES = 512 * 1024**2  # larger than any photo a camera makes; a 100 MP PNG is ~300 MB at worst
READ_TIMEOUT_S = 120.0  # a read that has not finished by then (plus READ_SECONDS_PER_MIB of its size) is given up
READ_SECONDS_PER_MIB = 0.25  # the allowance for the file's size: 4 MiB/s, far below any storage we read from
READ_BUDGET_BYTES = 256 * 1024**2  # bytes read but not yet decoded, per prepare task
READ_THREADS = 8  # concurrent reads per task: object-store GETs wait on the network, not the CPU
CHUNK_BYTES = 8 * 1024**2  # local reads, a chunk at a time
CREDENTIALS_IN_URI = (
    "credentials in URI: refused (user:password@ in a URI ends up in logs and outputs); "
    "give them through the environment (AWS_ACCESS_KEY_ID, ...) or --storage-options"
)


@dataclass(frozen=True)
class ReadLimits:
    """What one task may read: bytes per file, seconds per read, bytes in hand, reads at once."""

    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
    timeout_s: float = READ_TIMEOUT_S
    budget_bytes: int = READ_BUDGET_BYTES
    threads: int = READ_THREADS

    def deadline_s(self, size: int | None) -> float:
        """Seconds a read of `size` bytes may take (the limit's worth where the size is unknown)."""
        return self.timeout_s + READ_SECONDS_PER_MIB * (size if size is not None else self.max_file_bytes) / 2**20


class Unreadable(Exception):
    """A listed object that is not read; `reason` is its error row's text."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def too_large(size: int, limit: int) -> Unreadable:
    return Unreadable(f"too large: {size} bytes > limit {limit} (--max-file-bytes)")


def _kind(mode: int) -> str:
    """What a non-regular file is, in words."""
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a file"


def inspect(fs: AbstractFileSystem, path: str, limit: int) -> int | None:
    """The size of the regular file or object at `path` (None: the store does not say); raises `Unreadable`
    for anything else or anything larger than `limit`, FileNotFoundError where nothing is there."""
    if is_local(fs):
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise Unreadable(f"not a regular file: {_kind(st.st_mode)}")
        size: int | None = st.st_size
    else:
        info = with_retries(lambda: fs.info(path))
        if info.get("type") != "file":
            raise Unreadable(f"not a regular file: {info.get('type') or 'unknown type'}")
        size = info.get("size")
        size = int(size) if size is not None else None
    if size is not None and size > limit:
        raise too_large(size, limit)
    return size


def read_bounded(fs: AbstractFileSystem, path: str, size: int | None, limit: int) -> bytes:
    """At most `limit` bytes of the file `inspect` passed (`size` as it said); `Unreadable` if there is more."""
    if is_local(fs):
        data = _read_local(path, limit)
    elif size == 0:
        data = b""
    elif size is not None:
        # A ranged GET: an object replaced by a larger one since the HEAD still yields `size` bytes at most.
        data = with_retries(lambda: fs.cat_file(path, start=0, end=size))
    else:
        data = with_retries(lambda: _read_stream(fs, path, limit))
    if len(data) > limit:
        raise too_large(len(data), limit)
    return data


def _read_local(path: str, limit: int) -> bytes:
    # O_NONBLOCK: a file swapped for a FIFO after the stat must not block the open; fstat then refuses it.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Unreadable(f"not a regular file: {_kind(st.st_mode)}")
        if st.st_size > limit:
            raise too_large(st.st_size, limit)
        chunks, total = [], 0
        while total <= limit:
            chunk = os.read(fd, min(CHUNK_BYTES, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _read_stream(fs: AbstractFileSystem, path: str, limit: int) -> bytes:
    with fs.open(path, "rb") as f:
        return f.read(limit + 1)


def _in_thread(fn: Callable[[], Any]) -> Future:
    """`fn()` in a daemon thread, as a Future: a read that never returns is abandoned, not waited for."""
    future: Future = Future()

    def run() -> None:
        try:
            future.set_result(fn())
        except BaseException as e:  # handed to the waiting side
            future.set_exception(e)

    threading.Thread(target=run, name="m2f-read", daemon=True).start()
    return future


Outcome = bytes | str  # the file's bytes, or its error row's reason


def read_all(
    uris: Sequence[str],
    open_uri: Callable[[str], tuple[AbstractFileSystem, str]],
    limits: ReadLimits,
    describe: Callable[[BaseException], str],
) -> Iterator[tuple[str, Outcome]]:
    """(uri, bytes or reason) for each of `uris`, in order, as `limits` allow (see the module docstring).

    `open_uri` gives a URI's filesystem and path; `describe` turns an unexpected storage error into the
    detail of an `unreadable: ...` reason (it must scrub secrets). The caller decodes each file before
    asking for the next, so at most `budget_bytes` (or one larger file) are read and not yet decoded.
    """
    inspections = _inspect_all(uris, open_uri, limits)
    deadline = time.monotonic() + limits.timeout_s  # for them all: they ran side by side
    sizes: list[int | None | str] = [_inspected(f, deadline, limits, describe) for f in inspections]  # str: a reason
    reads: deque[tuple[Future | str, float]] = deque()  # the reads started, in order: (read or reason, deadline)
    in_hand = 0  # bytes of the started reads not yet handed out, by their inspected sizes
    started = 0
    for index, uri in enumerate(uris):
        while started < len(uris) and len(reads) < max(1, limits.threads):
            cost = _cost(sizes[started])
            if reads and in_hand + cost > limits.budget_bytes:
                break
            reads.append(_start_read(uris[started], sizes[started], open_uri, limits))
            in_hand += cost
            started += 1
        read, deadline = reads.popleft()
        in_hand -= _cost(sizes[index])
        outcome = _outcome(read, deadline, sizes[index], limits, describe)
        del read  # the future holds the bytes too
        yield uri, outcome
        outcome = b""  # the caller has decoded the file: its bytes are not kept here while the next arrive


def _cost(size: int | None | str) -> int:
    return size if isinstance(size, int) else 0


def _inspect_all(
    uris: Sequence[str], open_uri: Callable[[str], tuple[AbstractFileSystem, str]], limits: ReadLimits
) -> list[Future]:
    """Every URI's inspection (a stat, or a HEAD on object stores), `limits.threads` at a time."""
    slots = threading.Semaphore(max(1, limits.threads))

    def one(uri: str) -> int | None:
        with slots:
            fs, path = open_uri(uri)
            return inspect(fs, path, limits.max_file_bytes)

    return [_in_thread(lambda uri=uri: one(uri)) for uri in uris]


def _inspected(
    future: Future, deadline: float, limits: ReadLimits, describe: Callable[[BaseException], str]
) -> int | None | str:
    """The size an inspection found (None: unknown), or the reason the file is not read."""
    try:
        return future.result(timeout=max(0.0, deadline - time.monotonic()))
    except FutureTimeout:
        return f"unreadable: inspecting it timed out after {limits.timeout_s:g} s"
    except BaseException as e:
        return _reason(e, describe)


def _start_read(
    uri: str,
    size: int | None | str,
    open_uri: Callable[[str], tuple[AbstractFileSystem, str]],
    limits: ReadLimits,
) -> tuple[Future | str, float]:
    if isinstance(size, str):
        return size, 0.0

    def read() -> bytes:
        fs, path = open_uri(uri)
        return read_bounded(fs, path, size, limits.max_file_bytes)

    return _in_thread(read), time.monotonic() + limits.deadline_s(size)


def _outcome(
    read: Future | str, deadline: float, size: int | None | str, limits: ReadLimits, describe: Callable
) -> Outcome:
    if isinstance(read, str):
        return read
    try:
        return read.result(timeout=max(0.0, deadline - time.monotonic()))
    except FutureTimeout:
        seconds = limits.deadline_s(size if isinstance(size, int) else None)
        return f"unreadable: read timed out after {seconds:.0f} s"
    except BaseException as e:
        return _reason(e, describe)


def _reason(e: BaseException, describe: Callable[[BaseException], str]) -> str:
    if isinstance(e, Unreadable):
        return e.reason
    if isinstance(e, FileNotFoundError):
        return "unreadable: file not found"
    return f"unreadable: {describe(e)}"
