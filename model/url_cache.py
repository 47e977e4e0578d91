"""Downloads by URL into a local cache that survives killed processes and flaky servers.

One file per URL under `M2F_CACHE` (default `$XDG_CACHE_HOME/m2f`, else `~/.cache/m2f`), named
`<sha256(url)[:16]>-<basename>` so loaders still see the suffix. The file appears under that name only
complete: written aside, fsynced, checked against the announced Content-Length (and a sha256 or md5
prefix when known), then renamed. A cut transfer is resumed (Range + If-Range) or restarted, a few
times. A JSON sidecar keeps the ETag/Last-Modified and sha256, so a warm cache costs one conditional
request (304, no body), or none offline (`M2F_OFFLINE=1` or `HF_HUB_OFFLINE=1`). Processes on one
machine take turns through `<file>.lock` (fcntl.flock, released by the kernel if a process dies).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import http.client
import json
import logging
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CHUNK = 1 << 20


@dataclass(frozen=True)
class Cached:
    path: str
    sha256: str
    downloaded: bool  # bytes came over the network in this call


def offline() -> bool:
    return any(_is_true(os.environ.get(name)) for name in ("M2F_OFFLINE", "HF_HUB_OFFLINE"))


def cache_root() -> Path:
    if os.environ.get("M2F_CACHE"):
        return Path(os.environ["M2F_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "m2f"


def cached_name(url: str) -> str:
    """`<sha256(url)[:16]>-<basename>`: one file per URL, keeping the suffix that tells loaders the format."""
    base = re.sub(r"[^\w.-]", "_", urllib.parse.urlparse(url).path.rsplit("/", 1)[-1]) or "download"
    return f"{hashlib.sha256(url.encode()).hexdigest()[:16]}-{base}"


def fetch_url(
    url: str,
    *,
    sha256: str | None = None,
    md5_prefix: str | None = None,
    cache_dir: str | Path | None = None,
    retries: int = 3,
    timeout: float = 60.0,
    label: str | None = None,
) -> Cached:
    """The cached copy of `url`, downloaded or refreshed (conditional GET) first unless offline.

    `label` is how messages name the file when the user named it otherwise (a zoo name).
    """
    final = Path(cache_dir or cache_root()) / "downloads" / cached_name(url)
    if offline():
        if not final.exists():
            raise ValueError(
                unreachable_message(label or url, f"offline mode is on and it is not in the cache ({final})")
            )
        return _from_cache(url, final, sha256)
    final.parent.mkdir(parents=True, exist_ok=True)
    with _locked(final):  # a second process waits here, then finds the file and asks only for a 304
        meta = _read_meta(final)
        validators = meta if final.exists() and meta is not None else None
        try:
            meta = _download(url, final, validators, sha256, md5_prefix, retries, timeout)
        except _Unreachable as e:
            if validators is None:
                raise ValueError(unreachable_message(label or url, str(e))) from None
            log.warning("%s is unreachable (%s); using the cached copy %s", url, e, final)
            meta = None
        if meta is None:  # 304 Not Modified, or unreachable with a cached copy
            return _from_cache(url, final, sha256)
    return Cached(str(final), meta["sha256"], True)


def _from_cache(url: str, final: Path, sha256: str | None) -> Cached:
    meta = _read_meta(final)
    digest = meta["sha256"] if meta and meta.get("sha256") else sha256_file(final)
    if sha256 is not None and digest != sha256.lower():
        raise ValueError(f"the cached copy of {url} ({final}) has sha256 {digest}, not the expected {sha256}")
    return Cached(str(final), digest, False)


class _Unreachable(Exception):
    """No connection to the server at all (refused, DNS, timeout before any byte)."""


def _download(
    url: str,
    final: Path,
    validators: dict[str, Any] | None,
    sha256: str | None,
    md5_prefix: str | None,
    retries: int,
    timeout: float,
) -> dict[str, Any] | None:
    """GET `url` into `final` (aside, fsync, rename) and write its sidecar; None on 304 Not Modified."""
    for stale in final.parent.glob(final.name + ".part-*"):  # left by killed runs; we hold the lock
        stale.unlink(missing_ok=True)
    part = final.with_name(f"{final.name}.part-{os.getpid()}")
    state = _Transfer()
    failures = 0
    try:
        with open(part, "wb") as out:
            while True:
                try:
                    with _request(url, state.headers(validators), timeout) as resp:
                        state.start(resp, out)
                        while chunk := resp.read(CHUNK):
                            state.add(chunk, out)
                    if state.total is None or state.received >= state.total:
                        break
                    raise ConnectionError(f"connection closed after {state.received} of {state.total} bytes")
                except urllib.error.HTTPError as e:
                    if e.code == 304 and state.received == 0 and validators:
                        return None
                    if e.code == 416:  # our range no longer fits the file: start over
                        state.reset(out)
                    elif e.code not in (408, 429, 500, 502, 503, 504):
                        raise ValueError(f"cannot download {url}: HTTP {e.code} {e.reason}") from None
                    failures = _retry_or_raise(url, e, failures, retries, state)
                except (OSError, http.client.HTTPException) as e:  # refused, reset, timed out, cut short
                    failures = _retry_or_raise(url, e, failures, retries, state)
            out.flush()
            os.fsync(out.fileno())
        if state.total is not None and state.received != state.total:
            raise ValueError(f"{url}: got {state.received} bytes, the server announced {state.total}")
        digest = state.sha256.hexdigest()
        if sha256 is not None and digest != sha256.lower():
            raise ValueError(f"{url}: sha256 {digest} does not match the expected {sha256}")
        if md5_prefix is not None and not state.md5.hexdigest().startswith(md5_prefix):
            raise ValueError(f"{url}: md5 {state.md5.hexdigest()} does not start with {md5_prefix} (its file name)")
        os.replace(part, final)
        _fsync_dir(final.parent)
        meta = {"url": url, "etag": state.etag, "last_modified": state.last_modified}
        meta |= {"size": state.received, "sha256": digest}
        _write_meta(final, meta)
        log.info("downloaded %s (%d bytes) to %s", url, state.received, final)
        return meta
    finally:
        part.unlink(missing_ok=True)


class _Transfer:
    """One file's bytes so far, its validators, and the request headers that continue it."""

    def __init__(self) -> None:
        self.total: int | None = None
        self.etag: str | None = None
        self.last_modified: str | None = None
        self.received = 0
        self.sha256 = hashlib.sha256()
        self.md5 = hashlib.md5(usedforsecurity=False)

    def headers(self, validators: dict[str, Any] | None) -> dict[str, str]:
        headers = {"User-Agent": "m2f", "Accept-Encoding": "identity"}
        if self.received == 0:
            if validators and validators.get("etag"):
                headers["If-None-Match"] = validators["etag"]
            if validators and validators.get("last_modified"):
                headers["If-Modified-Since"] = validators["last_modified"]
            return headers
        # Resume only against a strong validator: without one the file could change between the pieces.
        strong = self.etag if self.etag and not self.etag.startswith("W/") else self.last_modified
        if strong:
            headers["Range"] = f"bytes={self.received}-"
            headers["If-Range"] = strong
        return headers

    def start(self, resp: http.client.HTTPResponse, out: Any) -> None:
        if resp.status == 206:
            match = re.match(r"bytes (\d+)-\d+/(\d+|\*)", resp.headers.get("Content-Range", ""))
            if match is None or int(match.group(1)) != self.received:
                self.reset(out)
                raise ConnectionError(f"unexpected Content-Range {resp.headers.get('Content-Range')!r}")
            if match.group(2) != "*":
                self.total = int(match.group(2))
            return
        self.reset(out)  # a full body: from the first byte
        length = resp.headers.get("Content-Length")
        self.total = int(length) if length and length.isdigit() else None
        self.etag = resp.headers.get("ETag")
        self.last_modified = resp.headers.get("Last-Modified")

    def add(self, chunk: bytes, out: Any) -> None:
        out.write(chunk)
        self.sha256.update(chunk)
        self.md5.update(chunk)
        self.received += len(chunk)

    def reset(self, out: Any) -> None:
        out.seek(0)
        out.truncate()
        self.received = 0
        self.sha256 = hashlib.sha256()
        self.md5 = hashlib.md5(usedforsecurity=False)


