"""Where the lease on OUTPUT lives (segment/lease.py): the lease file's conditional operations, one class per
kind of filesystem. A token names one version of the file; `create`, `replace` and `remove` act only while
the file is absent, or still that version, so that of two runs racing for it exactly one wins:

- local files: the record is written to a hidden temporary, flushed, and hard-linked to the lease's name;
  link(2) fails when the name exists, and a reader sees the whole record or nothing (where links are not
  supported, O_EXCL on the name itself). The holder's heartbeat rewrites its own inode in place (same
  length) through the descriptor it kept, so it can never touch another run's lease; it holds the lease
  while the name points at that inode. Removing a version (a take-over, a release) renames the file aside
  under a unique name, checks that the moved file is that inode, and puts it back if it is not.
- S3 (s3fs): a PUT with `If-None-Match: *` creates, a PUT with `If-Match: <ETag>` replaces (the heartbeat, a
  take-over), a DELETE with `If-Match` removes; all through the s3fs filesystem's own botocore client, so
  the user's endpoint, credentials and options apply. A run whose lease was taken over gets 412 instead of
  overwriting the new holder.
- GCS (gcsfs): the create is an upload with `ifGenerationMatch=0` (gcsfs `pipe_file(mode="create")`); the
  rest is best effort, as below.
- any other filesystem: best effort. Write when absent, then read back and compare; replace and remove
  compare the content first. Two runs starting within one round trip of each other may both believe they
  hold the lease until the loser's next heartbeat.
"""

from __future__ import annotations

import contextlib
import errno
import os
import uuid
from typing import Any, Protocol

from fsspec import AbstractFileSystem
from fsspec.asyn import sync

from m2f.pipeline.storage import is_local, temporary_path
from m2f.pipeline.storage.retries import error_chain, s3_error

NO_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS}  # link(2) unsupported (FUSE, SMB)


class Store(Protocol):
    """Conditional operations on the lease file; a token names one version of it."""

    def read(self) -> tuple[bytes, Any, float] | None: ...  # (record, token, modified epoch s); None: absent

    def create(self, data: bytes) -> Any | None: ...  # the new token; None: a lease is there

    def replace(self, data: bytes, token: Any) -> Any | None: ...  # None: the lease is no longer `token`

    def remove(self, token: Any) -> bool: ...  # False: the lease was no longer `token`

    def close(self) -> None: ...


class _LocalStore:
    """Local files: link(2) for the create, in-place rewrites of our inode, rename-aside for removal."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd: int | None = None  # our lease's inode, kept open for the heartbeat
        self.own: tuple[int, int] | None = None
        self.made: list[str] = []  # folders the create made: removed again on close if still empty

    def read(self) -> tuple[bytes, Any, float] | None:
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            st, data = os.fstat(fd), os.pread(fd, 1 << 16, 0)
            for _ in range(5):  # a heartbeat may rewrite it as we read: until two reads agree
                again = os.pread(fd, 1 << 16, 0)
                if again == data:
                    break
                data = again
            return data, (st.st_dev, st.st_ino), st.st_mtime
        finally:
            os.close(fd)

    def create(self, data: bytes) -> Any | None:
        folder = os.path.dirname(self.path)
        if not os.path.isdir(folder):
            self.made = [p for p in (os.path.dirname(folder), folder) if not os.path.isdir(p)]
            os.makedirs(folder, exist_ok=True)
        tmp = temporary_path(self.path)
        fd, linked = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), False
        try:
            os.write(fd, data)
            os.fsync(fd)
            os.link(tmp, self.path)
            linked = True
        except (FileExistsError, FileNotFoundError):  # taken; or a holder's tidying removed our temporary
            return None
        except OSError as e:
            if e.errno not in NO_LINKS:
                raise
            return self._create_in_place(data)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            if not linked:
                os.close(fd)
        _fsync_folder(folder)
        st = os.fstat(fd)
        self.fd, self.own = fd, (st.st_dev, st.st_ino)
        return self.own

    def _create_in_place(self, data: bytes) -> Any | None:
        """Where hard links are not supported: O_EXCL on the name itself. A reader may meet the record
        half-written for an instant; it counts as a fresh lease of an unknown run (`Holder.parse`)."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return None
        os.write(fd, data)
        os.fsync(fd)
        st = os.fstat(fd)
        self.fd, self.own = fd, (st.st_dev, st.st_ino)
        return self.own

    def replace(self, data: bytes, token: Any) -> Any | None:
        if self.fd is not None and token == self.own:  # our heartbeat: our own inode, wherever it is now
            os.pwrite(self.fd, data, 0)
            os.ftruncate(self.fd, len(data))
            os.fsync(self.fd)
            try:
                st = os.stat(self.path)
            except FileNotFoundError:
                return None
            return token if (st.st_dev, st.st_ino) == token else None
        return self.create(data) if self.remove(token) else None  # a take-over

    def remove(self, token: Any) -> bool:
        folder, name = os.path.split(self.path)
        aside = os.path.join(folder, f".{name}.aside-{uuid.uuid4().hex}")  # not a temporary: no one tidies it
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        st = os.stat(aside)
        if (st.st_dev, st.st_ino) != token:  # another run's lease, created since we looked: put it back
            with contextlib.suppress(FileExistsError):
                os.link(aside, self.path)
            os.unlink(aside)
            return False
        os.unlink(aside)
        _fsync_folder(folder)
        return True

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        for folder in reversed(self.made):  # a run that ended before writing anything leaves no folder
            with contextlib.suppress(OSError):
                os.rmdir(folder)


