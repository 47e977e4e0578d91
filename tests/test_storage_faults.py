"""Storage under faults: a real moto S3 server behind `fault_proxy`, which answers some requests with
500/503, drops connections or cuts bodies short. Reads (`prepare_images`) and writes (`write_atomic`)
must come through whole; a persistent fault must become that image's error row; `is_transient` and
`storage_failure` are checked on errors provoked for real, or built from the libraries' own classes.

Observed here (and relied on): moto checks no signatures and accepts anonymous requests; botocore
raises NoCredentialsError before sending anything; s3fs raises aiohttp's ClientPayloadError on a
body shorter than its Content-Length instead of returning the short bytes.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import socket
import ssl
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import boto3
import fsspec
import pytest
from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
    ParamValidationError,
    ReadTimeoutError,
    SSLError,
)
from fsspec import AbstractFileSystem
from s3fs.errors import translate_boto_error

from m2f.model.config import PreprocessConfig
from m2f.pipeline.infer import prepare_images
from m2f.pipeline.sources import list_inputs
from m2f.pipeline.storage import (
    NO_CREDENTIALS,
    Storage,
    StorageError,
    is_transient,
    open_fs,
    retries,
    storage_failure,
    storage_options,
    with_retries,
    write_atomic,
)
from tests.conftest import TEST_SECRETS
from tests.fault_proxy import KINDS, fault_proxy
from tests.moto_server import moto_server
from tests.test_infer import png

ROOT = Path(__file__).resolve().parents[1]
PREPROCESS = PreprocessConfig(min_size=64, max_size=128)
RATE = 0.15
BAD_SIGNATURE = "access denied (the signature does not match: check the secret access key)"
# botocore tries once only, so that the faults reach s3fs's retries and ours (with botocore's own
# retry the reads would pass without them); also shows a user's `config_kwargs` win over ours.
NO_BOTOCORE_RETRY = json.dumps({"config_kwargs": {"retries": {"total_max_attempts": 1}}})


@pytest.fixture(autouse=True)
def quick_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """Our backoff base in milliseconds (M2F_STORAGE_BACKOFF_S does the same for a process)."""
    monkeypatch.setattr(retries, "STORAGE_BACKOFF_S", 0.005)


@pytest.fixture
def images(s3_fs: AbstractFileSystem, s3_bucket: str) -> dict[str, tuple[int, int]]:
    """40 PNGs of assorted sizes, uploaded straight to moto: {uri: (width, height)}."""
    sizes = {}
    for i in range(40):
        width, height = 20 + 7 * (i % 9), 16 + 5 * (i % 7)
        uri = f"s3://{s3_bucket}/images/{i:02d}.png"
        s3_fs.pipe_file(uri, png(width, height, seed=i))
        sizes[uri] = (width, height)
    return sizes


def s3(endpoint: str, **extra: Any) -> AbstractFileSystem:
    """A fresh s3fs filesystem on `endpoint`, as the job opens one (`open_fs`: bounded botocore)."""
    return open_fs("s3://", {**storage_options("s3://", endpoint), "skip_instance_cache": True, **extra})[0]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_clean_line(message: str) -> None:
    assert "\n" not in message and "Traceback" not in message, message
    assert not any(secret in message for secret in TEST_SECRETS), message


def client_error(code: str, status: int, message: str = "") -> ClientError:
    response: Any = {"Error": {"Code": code, "Message": message}, "ResponseMetadata": {"HTTPStatusCode": status}}
    return ClientError(response, "GetObject")


# --- reads and writes through faults --------------------------------------------------------------


def test_reads_come_through_faults_of_every_kind(
    s3_server: str, images: dict[str, tuple[int, int]], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="m2f.pipeline.storage")
    uris = list(images)
    with fault_proxy(s3_server, rate=RATE, seed=1) as proxy:
        # Rounds until each kind has struck at least once (the proxy spreads its faults over the kinds).
        for _ in range(6):
            table = prepare_images(
                {"image_uri": uris},
                preprocess=PREPROCESS,
                max_pixels=10**6,
                storage=Storage.from_cli(proxy.url, NO_BOTOCORE_RETRY),
            )
            rows = table.to_pylist()
            assert [r["image_uri"] for r in rows] == uris
            for row in rows:
                assert (row["status"], row["error"]) == ("ok", ""), row["error"]
                assert (row["width"], row["height"]) == images[row["image_uri"]]
            if all(proxy.faults[kind] for kind in KINDS):
                break
    assert all(proxy.faults[kind] > 0 for kind in KINDS), proxy.faults
    assert proxy.requests > 2 * len(uris)  # a HEAD and a GET per image, and the retries
    assert any("retrying" in r.getMessage() for r in caplog.records), "our own retries never ran"


def test_a_persistent_fault_is_that_image_s_error_row(s3_server: str, images: dict[str, tuple[int, int]]) -> None:
    uris = list(images)[:8]
    bad = uris[3]
    bad_path = "/" + bad.removeprefix("s3://")
    with fault_proxy(s3_server, always_fail=lambda method, path: path == bad_path) as proxy:
        start = time.monotonic()
        table = prepare_images({"image_uri": uris}, preprocess=PREPROCESS, max_pixels=10**6, storage=Storage(proxy.url))
        elapsed = time.monotonic() - start
    rows = {r["image_uri"]: r for r in table.to_pylist()}
    assert rows[bad]["status"] == "error" and rows[bad]["error"].startswith("unreadable: "), rows[bad]
    one_clean_line(rows[bad]["error"])
    assert all(rows[u]["status"] == "ok" for u in uris if u != bad)
    # Every one of our attempts reached the server (botocore adds its own one retry to each).
    assert proxy.faults["always"] >= retries.STORAGE_ATTEMPTS, proxy.faults
    assert elapsed < 30


def test_a_missing_file_is_not_retried(s3_server: str, s3_bucket: str) -> None:
    with fault_proxy(s3_server) as proxy:
        table = prepare_images(
            {"image_uri": [f"s3://{s3_bucket}/nothing.png"]},
            preprocess=PREPROCESS,
            max_pixels=10**6,
            storage=Storage(proxy.url),
        )
    assert table.to_pylist()[0]["error"] == "unreadable: file not found"
    assert proxy.requests <= 2  # s3fs's HEAD (and at most its GET): no retry of a 404


def test_atomic_writes_come_through_faults(s3_server: str, s3_bucket: str, s3_fs: AbstractFileSystem) -> None:
    payloads = {
        f"{s3_bucket}/parts/part-{i:03d}.json": json.dumps({"part": i, "pad": "x" * (50 * i)}) for i in range(30)
    }
    with fault_proxy(s3_server, rate=RATE, seed=2) as proxy:
        fs = s3(proxy.url)
        for path, text in payloads.items():
            write_atomic(fs, path, text)
    assert sum(proxy.faults.values()) > 0, proxy.faults
    s3_fs.invalidate_cache()
    for path, text in payloads.items():
        assert s3_fs.cat_file(path) == text.encode()  # read past the proxy: what moto really holds
    assert sorted(s3_fs.ls(f"{s3_bucket}/parts")) == sorted(payloads)  # no stray temporaries


def test_s3fs_raises_on_a_truncated_body(s3_server: str, s3_bucket: str, s3_fs: AbstractFileSystem) -> None:
    """Measured, not assumed: a body cut short is an error (retried), never short data."""
    data = png(64, 48, seed=7)
    s3_fs.pipe_file(f"{s3_bucket}/t.png", data)
    with fault_proxy(s3_server, rate=1.0, kinds=("truncate",)) as proxy:
        fs = fsspec.filesystem("s3", client_kwargs={"endpoint_url": proxy.url}, skip_instance_cache=True)
        with pytest.raises(aiohttp.ClientPayloadError) as caught:
            fs.cat_file(f"{s3_bucket}/t.png", max_concurrency=1)  # one GET, no HEAD first
    assert proxy.faults["truncate"] == proxy.requests == fs.retries  # s3fs retried it, each time cut
    assert is_transient(caught.value)


def test_signed_requests_still_verify_through_the_proxy(
    aws_credentials: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The proxy keeps the client's Host header and bytes, so SigV4 signatures made for its address
    verify upstream. The shared moto server checks no signature: this one does (moto authenticates
    every request after the first INITIAL_NO_AUTH_ACTION_COUNT, which set up an IAM user)."""
    monkeypatch.setenv("INITIAL_NO_AUTH_ACTION_COUNT", "4")  # moto_server's readiness probe, then 3 IAM calls
    with moto_server(tmp_path) as endpoint:
        iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1")
        iam.create_user(UserName="m2f")
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
        iam.put_user_policy(UserName="m2f", PolicyName="all", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName="m2f")["AccessKey"]
        with fault_proxy(endpoint) as proxy:
            fs = s3(proxy.url, key=key["AccessKeyId"], secret=key["SecretAccessKey"])
            fs.mkdir("signed")  # PUT bucket
            write_atomic(fs, "signed/a.txt", "hello")  # PUT object
            assert fs.cat_file("signed/a.txt") == b"hello"  # HEAD + GET
            assert fs.ls("signed") == ["signed/a.txt"]  # GET ?list-type=2
            fs.rm("signed/a.txt")  # DELETE
            assert not fs.exists("signed/a.txt")
            forged = s3(proxy.url, key=key["AccessKeyId"], secret="not-" + key["SecretAccessKey"])
            with pytest.raises(PermissionError) as refused:
                forged.ls("signed")
    assert proxy.faults == {} and proxy.requests >= 7
    message = str(storage_failure(refused.value, "list", "s3://signed/"))
    assert message == f"cannot list s3://signed/: {BAD_SIGNATURE}"
    one_clean_line(message)


