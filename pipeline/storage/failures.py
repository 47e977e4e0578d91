"""Storage failures in words: one line naming the cause, for people, with no secret in it.

`storage_failure` turns whatever s3fs, botocore, aiohttp or the operating system raised into a
StorageError such as "cannot list s3://bucket/images/: access denied", recognising the usual causes
(no credentials, an unreachable endpoint, access denied, a missing bucket or file, a failing server).
"""

from __future__ import annotations

import errno
import socket
import urllib.parse
from collections.abc import Iterable

from m2f.pipeline.secrets import env_secrets, redact, scrub
from m2f.pipeline.storage.retries import KINDS, error_chain, retryable_status, s3_error, unwrap


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
    `m2f.pipeline.secrets.secret_values(options)` for secrets passed in --storage-options).
    """
    if isinstance(e, StorageError):
        return e
    message = " ".join(f"cannot {action} {uri}: {_cause(error_chain(e))}".split())  # one line
    hidden = sorted({*secrets, *env_secrets()}, key=len, reverse=True)  # longest first: one may contain another
    return StorageError(scrub(message, hidden), action=action, uri=str(redact(uri)))


def _cause(chain: list[BaseException]) -> str:
    """The reason for a failure, in words; `chain` is the error and its causes."""
    chain = [unwrap(c) for c in chain]
    if any(isinstance(c, KINDS.credentials) for c in chain):
        return NO_CREDENTIALS
    for cause in chain:
        s3 = s3_error(cause)
        if s3 is not None:
            return _server_said(*s3)
    for cause in chain:
        if isinstance(cause, KINDS.tls):
            return f"TLS failure with the endpoint {_endpoint(chain)} ({_describe(cause)})"
        if isinstance(cause, KINDS.connect):
            return f"cannot reach the endpoint {_endpoint(chain)} ({_connect_reason(chain)})"
        if isinstance(cause, KINDS.transient):
            return f"the endpoint {_endpoint(chain)} kept failing ({_describe(cause)})"
        if isinstance(cause, KINDS.permanent):
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
    return f"the server kept failing ({said})" if retryable_status(code, status) else said


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