class _S3Store:
    """S3 conditional writes (If-None-Match / If-Match on the ETag) through the s3fs filesystem's client."""

    def __init__(self, fs: AbstractFileSystem, path: str) -> None:
        self.fs = fs
        self.bucket, self.key, _ = fs.split_path(path)

    def read(self) -> tuple[bytes, Any, float] | None:
        async def get() -> tuple[bytes, Any, float]:
            out = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self.key)
            body = out["Body"]
            try:
                return await body.read(), out["ETag"], out["LastModified"].timestamp()
            finally:
                body.close()

        try:
            return sync(self.fs.loop, get)
        except FileNotFoundError:
            return None

    def create(self, data: bytes) -> Any | None:
        return self._put(data, IfNoneMatch="*")

    def replace(self, data: bytes, token: Any) -> Any | None:
        return self._put(data, IfMatch=token)

    def remove(self, token: Any) -> bool:
        try:
            self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key, IfMatch=token)
        except Exception as e:
            if isinstance(e, FileNotFoundError) or _precondition_failed(e):
                return False
            raise
        return True

    def _put(self, data: bytes, **condition: str) -> Any | None:
        try:
            out = self.fs.call_s3(
                "put_object", Bucket=self.bucket, Key=self.key, Body=data, ContentType="application/json", **condition
            )
        except Exception as e:  # 412: the condition did not hold; 404: If-Match on a lease that is gone
            if isinstance(e, FileNotFoundError) or _precondition_failed(e):
                return None
            raise
        return out["ETag"]

    def close(self) -> None:
        pass


class _BestEffortStore:
    """Any other fsspec filesystem: compare, then write; a token is the record itself. GCS creates with
    `ifGenerationMatch=0` (gcsfs `pipe_file(mode="create")`, FileExistsError when taken)."""

    def __init__(self, fs: AbstractFileSystem, path: str, *, exclusive: bool) -> None:
        self.fs, self.path, self.exclusive = fs, path, exclusive

    def read(self) -> tuple[bytes, Any, float] | None:
        self.fs.invalidate_cache(self.path)
        try:
            data = self.fs.cat_file(self.path)
        except FileNotFoundError:
            return None
        try:
            modified = self.fs.modified(self.path).timestamp()
        except Exception:  # unknown: an unreadable record of unknown age is taken over
            modified = 0.0
        return data, data, modified

    def create(self, data: bytes) -> Any | None:
        try:
            if self.exclusive:
                self.fs.pipe_file(self.path, data, mode="create")
            elif self.fs.exists(self.path):
                return None
            else:
                self.fs.pipe_file(self.path, data)
        except FileExistsError:
            return None
        current = self.read()
        return data if current is not None and current[0] == data else None

    def replace(self, data: bytes, token: Any) -> Any | None:
        current = self.read()
        if current is None or current[1] != token:
            return None
        self.fs.pipe_file(self.path, data)
        current = self.read()
        return data if current is not None and current[0] == data else None

    def remove(self, token: Any) -> bool:
        current = self.read()
        if current is None or current[1] != token:
            return False
        self.fs.rm_file(self.path)
        return True

    def close(self) -> None:
        pass


def open_store(fs: AbstractFileSystem, path: str) -> Store:
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    if is_local(fs):
        return _LocalStore(path)
    if protocols & {"s3", "s3a"}:
        return _S3Store(fs, path)
    return _BestEffortStore(fs, path, exclusive=bool(protocols & {"gs", "gcs"}))


def _precondition_failed(e: BaseException) -> bool:
    """412 (the condition did not hold) or 409 ConditionalRequestConflict (a concurrent conditional write)."""
    for cause in error_chain(e):
        if isinstance(cause, FileExistsError):
            return True
        answer = s3_error(cause)
        if answer is not None:
            return answer[0] in ("PreconditionFailed", "ConditionalRequestConflict") or answer[1] in (409, 412)
    return False


def _fsync_folder(folder: str) -> None:
    """Make a link, rename or unlink in `folder` durable (a no-op where folders cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
