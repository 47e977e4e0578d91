"""Filesystem access for the job: fsspec options, redaction of secrets, retries, atomic writes.

Every input and output goes through fsspec, so the same code reads a local folder, S3 or an
S3-compatible store. Credentials never pass through here as arguments we log: they come from the
usual AWS environment variables (read by botocore) or from `--storage-options`, and `redact`
scrubs any configuration before it reaches a report or a log line.

Failures come in two kinds. Transient ones (5xx, throttling, dropped connections, timeouts, bodies
cut short) are retried by `with_retries`, STORAGE_ATTEMPTS times in all, on top of the retries of
s3fs and botocore. Permanent ones (no such file, access denied, no credentials, a bad bucket name)
fail at once; `storage_failure` turns any of them into a one-line StorageError naming the cause.
"""

from __future__ import annotations

import errno
import http.client
import json
import logging
import os
import posixpath
import random
import re
import socket
import ssl
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import fsspec
from fsspec import AbstractFileSystem

T = TypeVar("T")
logger = logging.getLogger(__name__)

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
# Environment variables whose values are secrets: scrubbed from every StorageError message.
SECRET_ENV_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")


def _env_number(name: str, default: float, kind: type, minimum: float) -> Any:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = kind(text)
    except ValueError:
        raise ValueError(f"{name} must be {'an integer' if kind is int else 'a number'}, got {text!r}") from None
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {text!r}")
    return value


# How often m2f tries one storage operation (1 + retries), on top of the retries inside s3fs and
# botocore. Read at call time, so tests may set the module attributes as well as the variables.
STORAGE_ATTEMPTS: int = _env_number("M2F_STORAGE_ATTEMPTS", 5, int, 1)
# Backoff before retry n (n = 1, 2, ...): uniform in [0, min(MAX, BASE * 2 ** (n - 1))] ("full
# jitter": workers that failed together do not retry together).
STORAGE_BACKOFF_S: float = _env_number("M2F_STORAGE_BACKOFF_S", 0.5, float, 0.0)
STORAGE_BACKOFF_MAX_S = 8.0

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


# --- retries --------------------------------------------------------------------------------------

# S3 error codes worth another try: server trouble, throttling, a request the server gave up on.
TRANSIENT_S3_CODES = frozenset(
    {
        "InternalError",
        "InternalServerError",
        "ServiceUnavailable",
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestThrottled",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "BandwidthLimitExceeded",
        "RequestTimeout",  # the server timed out reading our request body
        "IncompleteBody",  # it received fewer bytes than Content-Length
        "XAmzContentSHA256Mismatch",  # the body changed in transit (s3fs retries it too)
        "BadDigest",
        "OperationAborted",  # "a conflicting conditional operation is in progress; try again"
    }
)
# errno values of s3fs's translated 5xx / SlowDown errors (which it sometimes raises without their
# cause) and of dropped, refused or timed-out connections.
TRANSIENT_ERRNOS = frozenset(
    {
        getattr(errno, "EREMOTEIO", errno.EIO),  # s3fs: 500 / InternalError
        errno.EBUSY,  # s3fs: 503 / SlowDown / ServiceUnavailable
        errno.ETIMEDOUT,
        errno.ECONNRESET,
        errno.ECONNREFUSED,
        errno.ECONNABORTED,
        errno.EPIPE,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
    }
)


