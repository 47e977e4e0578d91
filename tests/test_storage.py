"""`Storage`, the endpoint and --storage-options as one value: the options it gives are exactly those of
`storage_options` for the same two CLI strings, it travels through pickle, and printing it shows no secret."""

from __future__ import annotations

import itertools
import json
import pickle

import pytest
from fsspec.implementations.local import LocalFileSystem
from s3fs import S3FileSystem

from m2f.pipeline.storage import Storage, open_fs, storage_options
from tests.conftest import TEST_SECRETS

ENDPOINT = "http://127.0.0.1:9000"
URIS = [
    "s3://bucket/key.png",
    "s3a://bucket/",
    "gs://bucket/key",
    "/local/path.png",
    "file:///local/path",
    "memory://x",
]
ENDPOINTS = [None, "", ENDPOINT]
OPTIONS = [
    None,
    "",
    "{}",
    '{"anon": true}',
    '{"key": "k-1234", "client_kwargs": {"region_name": "eu-west-1"}}',
    '{"client_kwargs": {"endpoint_url": "http://other:1"}, "config_kwargs": {"retries": {"total_max_attempts": 1}}}',
]
SECRET_OPTIONS = json.dumps({"key": TEST_SECRETS[0], "secret": TEST_SECRETS[1], "client_kwargs": {"region_name": "x"}})


@pytest.mark.parametrize(("endpoint", "options_json"), list(itertools.product(ENDPOINTS, OPTIONS)))
def test_options_are_those_of_storage_options(endpoint: str | None, options_json: str | None) -> None:
    storage = Storage.from_cli(endpoint, options_json)
    for uri in URIS:
        assert storage.options(uri) == storage_options(uri, endpoint, options_json), uri


def test_the_endpoint_is_for_s3_only() -> None:
    storage = Storage.from_cli(ENDPOINT, '{"anon": true}')
    assert storage.options("s3://b/k") == {"anon": True, "client_kwargs": {"endpoint_url": ENDPOINT}}
    assert storage.options("s3a://b/k") == {"anon": True, "client_kwargs": {"endpoint_url": ENDPOINT}}
    assert storage.options("gs://b/k") == {"anon": True}  # the user's options go to every remote store
    assert storage.options("/local/path") == {} and storage.options("file:///local/path") == {}
    # A bad endpoint is refused where it would be used, as storage_options does: on s3:// URIs.
    bad = Storage.from_cli("127.0.0.1:9000")
    assert bad.options("/local/path") == {} and bad.options("gs://b") == {}
    with pytest.raises(ValueError, match="--endpoint-url must start with http:// or https://"):
        bad.options("s3://b/k")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"secret": "hunter2-very-secret"', "--storage-options is not valid JSON: "),
        ('["hunter2-very-secret"]', "--storage-options must be a JSON object, got a JSON list"),
        ('{"client_kwargs": "hunter2-very-secret"}', "--storage-options: 'client_kwargs' must be a JSON object"),
    ],
)
def test_bad_json_is_refused_with_today_s_error(text: str, message: str) -> None:
    with pytest.raises(ValueError) as from_cli:
        Storage.from_cli(ENDPOINT, text)
    with pytest.raises(ValueError) as today:
        storage_options("s3://b", None, text)
    assert str(from_cli.value) == str(today.value) and str(from_cli.value).startswith(message)
    assert "hunter2" not in str(from_cli.value)


def test_a_storage_built_directly_is_checked_too() -> None:
    with pytest.raises(ValueError, match="must be a JSON object, got a JSON list"):
        Storage(ENDPOINT, ["not", "a", "dict"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'client_kwargs' must be a JSON object"):
        Storage(None, {"client_kwargs": "x"})


def test_pickle_round_trip() -> None:
    storage = Storage.from_cli(ENDPOINT, SECRET_OPTIONS)
    back = pickle.loads(pickle.dumps(storage))
    assert back == storage and hash(back) == hash(storage)
    assert back.options("s3://b/k") == storage.options("s3://b/k")
    assert back.options("s3://b/k")["key"] == TEST_SECRETS[0]  # the secret itself still works after the trip
    assert Storage.from_cli(ENDPOINT, "{}") != storage


def test_repr_shows_no_secret() -> None:
    storage = Storage.from_cli("http://user:pa55word@127.0.0.1:9000", SECRET_OPTIONS)
    for text in (repr(storage), str(storage), f"{storage}", repr([storage])):
        assert not any(secret in text for secret in (*TEST_SECRETS, "pa55word")), text
        assert "127.0.0.1:9000" in text and "region_name" in text  # what is not secret still shows
    assert repr(Storage()) == "Storage(endpoint_url=None, user_options={})"


def test_options_are_a_fresh_copy_each_time() -> None:
    storage = Storage.from_cli(None, '{"config_kwargs": {"retries": {"total_max_attempts": 1}}}')
    first = storage.options("s3://b/k")
    first["config_kwargs"]["retries"]["total_max_attempts"] = 99
    assert storage.options("s3://b/k") == {"config_kwargs": {"retries": {"total_max_attempts": 1}}}


def test_open_is_open_fs_with_its_options(tmp_path) -> None:
    local = str(tmp_path / "images" / "a.png")
    fs, path = Storage.from_cli(ENDPOINT, '{"anon": true}').open(local)
    assert isinstance(fs, LocalFileSystem) and (fs, path) == open_fs(local, {})
    fs, path = Storage.from_cli(ENDPOINT, '{"anon": true, "skip_instance_cache": true}').open("s3://bucket/a/b.png")
    assert isinstance(fs, S3FileSystem) and path == "bucket/a/b.png"
    assert fs.anon and fs.client_kwargs == {"endpoint_url": ENDPOINT}
    assert fs.config_kwargs["connect_timeout"] == 3  # bounded botocore, as open_fs gives every S3 filesystem
