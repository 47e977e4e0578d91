"""Shared fixtures: a real moto S3 server on 127.0.0.1 (s3fs's own test practice), buckets, options.

The fake credentials have distinctive values so tests can grep outputs, reports and logs for
them and prove they never leak. They are exported into os.environ for the whole session
(subprocesses started by tests inherit them); real AWS settings are masked meanwhile.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator
from typing import Any

import boto3
import fsspec
import pytest
from fsspec import AbstractFileSystem

from m2f.pipeline.storage import storage_options
from tests import net_guard
from tests.moto_server import moto_server

TEST_AWS_ACCESS_KEY_ID = "m2f-test-key-AKIA9SECRET"
TEST_AWS_SECRET_ACCESS_KEY = "m2f-test-secret-0123456789"
TEST_SECRETS = (TEST_AWS_ACCESS_KEY_ID, TEST_AWS_SECRET_ACCESS_KEY)


@pytest.fixture(scope="session", autouse=True)
def nothing_beyond_this_machine() -> Iterator[None]:
    """No test's own process connects beyond this machine (tests/net_guard.py): every server a test talks to
    (moto, HTTP, the hub) is its own, on 127.0.0.1."""
    patch = pytest.MonkeyPatch()
    attempts = net_guard.install_for_session(patch)
    yield
    patch.undo()
    assert not attempts, f"connections beyond this machine: {attempts}"


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


@pytest.fixture(scope="session")
def s3_server(aws_credentials: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A moto S3 server subprocess on 127.0.0.1; yields its endpoint URL."""
    with moto_server(tmp_path_factory.mktemp("moto")) as url:
        yield url


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


@pytest.fixture(scope="module")
def ray_cluster(aws_credentials: dict[str, str]) -> Iterator[None]:
    """A local Ray for the module, started after the fake AWS variables are set (workers inherit them)."""
    import ray

    if ray.is_initialized():
        yield
        return
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    from tests.test_infer import tiny_model_file  # test_infer imports this module: not at the top

    folder = tmp_path_factory.mktemp("models")
    return {task: tiny_model_file(folder / f"{task}.safetensors", task=task) for task in ("semantic", "panoptic")}