# --- is_transient ---------------------------------------------------------------------------------


def test_is_transient_on_real_failures(s3_server: str, s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    fs = s3(s3_server)
    with pytest.raises(FileNotFoundError) as missing_key:
        fs.cat_file(f"{s3_bucket}/absent.png")
    with pytest.raises(FileNotFoundError) as missing_bucket:
        fs.ls(f"no-such-bucket-{uuid.uuid4().hex[:8]}/x")
    with pytest.raises((ParamValidationError, ValueError)) as bad_bucket:  # botocore or s3fs says it
        fs.info("Bad_Bucket!/x")
    with pytest.raises(EndpointConnectionError) as refused:
        s3(f"http://127.0.0.1:{closed_port()}").cat_file(f"{s3_bucket}/a.png")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(NoCredentialsError) as no_credentials:
        s3(s3_server).ls(s3_bucket)
    assert is_transient(refused.value)
    for permanent in (missing_key, missing_bucket, bad_bucket, no_credentials):
        assert not is_transient(permanent.value), permanent.value


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (client_error("SlowDown", 503, "Please reduce your request rate."), True),
        (client_error("InternalError", 500), True),
        (client_error("ServiceUnavailable", 503), True),
        (client_error("503", 503), True),  # a HEAD answer: no body, the status is the code
        (client_error("Throttling", 400), True),
        (client_error("RequestTimeout", 400), True),
        (client_error("AccessDenied", 403), False),
        (client_error("InvalidAccessKeyId", 403), False),
        (client_error("NoSuchKey", 404), False),
        (client_error("InvalidBucketName", 400), False),
        (translate_boto_error(client_error("InternalError", 500)), True),  # s3fs's OSError(EREMOTEIO)
        (translate_boto_error(client_error("SlowDown", 503)), True),  # OSError(EBUSY)
        (translate_boto_error(client_error("AccessDenied", 403)), False),  # PermissionError
        (translate_boto_error(client_error("NoSuchBucket", 404)), False),  # FileNotFoundError
        (OSError(errno.EBUSY, "Service Unavailable"), True),  # translated without its cause
        (EndpointConnectionError(endpoint_url="http://127.0.0.1:9"), True),
        (ConnectTimeoutError(endpoint_url="http://127.0.0.1:9"), True),
        (ReadTimeoutError(endpoint_url="http://127.0.0.1:9"), True),
        (ConnectionClosedError(endpoint_url="http://127.0.0.1:9"), True),
        (IncompleteReadError(actual_bytes=10, expected_bytes=20), True),
        (HTTPClientError(error=aiohttp.ServerDisconnectedError()), True),
        (HTTPClientError(error=ValueError("Cannot combine AUTHORIZATION header with credentials in URL")), False),
        (aiohttp.ClientPayloadError("Response payload is not completed"), True),
        (aiohttp.ServerDisconnectedError(), True),
        (ConnectionResetError(errno.ECONNRESET, "reset"), True),
        (TimeoutError(), True),
        (SSLError(endpoint_url="https://h", error=ssl.SSLCertVerificationError(1, "certificate verify failed")), False),
        (SSLError(endpoint_url="https://h", error=ssl.SSLEOFError(8, "EOF occurred in violation of protocol")), True),
        (NoCredentialsError(), False),
        (ParamValidationError(report="Invalid bucket name"), False),
        (PermissionError("denied"), False),
        (FileNotFoundError("gone"), False),
        (ValueError("bad"), False),
        (TypeError("bug"), False),
        (RuntimeError("bug"), False),
        (OSError(errno.ENOSPC, "No space left on device"), False),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else str(v),
)
def test_is_transient_truth_table(error: BaseException, expected: bool) -> None:
    assert is_transient(error) is expected