class _Kinds:
    """Exception classes by meaning, from the standard library and, where installed, botocore,
    aiohttp and urllib3 (imported here so that local-only use needs none of them)."""

    def __init__(self) -> None:
        # Never worth a retry. ValueError, TypeError and the like are bugs or bad arguments, a
        # certificate that does not verify is configuration: trying again cannot fix them. (Other
        # TLS errors, such as an EOF mid-handshake, are dropped connections and are retried.)
        permanent: list[type[BaseException]] = [FileNotFoundError, FileExistsError, PermissionError]
        permanent += [IsADirectoryError, NotADirectoryError, ValueError, TypeError, AttributeError, KeyError]
        permanent += [IndexError, NotImplementedError, AssertionError, MemoryError, ssl.SSLCertVerificationError]
        transient: list[type[BaseException]] = [ConnectionError, TimeoutError, http.client.IncompleteRead]
        transient += [ssl.SSLError]  # after the certificate check above: a connection cut mid-TLS
        connect: list[type[BaseException]] = [ConnectionRefusedError]  # never reached the server
        credentials: list[type[BaseException]] = []
        tls: list[type[BaseException]] = [ssl.SSLError]
        response: list[type[BaseException]] = []  # HTTP errors with an int `status`
        wrappers: list[type[BaseException]] = []  # botocore errors that carry the real one as `error`
        try:
            from botocore import exceptions as boto
            from botocore.parsers import ResponseParserError

            credentials += [boto.NoCredentialsError, boto.PartialCredentialsError]
            tls += [boto.SSLError]
            permanent += [*credentials, boto.ParamValidationError, boto.NoRegionError]
            # botocore's ConnectionError: refused connections, connect timeouts, TLS failures.
            # HTTPClientError: read timeouts, closed connections, streaming errors. A plain
            # HTTPClientError ("an HTTP client raised an unhandled exception") and an SSLError are
            # judged by the error they carry. Throttling answers are sometimes invalid XML, hence
            # ResponseParserError (s3fs retries it too).
            transient += [boto.ConnectionError, boto.HTTPClientError, boto.IncompleteReadError, ResponseParserError]
            connect += [boto.ConnectionError]
            wrappers += [boto.HTTPClientError, boto.SSLError]
        except ImportError:
            pass
        try:
            import aiohttp

            tls += [aiohttp.ClientSSLError]
            permanent += [aiohttp.ClientConnectorCertificateError, aiohttp.InvalidURL]
            transient += [aiohttp.ClientPayloadError, aiohttp.ClientConnectionError]
            connect += [aiohttp.ClientConnectorError]
            response += [aiohttp.ClientResponseError]
        except ImportError:
            pass
        try:
            from urllib3 import exceptions as urllib3_errors

            transient += [urllib3_errors.ProtocolError, urllib3_errors.IncompleteRead, urllib3_errors.TimeoutError]
        except ImportError:
            pass
        self.permanent = tuple(permanent)
        self.transient = tuple(transient)
        self.connect = tuple(connect)
        self.credentials = tuple(credentials)
        self.tls = tuple(tls)
        self.response = tuple(response)
        self.wrappers = tuple(wrappers)


_KINDS = _Kinds()


def _chain(e: BaseException) -> list[BaseException]:
    """`e`, then what caused it: explicit causes, and the implicit contexts Python would show."""
    chain: list[BaseException] = []
    current: BaseException | None = e
    while current is not None and all(current is not c for c in chain):
        chain.append(current)
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    return chain


def _s3_error(e: BaseException) -> tuple[str, int, str] | None:
    """(code, HTTP status, message) of a botocore ClientError; None for anything else."""
    response = getattr(e, "response", None)
    if not isinstance(response, dict) or not isinstance(response.get("Error"), dict):
        return None
    code = str(response["Error"].get("Code", ""))
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    if not status and code.isdigit():
        status = int(code)  # a HEAD answer has no body to name the error: its code is the status
    return code, status, str(response["Error"].get("Message", ""))


def _retryable_status(code: str, status: int) -> bool:
    return code in TRANSIENT_S3_CODES or status >= 500 or status == 429


