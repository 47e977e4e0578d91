"""Opening filesystems: fsspec options for a URI, the `Storage` that carries them, and what a filesystem is.

Every input and output goes through fsspec, so the same code reads a local folder, S3 or an
S3-compatible store. Credentials never pass through here as arguments we log: they come from the
usual AWS environment variables (read by botocore) or from `--storage-options`, and a `Storage`
shows them redacted.
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import fsspec
from fsspec import AbstractFileSystem

from m2f.pipeline.secrets import redact

# Protocols whose "rename" is a copy + delete (not atomic) but whose single PUT is atomic.
OBJECT_STORE_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss", "r2", "memory"})
S3_PROTOCOLS = frozenset({"s3", "s3a"})
LOCAL_PROTOCOLS = frozenset({"file", "local"})

# Bounds for botocore on S3, applied by `open_fs` where the user's options set none: one retry
# inside botocore (its default is 4, with up to 15 s of backoff per call) and a 3 s connect
# timeout (s3fs: 5 s). Measured with our 5 attempts on top: a listing on an endpoint that refuses
# connections fails in 6-8 s (botocore's defaults: about 40 s, up to 80), one that never answers a
# SYN in about 36 s (defaults: over 2 minutes).
S3_CONFIG_DEFAULTS: dict[str, Any] = {"connect_timeout": 3, "retries": {"total_max_attempts": 2}}


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
    S3 settings, so the JSON is not even parsed for them. Errors never echo the JSON text, which
    may hold a secret.
    """
    return _options_for(uri, endpoint_url, lambda: _parse_options(options_json) if options_json else {})


def _options_for(uri: str, endpoint_url: str | None, user_options: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """`storage_options` with the user's options parsed by `user_options`, called for remote URIs only
    (after the endpoint is checked, so a bad endpoint is reported before bad JSON)."""
    protocol = protocol_of(uri)
    if protocol in LOCAL_PROTOCOLS:
        return {}
    options: dict[str, Any] = {}
    if endpoint_url and protocol in S3_PROTOCOLS:
        if not re.match(r"^https?://", endpoint_url):
            raise ValueError(f"--endpoint-url must start with http:// or https://, got {endpoint_url!r}")
        options["client_kwargs"] = {"endpoint_url": endpoint_url}
    user = user_options()
    if user:
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
    _check_options(user)
    return user


def _check_options(user: Any) -> None:
    if not isinstance(user, dict):
        raise ValueError(f"--storage-options must be a JSON object, got a JSON {type(user).__name__}")
    if "client_kwargs" in user and not isinstance(user["client_kwargs"], dict):
        raise ValueError("--storage-options: 'client_kwargs' must be a JSON object")


def open_fs(uri: str, options: dict[str, Any]) -> tuple[AbstractFileSystem, str]:
    """The filesystem for `uri` and the path inside it (protocol stripped, as fsspec expects).

    S3 filesystems get S3_CONFIG_DEFAULTS for whatever the user's `config_kwargs` leave unset
    (retries are left to botocore where AWS_MAX_ATTEMPTS is set), so that a dead endpoint fails
    within seconds under our retries.
    """
    if protocol_of(uri) in S3_PROTOCOLS:
        options = bounded_s3_options(options)
    fs, path = fsspec.core.url_to_fs(uri, **options)
    return fs, path


def bounded_s3_options(options: dict[str, Any]) -> dict[str, Any]:
    """`options` with S3_CONFIG_DEFAULTS merged under the user's `config_kwargs` (theirs win)."""
    config = options.get("config_kwargs", {})
    if not isinstance(config, dict):
        return options  # not ours to fix: s3fs reports it
    merged = dict(config)
    merged.setdefault("connect_timeout", S3_CONFIG_DEFAULTS["connect_timeout"])
    if "retries" not in merged and not os.environ.get("AWS_MAX_ATTEMPTS"):
        merged["retries"] = dict(S3_CONFIG_DEFAULTS["retries"])
    return {**options, "config_kwargs": merged}


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


@dataclass(frozen=True, repr=False)
class Storage:
    """How to reach storage: the `--endpoint-url` and the parsed `--storage-options`, as one value.

    Picklable (it travels to Ray workers) and safe to print: its repr redacts secrets. The endpoint is
    checked where it applies, on s3:// URIs (as `storage_options` does), so a run whose paths are all
    local is not refused for an endpoint it never uses.
    """

    endpoint_url: str | None = None
    user_options: dict[str, Any] = field(default_factory=dict, hash=False)  # the --storage-options object

    def __post_init__(self) -> None:
        _check_options(self.user_options)

    @classmethod
    def from_cli(cls, endpoint_url: str | None = None, options_json: str | None = None) -> Storage:
        """The Storage for the CLI's `--endpoint-url` and `--storage-options` (JSON) strings.

        Raises ValueError, without echoing the JSON (it may hold a secret), when it is not an object.
        """
        return cls(endpoint_url or None, _parse_options(options_json) if options_json else {})

    def options(self, uri: str) -> dict[str, Any]:
        """fsspec keyword arguments for `uri`: what `storage_options(uri, endpoint_url, options_json)` gives."""
        return _options_for(uri, self.endpoint_url, lambda: copy.deepcopy(self.user_options))

    def open(self, uri: str) -> tuple[AbstractFileSystem, str]:
        """The filesystem for `uri` and the path inside it (`open_fs` with this storage's options)."""
        return open_fs(uri, self.options(uri))

    def __repr__(self) -> str:
        return f"Storage(endpoint_url={redact(self.endpoint_url)!r}, user_options={redact(self.user_options)!r})"
