"""Shared fixtures: a real moto S3 server on 127.0.0.1 (s3fs's own test practice), buckets, options.

The fake credentials have distinctive values so tests can grep outputs, reports and logs for
them and prove they never leak. They are exported into os.environ for the whole session
(subprocesses started by tests inherit them); real AWS settings are masked meanwhile.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import fsspec
import pytest
from fsspec import AbstractFileSystem

from pipeline.storage import storage_options

TEST_AWS_ACCESS_KEY_ID = "m2f-test-key-AKIA9SECRET"
TEST_AWS_SECRET_ACCESS_KEY = "m2f-test-secret-0123456789"
TEST_SECRETS = (TEST_AWS_ACCESS_KEY_ID, TEST_AWS_SECRET_ACCESS_KEY)
MOTO_START_TIMEOUT_S = 60.0


@pytest.fixture(scope="session")
def aws_credentials(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Fake AWS credentials in os.environ for the session; no real profile, IMDS or endpoint."""
    missing = str(tmp_path_factory.mktemp("aws") / "absent")
    env = {
        "AWS_ACCESS_KEY_ID": TEST_AWS_ACCESS_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": TEST_AWS_SECRET_ACCESS_KEY,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": missing,
        "AWS_SHARED_CREDENTIALS_FILE": missing,
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    patch = pytest.MonkeyPatch()
    for name, value in env.items():
        patch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        patch.delenv(name, raising=False)
    for name in ("NO_PROXY", "no_proxy"):  # a proxy in the environment must not see 127.0.0.1
        current = os.environ.get(name, "")
        patch.setenv(name, ",".join(filter(None, [current, "127.0.0.1", "localhost"])))
    yield {"key": TEST_AWS_ACCESS_KEY_ID, "secret": TEST_AWS_SECRET_ACCESS_KEY}
    patch.undo()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_up(url: str, process: subprocess.Popen, log: Path) -> None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + MOTO_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"moto server exited with {process.returncode}:\n{log.read_text(errors='replace')}")
        try:
            with opener.open(url + "/", timeout=2):
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.2)
    raise RuntimeError(f"moto server did not answer at {url} within {MOTO_START_TIMEOUT_S:.0f}s")


@pytest.fixture(scope="session")
def s3_server(aws_credentials: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A moto S3 server subprocess on 127.0.0.1; yields its endpoint URL."""
    port = _free_port()
    log = tmp_path_factory.mktemp("moto") / "server.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_until_up(url, process, log)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="session")
def s3_options(s3_server: str) -> dict[str, Any]:
    """fsspec storage options for s3:// URIs on the moto server."""
    return storage_options("s3://", endpoint_url=s3_server)


@pytest.fixture
def s3_bucket(s3_server: str) -> str:
    """A fresh, uniquely named, empty bucket."""
    name = f"m2f-test-{uuid.uuid4().hex[:16]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3_fs(s3_options: dict[str, Any]) -> AbstractFileSystem:
    """An s3fs filesystem on the moto server, with its listing cache cleared."""
    fs = fsspec.filesystem("s3", **s3_options)
    fs.invalidate_cache()
    return fs


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models are many small ops: on 2 shared cores a second torch thread only waits."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