def is_transient(e: BaseException) -> bool:
    """Whether `e` is worth retrying: a 5xx or throttling answer, a dropped, refused or timed-out
    connection, a body cut short. Not: a missing file, access denied, missing credentials, a bad
    bucket name or argument, or anything unrecognised (a bug is not fixed by trying again).

    Causes are searched too, so s3fs's translated errors (an OSError caused by botocore's
    ClientError) are judged by what the server said.
    """
    for cause in map(_unwrap, _chain(_unwrap(e))):
        if isinstance(cause, _KINDS.permanent):
            return False
        s3 = _s3_error(cause)
        if s3 is not None:
            return _retryable_status(s3[0], s3[1])
        if isinstance(cause, _KINDS.response) and isinstance(getattr(cause, "status", None), int):
            return _retryable_status("", cause.status)  # fsspec's HTTP filesystem
        if isinstance(cause, _KINDS.transient):
            return True
        if type(cause) is OSError and cause.errno in TRANSIENT_ERRNOS:
            return True
    return False


def _unwrap(e: BaseException) -> BaseException:
    """The error inside botocore's plain HTTPClientError ("an HTTP client raised an unhandled
    exception": anything from a dropped connection to a bad endpoint URL) or its SSLError."""
    if type(e) in _KINDS.wrappers:
        inner = getattr(e, "kwargs", {}).get("error")
        if isinstance(inner, BaseException):
            return inner
    return e


def backoff_s(retry: int) -> float:
    """Seconds to wait before retry number `retry` (1, 2, ...): full jitter under a doubling cap."""
    ceiling = min(STORAGE_BACKOFF_MAX_S, STORAGE_BACKOFF_S * 2 ** (retry - 1))
    return random.uniform(0.0, ceiling)


def with_retries(fn: Callable[[], T], *, attempts: int | None = None) -> T:
    """`fn()`, tried up to `attempts` times (default STORAGE_ATTEMPTS) while it fails transiently.

    Waits `backoff_s(n)` before retry n. A permanent error (`is_transient` False) is raised at once;
    after the last attempt the last error is raised as it was.
    """
    total = STORAGE_ATTEMPTS if attempts is None else attempts
    if total < 1:
        raise ValueError(f"attempts must be >= 1, got {total}")
    for attempt in range(1, total):
        try:
            return fn()
        except Exception as e:
            if not is_transient(e):
                raise
            delay = backoff_s(attempt)
            logger.debug("storage: %s on attempt %d of %d, retrying in %.2fs", type(e).__name__, attempt, total, delay)
            time.sleep(delay)
    return fn()


# --- failures for people --------------------------------------------------------------------------


class StorageError(Exception):
    """A storage operation that failed for good. Its message is one line naming the cause, e.g.
    "cannot list s3://bucket/images/: access denied", and holds no secret."""

    def __init__(self, message: str, *, action: str = "", uri: str = "") -> None:
        super().__init__(message)
        self.action = action
        self.uri = uri


NO_CREDENTIALS = "no AWS credentials found (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or --storage-options)"
# What the S3 error codes of a refused request mean, in words.
ACCESS_DENIED_DETAIL = {
    "InvalidAccessKeyId": "the access key id is not known to the endpoint",
    "SignatureDoesNotMatch": "the signature does not match: check the secret access key",
    "ExpiredToken": "the session token has expired",
    "InvalidToken": "the session token is invalid",
    "RequestTimeTooSkewed": "this machine's clock is too far from the server's",
}


def storage_failure(e: BaseException, action: str, uri: str, *, secrets: Iterable[str] = ()) -> StorageError:
    """A StorageError for failure `e` while trying to `action` (a verb phrase: "list", "read",
    "write to") `uri`: "cannot {action} {uri}: {cause}", on one line.

    The cause is named in words where it is recognised (no credentials, an unreachable endpoint,
    access denied, a missing bucket or file, a bad bucket name, a failing server) and is otherwise
    "ExceptionType: first line of its message". No secret appears: URL user:password parts are
    hidden, and so are the values of the AWS credential variables and of `secrets` (e.g.
    `pipeline.infer.secret_values(options)` for secrets passed in --storage-options).
    """
    if isinstance(e, StorageError):
        return e
    message = " ".join(f"cannot {action} {uri}: {_cause(_chain(e))}".split())  # one line
    hidden = {*secrets, *(os.environ.get(name, "") for name in SECRET_ENV_VARS)}
    for secret in sorted((s for s in hidden if len(s) >= 4), key=len, reverse=True):  # shorter would garble words
        message = message.replace(secret, REDACTED)
    return StorageError(redact(message), action=action, uri=str(redact(uri)))


