"""A moto S3 server subprocess on 127.0.0.1 (s3fs's own test practice), and what the benchmarks do on it.

One place for starting, waiting for and stopping it: the tests' `s3_server` fixture (through
tests/moto_server.py) and the pipeline benchmark both use it. It lives in bench/ so that the benchmarks
never import the test suite; the tests may import bench.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

from m2f.pipeline.storage import Storage

START_TIMEOUT_S = 60.0
MOTO_KEY, MOTO_SECRET = "m2f-bench-key", "m2f-bench-secret"  # moto accepts any; never real credentials


@contextlib.contextmanager
def moto_server(log_dir: Path) -> Iterator[str]:
    """Run a moto server for the length of the block, its output in `log_dir`; yields its endpoint URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    log = log_dir / f"moto-{port}.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
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


def _wait_until_up(url: str, process: subprocess.Popen, log: Path) -> None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"moto server exited with {process.returncode}:\n{log.read_text(errors='replace')}")
        try:
            with opener.open(url + "/", timeout=2):
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.2)
    raise RuntimeError(f"moto server did not answer at {url} within {START_TIMEOUT_S:.0f}s")


@contextlib.contextmanager
def moto_s3(log_dir: Path) -> Iterator[str]:
    """`moto_server` for a benchmark: 127.0.0.1 joins NO_PROXY meanwhile (processes started inside, Ray's
    workers too, inherit it), so that a proxy in the environment never sees the local server's traffic."""
    saved = {name: os.environ.get(name) for name in ("NO_PROXY", "no_proxy")}
    for name, value in saved.items():
        os.environ[name] = ",".join(filter(None, [value, "127.0.0.1", "localhost"]))
    try:
        with moto_server(log_dir) as url:
            yield url
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def moto_storage(endpoint_url: str) -> Storage:
    """The moto server at `endpoint_url` with fixed fake credentials, so nothing depends on the environment."""
    return Storage(
        endpoint_url, {"key": MOTO_KEY, "secret": MOTO_SECRET, "client_kwargs": {"region_name": "us-east-1"}}
    )


def new_bucket(endpoint_url: str) -> str:
    """A fresh, empty bucket on the moto server (boto3 comes with moto)."""
    import boto3

    name = f"m2f-bench-{uuid.uuid4().hex[:12]}"
    client = boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        region_name="us-east-1",
        aws_access_key_id=MOTO_KEY,
        aws_secret_access_key=MOTO_SECRET,
    )
    client.create_bucket(Bucket=name)
    return name


def upload_folder(folder: Path, target: str, storage: Storage) -> None:
    """Every file directly in `folder` to the prefix `target`."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(target, **storage.options(target))
    for path in sorted(folder.iterdir()):
        if path.is_file():
            fs.put_file(str(path), posixpath.join(root, path.name))