def test_with_retries_retries_transient_errors_only() -> None:
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError(errno.ECONNRESET, "reset by peer")
        return "done"

    assert with_retries(flaky) == "done" and len(calls) == 3
    calls.clear()
    with pytest.raises(ConnectionResetError):
        with_retries(lambda: flaky() if len(calls) < 9 else "", attempts=2)
    assert len(calls) == 2

    def missing() -> None:
        calls.append(1)
        raise FileNotFoundError("s3://b/k")

    calls.clear()
    with pytest.raises(FileNotFoundError):
        with_retries(missing)
    assert len(calls) == 1


# --- storage_failure ------------------------------------------------------------------------------


def test_listing_without_credentials_fails_at_once_with_one_line(
    s3_server: str, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # moto accepts anonymous requests: the failure below is botocore's own, before any request.
    anonymous = fsspec.filesystem("s3", anon=True, client_kwargs={"endpoint_url": s3_server}, skip_instance_cache=True)
    assert anonymous.ls(s3_bucket) == []
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")  # config files: absent; instance metadata: disabled
    uri = f"s3://{s3_bucket}/images/"
    with fault_proxy(s3_server) as proxy:
        options = {**storage_options(uri, proxy.url), "skip_instance_cache": True}
        start = time.monotonic()
        with pytest.raises(NoCredentialsError) as caught:
            list_inputs(uri, options)
        elapsed = time.monotonic() - start
    assert proxy.requests == 0 and elapsed < 5  # nothing sent, nothing retried
    failure = storage_failure(caught.value, "list", uri)
    assert isinstance(failure, StorageError)
    assert str(failure) == f"cannot list {uri}: {NO_CREDENTIALS}"
    one_clean_line(str(failure))


def test_listing_an_unreachable_endpoint_fails_within_a_minute(
    aws_credentials: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(retries, "STORAGE_BACKOFF_S", 0.5)  # the real backoff: this times the real thing
    endpoint = f"http://127.0.0.1:{closed_port()}"
    uri = "s3://bucket/images/"
    start = time.monotonic()
    with pytest.raises(Exception) as caught:
        list_inputs(uri, {**storage_options(uri, endpoint), "skip_instance_cache": True})
    elapsed = time.monotonic() - start
    message = str(storage_failure(caught.value, "list", uri))
    assert message == f"cannot list {uri}: cannot reach the endpoint {endpoint} (connection refused)"
    one_clean_line(message)
    assert elapsed < 60, f"took {elapsed:.1f}s"


def test_storage_failure_names_the_cause(s3_server: str) -> None:
    fs = s3(s3_server)
    with pytest.raises(FileNotFoundError) as no_bucket:
        fs.ls(f"no-such-bucket-{uuid.uuid4().hex[:8]}/x")
    with pytest.raises((ParamValidationError, ValueError)) as bad_name:
        fs.info("Bad_Bucket!/x")
    uri = "s3://b/x/"
    cases = {
        no_bucket.value: "bucket does not exist",
        bad_name.value: "invalid bucket name",
        translate_boto_error(client_error("AccessDenied", 403, "Access Denied")): "access denied",
        client_error("SignatureDoesNotMatch", 403): BAD_SIGNATURE,
        translate_boto_error(client_error("SlowDown", 503, "Please reduce your request rate.")): (
            "the server kept failing (SlowDown: Please reduce your request rate.)"
        ),
        EndpointConnectionError(endpoint_url="http://user:pw@127.0.0.1:9/b?list-type=2"): (
            "cannot reach the endpoint http://***@127.0.0.1:9 (connection failed)"
        ),
        ConnectTimeoutError(endpoint_url="http://127.0.0.1:9/b"): (
            "cannot reach the endpoint http://127.0.0.1:9 (connect timed out)"
        ),
        RuntimeError(f"line one with {TEST_SECRETS[1]}\nline two"): "RuntimeError: line one with ***",
    }
    for error, cause in cases.items():
        message = str(storage_failure(error, "list", uri))
        assert message == f"cannot list {uri}: {cause}"
        one_clean_line(message)
    assert str(storage_failure(ValueError("key=hunter2-xyz"), "read", uri, secrets=["hunter2-xyz"])).endswith("key=***")


def test_attempts_and_backoff_come_from_the_environment() -> None:
    code = "from m2f.pipeline.storage import retries; print(retries.STORAGE_ATTEMPTS, retries.STORAGE_BACKOFF_S)"
    env = {**os.environ, "M2F_STORAGE_ATTEMPTS": "3", "M2F_STORAGE_BACKOFF_S": "0.25"}
    run = functools.partial(subprocess.run, [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    done = run(env=env, check=True)
    assert done.stdout.split() == ["3", "0.25"]
    env["M2F_STORAGE_ATTEMPTS"] = "0"
    done = run(env=env)
    assert done.returncode != 0 and "M2F_STORAGE_ATTEMPTS must be >= 1" in done.stderr
    for retry, ceiling in ((1, 0.005), (2, 0.01), (5, 0.08), (20, retries.STORAGE_BACKOFF_MAX_S)):
        assert all(0 <= retries.backoff_s(retry) <= ceiling for _ in range(100))  # full jitter under the cap
