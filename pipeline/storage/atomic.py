"""Writes that a reader sees whole or not at all, and the hidden temporaries they leave when killed.

Temporary files start with "." so that Parquet/Arrow dataset readers (which skip names beginning with
"." or "_") never mistake a half-written file for output.
"""

from __future__ import annotations

import logging
import os
import posixpath
import uuid
from collections.abc import Iterable

from fsspec import AbstractFileSystem

from m2f.pipeline.storage.opening import is_local, is_object_store
from m2f.pipeline.storage.retries import with_retries

logger = logging.getLogger(__name__)

TEMP_PREFIX = "."
TEMP_MARKER = ".m2f-tmp-"


def temporary_path(path: str) -> str:
    """A unique hidden sibling of `path` for writing before the final move."""
    folder, name = posixpath.split(path)
    return posixpath.join(folder, f"{TEMP_PREFIX}{name}{TEMP_MARKER}{uuid.uuid4().hex}")


def is_temporary(path: str) -> bool:
    return TEMP_MARKER in posixpath.basename(path)


def write_atomic(fs: AbstractFileSystem, path: str, data: bytes | str) -> None:
    """Write `data` at `path` so that a reader sees either nothing or the whole file.

    Object stores: one PUT, which is atomic (a rename there is copy + delete, so no temporary).
    Other filesystems: write a hidden temporary in the same folder, flush it to disk, then move it
    over `path` (a rename within one folder is atomic on POSIX). A kill mid-write leaves at most a
    hidden temporary, which dataset readers skip and `remove_temporaries` cleans.

    Transient failures are retried (`with_retries`): each attempt is one whole PUT or a fresh
    temporary, so a retry never mixes two attempts' bytes.
    """
    payload = data.encode("utf-8") if isinstance(data, str) else data
    if is_object_store(fs):
        with_retries(lambda: fs.pipe_file(path, payload))
        return
    with_retries(lambda: _write_via_temporary(fs, path, payload))


def _write_via_temporary(fs: AbstractFileSystem, path: str, payload: bytes) -> None:
    folder = posixpath.dirname(path)
    if folder:
        fs.makedirs(folder, exist_ok=True)
    tmp = temporary_path(path)
    try:
        if is_local(fs):
            with open(tmp, "wb") as f:
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        else:
            fs.pipe_file(tmp, payload)
            fs.mv(tmp, path)
    except BaseException:
        try:  # best effort: a failing clean-up must not hide why the write failed
            if fs.exists(tmp):
                fs.rm(tmp)
        except Exception:
            logger.debug("could not remove the temporary %s", tmp, exc_info=True)
        raise


def remove_temporaries(fs: AbstractFileSystem, paths: Iterable[str]) -> int:
    """Delete leftover temporaries (from a killed run) among `paths`; returns how many."""
    stale = [p for p in paths if is_temporary(p)]
    for p in stale:
        fs.rm(p)
    return len(stale)