def _cause(chain: list[BaseException]) -> str:
    """The reason for a failure, in words; `chain` is the error and its causes."""
    chain = [_unwrap(c) for c in chain]
    if any(isinstance(c, _KINDS.credentials) for c in chain):
        return NO_CREDENTIALS
    for cause in chain:
        s3 = _s3_error(cause)
        if s3 is not None:
            return _server_said(*s3)
    for cause in chain:
        if isinstance(cause, _KINDS.tls):
            return f"TLS failure with the endpoint {_endpoint(chain)} ({_describe(cause)})"
        if isinstance(cause, _KINDS.connect):
            return f"cannot reach the endpoint {_endpoint(chain)} ({_connect_reason(chain)})"
        if isinstance(cause, _KINDS.transient):
            return f"the endpoint {_endpoint(chain)} kept failing ({_describe(cause)})"
        if isinstance(cause, _KINDS.permanent):
            break
    first = chain[0]
    if isinstance(first, FileNotFoundError):
        return "bucket does not exist" if "bucket does not exist" in str(first) else "not found"
    if isinstance(first, PermissionError):
        return "access denied"
    if any("Invalid bucket name" in str(c) for c in chain):
        return "invalid bucket name"
    return _describe(first)


def _server_said(code: str, status: int, text: str) -> str:
    text = _first_line(text)
    if code == "NoSuchBucket":
        return "bucket does not exist"
    if code in ("NoSuchKey", "NotFound") or status == 404:
        return "not found"
    if code == "InvalidBucketName":
        return "invalid bucket name"
    if code in ACCESS_DENIED_DETAIL:
        return f"access denied ({ACCESS_DENIED_DETAIL[code]})"
    if code == "AccessDenied" or status == 403:
        return "access denied"
    said = f"{code}: {text}" if text and text != code else code or f"HTTP {status}"
    return f"the server kept failing ({said})" if _retryable_status(code, status) else said


def _endpoint(chain: list[BaseException]) -> str:
    """scheme://host:port of the endpoint named in the chain (user:password hidden)."""
    for cause in chain:
        kwargs = getattr(cause, "kwargs", None)  # botocore errors keep their endpoint_url here
        url = kwargs.get("endpoint_url") if isinstance(kwargs, dict) else None
        parts = urllib.parse.urlsplit(str(url or ""))
        if parts.scheme and parts.netloc:
            return str(redact(f"{parts.scheme}://{parts.netloc}"))
    for cause in chain:
        host, port = getattr(cause, "host", None), getattr(cause, "port", None)  # aiohttp's connector errors
        if isinstance(host, str) and host:
            return f"{host}:{port}" if port else host
    return "(unknown)"


def _connect_reason(chain: list[BaseException]) -> str:
    for cause in chain:
        code = getattr(cause, "errno", None)
        if isinstance(cause, ConnectionRefusedError) or code == errno.ECONNREFUSED:
            return "connection refused"
        if isinstance(cause, TimeoutError) or "Timeout" in type(cause).__name__:
            return "connect timed out"
        if isinstance(cause, socket.gaierror) or "DNS" in type(cause).__name__:
            return "host name not found"
        if code in (errno.EHOSTUNREACH, errno.ENETUNREACH):
            return "no route to host"
    return "connection failed"


def _first_line(text: str) -> str:
    text = text.strip()
    return text.splitlines()[0].strip() if text else ""


def _describe(e: BaseException) -> str:
    text = _first_line(str(e))
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
