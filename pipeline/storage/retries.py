"""Retrying storage operations that failed transiently, and telling transient failures from permanent ones.

Transient failures (5xx, throttling, dropped connections, timeouts, bodies cut short) are retried by
`with_retries`, STORAGE_ATTEMPTS times in all, on top of the retries of s3fs and botocore. Permanent
ones (no such file, access denied, no credentials, a bad bucket name) are raised at once: trying again
cannot fix them. `failures` names the cause of either kind in words, with the classification here.
"""

from __future__ import annotations

import errno
import http.client
import logging
import os
import random
import ssl
import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")
logger = logging.getLogger(__name__)


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
# botocore. Read at call time, so tests may set this module's attributes as well as the variables.
STORAGE_ATTEMPTS: int = _env_number("M2F_STORAGE_ATTEMPTS", 5, int, 1)
# Backoff before retry n (n = 1, 2, ...): uniform in [0, min(MAX, BASE * 2 ** (n - 1))] ("full
# jitter": workers that failed together do not retry together).
STORAGE_BACKOFF_S: float = _env_number("M2F_STORAGE_BACKOFF_S", 0.5, float, 0.0)
STORAGE_BACKOFF_MAX_S = 8.0

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


KINDS = _Kinds()


def error_chain(e: BaseException) -> list[BaseException]:
    """`e`, then what caused it: explicit causes, and the implicit contexts Python would show."""
    chain: list[BaseException] = []
    current: BaseException | None = e
    while current is not None and all(current is not c for c in chain):
        chain.append(current)
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    return chain


def s3_error(e: BaseException) -> tuple[str, int, str] | None:
    """(code, HTTP status, message) of a botocore ClientError; None for anything else."""
    response = getattr(e, "response", None)
    if not isinstance(response, dict) or not isinstance(response.get("Error"), dict):
        return None
    code = str(response["Error"].get("Code", ""))
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    if not status and code.isdigit():
        status = int(code)  # a HEAD answer has no body to name the error: its code is the status
    return code, status, str(response["Error"].get("Message", ""))


def retryable_status(code: str, status: int) -> bool:
    return code in TRANSIENT_S3_CODES or status >= 500 or status == 429


def is_transient(e: BaseException) -> bool:
    """Whether `e` is worth retrying: a 5xx or throttling answer, a dropped, refused or timed-out
    connection, a body cut short. Not: a missing file, access denied, missing credentials, a bad
    bucket name or argument, or anything unrecognised (a bug is not fixed by trying again).

    Causes are searched too, so s3fs's translated errors (an OSError caused by botocore's
    ClientError) are judged by what the server said.
    """
    for cause in map(unwrap, error_chain(unwrap(e))):
        if isinstance(cause, KINDS.permanent):
            return False
        s3 = s3_error(cause)
        if s3 is not None:
            return retryable_status(s3[0], s3[1])
        if isinstance(cause, KINDS.response) and isinstance(getattr(cause, "status", None), int):
            return retryable_status("", cause.status)  # fsspec's HTTP filesystem
        if isinstance(cause, KINDS.transient):
            return True
        if type(cause) is OSError and cause.errno in TRANSIENT_ERRNOS:
            return True
    return False


def unwrap(e: BaseException) -> BaseException:
    """The error inside botocore's plain HTTPClientError ("an HTTP client raised an unhandled
    exception": anything from a dropped connection to a bad endpoint URL) or its SSLError."""
    if type(e) in KINDS.wrappers:
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
