"""Filesystem access for the job: fsspec options, redaction of secrets, atomic writes.

Every input and output goes through fsspec, so the same code reads a local folder, S3 or an
S3-compatible store. Credentials never pass through here as arguments we log: they come from the
usual AWS environment variables (read by botocore) or from `--storage-options`, and `redact`
scrubs any configuration before it reaches a report or a log line.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import uuid
from collections.abc import Iterable
from typing import Any

import fsspec
from fsspec import AbstractFileSystem

REDACTED = "***"

# Protocols whose "rename" is a copy + delete (not atomic) but whose single PUT is atomic.
OBJECT_STORE_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss", "r2", "memory"})
S3_PROTOCOLS = frozenset({"s3", "s3a"})
LOCAL_PROTOCOLS = frozenset({"file", "local"})

# Temporary files start with "." so that Parquet/Arrow dataset readers (which skip names beginning
# with "." or "_") never mistake a half-written file for output.
TEMP_PREFIX = "."
TEMP_MARKER = ".m2f-tmp-"

_SECRET_KEY = re.compile(r"key|secret|token|passw|credential|session", re.IGNORECASE)
# user:password@ inside a URL such as https://user:pw@host/...
_URL_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")


def protocol_of(uri: str) -> str:
    """The fsspec protocol of a URI: "s3" for s3://..., "file" for a plain path."""
    if "://" not in uri:
        return "file"
    return uri.split("://", 1)[0].lower()


def storage_options(uri: str, endpoint_url: str | None = None, options_json: str | None = None) -> dict[str, Any]:
    """fsspec keyword arguments for `uri`.

    `endpoint_url` (S3-compatible stores: MinIO, Ceph, moto) applies to s3:// URIs only, so one
    command line can read from a custom endpoint and write to a local folder. `options_json` is
    the user's `--storage-options` object, merged on top (its `client_kwargs` merged key by key).
    Local paths get no options: a local filesystem has nothing to configure and must not receive
    S3 settings. Errors never echo the JSON text, which may hold a secret.
    """
    protocol = protocol_of(uri)
    if protocol in LOCAL_PROTOCOLS:
        return {}
    options: dict[str, Any] = {}
    if endpoint_url and protocol in S3_PROTOCOLS:
        if not re.match(r"^https?://", endpoint_url):
            raise ValueError(f"--endpoint-url must start with http:// or https://, got {endpoint_url!r}")
        options["client_kwargs"] = {"endpoint_url": endpoint_url}
    if options_json:
        user = _parse_options(options_json)
        client = {**options.get("client_kwargs", {}), **user.get("client_kwargs", {})}
        options.update(user)
        if client:
            options["client_kwargs"] = client
    return options


def _parse_options(options_json: str) -> dict[str, Any]:
    try:
        user = json.loads(options_json)
    except json.JSONDecodeError as e:
        # e.msg and the position only: the document itself may contain credentials.
        raise ValueError(f"--storage-options is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    if not isinstance(user, dict):
        raise ValueError(f"--storage-options must be a JSON object, got a JSON {type(user).__name__}")
    if "client_kwargs" in user and not isinstance(user["client_kwargs"], dict):
        raise ValueError("--storage-options: 'client_kwargs' must be a JSON object")
    return user


def open_fs(uri: str, options: dict[str, Any]) -> tuple[AbstractFileSystem, str]:
    """The filesystem for `uri` and the path inside it (protocol stripped, as fsspec expects)."""
    fs, path = fsspec.core.url_to_fs(uri, **options)
    return fs, path


def is_local(fs: AbstractFileSystem) -> bool:
    return bool(_protocols(fs) & LOCAL_PROTOCOLS)


def is_object_store(fs: AbstractFileSystem) -> bool:
    """True where a rename is not atomic but a single PUT is (S3, GCS, Azure, memory)."""
    return bool(_protocols(fs) & OBJECT_STORE_PROTOCOLS)


def _protocols(fs: AbstractFileSystem) -> set[str]:
    protocol = fs.protocol
    return {protocol} if isinstance(protocol, str) else set(protocol)


def qualify(fs: AbstractFileSystem, path: str) -> str:
    """A fully qualified URI for `path`: s3://bucket/key, or an absolute path for local files.

    Local files keep their plain absolute path (no file://) so that the same image listed from a
    folder or from a manifest gets the same URI, hence the same `image_id`.
    """
    if is_local(fs):
        return os.path.abspath(path)
    return fs.unstrip_protocol(path)


def redact(obj: Any) -> Any:
    """A copy of a config (nested dicts, lists, tuples) safe to log or write to a report.

    Values under any key that looks secret (key, secret, token, password, credential, session —
    case-insensitive, anywhere in the name) become "***", however deeply nested; the user:password
    part of URLs in string values is hidden too. Over-redaction (e.g. a "sort_key") is acceptable;
    a leaked credential is not.
    """
    if isinstance(obj, dict):
        return {k: REDACTED if _SECRET_KEY.search(str(k)) else redact(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(redact(v) for v in obj)
    if isinstance(obj, str):
        return _URL_USERINFO.sub(REDACTED + "@", obj)
    return obj


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
    """
    payload = data.encode("utf-8") if isinstance(data, str) else data
    if is_object_store(fs):
        fs.pipe_file(path, payload)
        return
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
        if fs.exists(tmp):
            fs.rm(tmp)
        raise


def remove_temporaries(fs: AbstractFileSystem, paths: Iterable[str]) -> int:
    """Delete leftover temporaries (from a killed run) among `paths`; returns how many."""
    stale = [p for p in paths if is_temporary(p)]
    for p in stale:
        fs.rm(p)
    return len(stale)