def _retry_or_raise(url: str, error: Exception, failures: int, retries: int, state: _Transfer) -> int:
    failures += 1
    connect_failed = isinstance(error, urllib.error.URLError) and not isinstance(error, urllib.error.HTTPError)
    if failures > retries:
        if connect_failed and state.received == 0:
            raise _Unreachable(str(error.reason)) from None
        raise ValueError(f"download of {url} did not finish after {failures} tries: {error}") from None
    log.warning("download of %s interrupted (%s); retrying (%d/%d)", url, error, failures, retries)
    time.sleep(min(0.25 * 2**failures, 8.0))
    return failures


def _request(url: str, headers: dict[str, str], timeout: float) -> http.client.HTTPResponse:
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)


@contextlib.contextmanager
def _locked(final: Path) -> Iterator[None]:
    """An exclusive flock on `<file>.lock`, released when the block ends (or the process dies)."""
    with open(final.with_name(final.name + ".lock"), "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def _meta_path(final: Path) -> Path:
    return final.with_name(final.name + ".json")


def _read_meta(final: Path) -> dict[str, Any] | None:
    try:
        return json.loads(_meta_path(final).read_text())
    except (OSError, ValueError):
        return None


def _write_meta(final: Path, meta: dict[str, Any]) -> None:
    tmp = _meta_path(final).with_name(f"{_meta_path(final).name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, _meta_path(final))


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _is_true(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def unreachable_message(what: str, why: str) -> str:
    return (
        f"cannot fetch {what}: {why}. On a machine with internet access run `m2f models download {what} DEST`, "
        "then pass DEST (a local path, or e.g. an s3:// URI every node can read) as --model"
    )
