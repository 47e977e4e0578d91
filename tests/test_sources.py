"""Input discovery (folders, globs, manifests) on local disk and on a real moto S3 server, and the
storage helpers it stands on (options, redaction, atomic writes)."""

from __future__ import annotations

import json
import os

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from m2f.pipeline import sources
from m2f.pipeline.decode import DecodeError, decode_image
from m2f.pipeline.secrets import redact
from m2f.pipeline.sources import list_inputs
from m2f.pipeline.storage import (
    is_temporary,
    open_fs,
    qualify,
    remove_temporaries,
    storage_options,
    temporary_path,
    write_atomic,
)
from tests.conftest import TEST_SECRETS
from tests.corpus import UNICODE_KEY, write_corpus


def _reference_walk(root: str) -> list[str]:
    """The order we promise, by os.walk: a folder's files sorted, then its subfolders sorted."""
    out = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if sources.is_image_name(name) and not name.startswith("."):
                out.append(os.path.join(folder, name))
    return out


@pytest.fixture
def local_corpus(tmp_path):
    root = str(tmp_path / "images")
    return root, write_corpus(root)


# --- local folders ------------------------------------------------------------------------------


def test_local_folder_is_walked_recursively_with_extension_filter(local_corpus) -> None:
    root, corpus = local_corpus
    listing = list_inputs(root, {})
    uris = list(listing.uris())
    assert listing.kind == "folder"
    assert uris == _reference_walk(root)
    assert set(uris) == set(corpus.uris(root))
    assert os.path.join(root, "UPPER.JPG") in uris and os.path.join(root, "nested/level1/SHOUT.PNG") in uris
    assert os.path.join(root, UNICODE_KEY) in uris
    assert listing.listed_count == len(corpus.expected)
    assert listing.skipped_count == len(corpus.skipped)
    assert sorted(listing.skipped) == sorted(os.path.join(root, rel) for rel in corpus.skipped)
    assert dict(listing.skipped_by_extension) == {".txt": 1, ".json": 1, ".md": 1, "(none)": 1, ".png": 1}
    summary = listing.summary()
    assert summary["listed"] == len(corpus.expected) and summary["skipped"] == len(corpus.skipped)
    json.dumps(summary)  # report-ready


def test_listing_is_repeatable_and_counters_reset(local_corpus) -> None:
    root, corpus = local_corpus
    listing = list_inputs(root + "/", {})
    first, second = list(listing), list(listing.uris())
    assert first == second
    assert listing.skipped_count == len(corpus.skipped) and listing.listed_count == len(first)
    batches = list(listing.batches(6))
    assert [len(b) for b in batches] == [6, 6, 6, 2]
    assert sum(batches, []) == first
    with pytest.raises(ValueError, match="batch size"):
        next(listing.batches(0))


def test_relative_input_gives_absolute_uris(local_corpus, monkeypatch) -> None:
    root, _ = local_corpus
    monkeypatch.chdir(os.path.dirname(root))
    uris = list(list_inputs("images", {}).uris())
    assert uris == _reference_walk(root) and all(os.path.isabs(u) for u in uris)


def test_skipped_sample_is_capped_but_count_exact(local_corpus, monkeypatch) -> None:
    root, corpus = local_corpus
    monkeypatch.setattr(sources, "MAX_SKIPPED_RECORDED", 2)
    listing = list_inputs(root, {})
    list(listing.uris())
    assert len(listing.skipped) == 2 and listing.skipped_count == len(corpus.skipped)


def test_single_file_input_is_taken_as_given(local_corpus) -> None:
    root, _ = local_corpus
    listing = list_inputs(os.path.join(root, "data.json"), {})
    assert listing.kind == "file"
    assert list(listing.uris()) == [os.path.join(root, "data.json")]


def test_missing_input_names_the_uri(tmp_path) -> None:
    missing = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="nope"):
        list_inputs(missing, {})
    with pytest.raises(FileNotFoundError, match="nope"):
        list_inputs(missing + "/*.jpg", {})
    with pytest.raises(ValueError, match="empty"):
        list_inputs("", {})


# --- globs --------------------------------------------------------------------------------------


def test_glob_is_expanded_sorted_and_filtered(local_corpus) -> None:
    root, _ = local_corpus
    pngs = list(list_inputs(f"{root}/*.png", {}).uris())
    names = ["bomb.png", "grey16.png", "not_an_image.png", "palette_transparent.png", "tiny.png", "wide.png"]
    assert pngs == [os.path.join(root, n) for n in names]

    everything = list_inputs(f"{root}/*", {})
    uris = list(everything.uris())
    assert os.path.join(root, "UPPER.JPG") in uris and not any(u.endswith((".txt", ".json")) for u in uris)
    assert everything.skipped_count == 2  # README.txt, data.json; folders are not files

    deep = list(list_inputs(f"{root}/nested/**/*.jpg", {}).uris())
    assert deep == [os.path.join(root, "nested/level1/level2/deep.jpg")]


# --- manifests ----------------------------------------------------------------------------------


def test_txt_manifest(local_corpus, tmp_path) -> None:
    root, _ = local_corpus
    manifest = tmp_path / "lists" / "inputs.txt"
    manifest.parent.mkdir()
    manifest.write_text(
        "\n".join(
            [
                "# nightly inputs",
                f"{root}/UPPER.JPG",
                "",
                "  ../images/tiny.png  ",  # relative: resolved against the manifest's folder
                f"file://{root}/wide.png",
                "s3://some-bucket/key with space.jpg",
                f"{root}/README.txt",  # no extension filter in a manifest
            ]
        ),
        encoding="utf-8",
    )
    listing = list_inputs(str(manifest), {})
    assert listing.kind == "manifest"
    assert list(listing.uris()) == [
        f"{root}/UPPER.JPG",
        f"{root}/tiny.png",
        f"{root}/wide.png",
        "s3://some-bucket/key with space.jpg",
        f"{root}/README.txt",
    ]
    assert listing.skipped_count == 0


def test_csv_manifest_reads_the_uri_column(local_corpus, tmp_path) -> None:
    root, _ = local_corpus
    manifest = tmp_path / "inputs.csv"
    manifest.write_text(
        "id,uri,note\n"
        f'1,{root}/UPPER.JPG,"a, quoted note"\n'
        f'2,"{root}/{UNICODE_KEY}",x\n'
        "3,images/tiny.png,relative\n"
        "4,,blank is ignored\n",
        encoding="utf-8",
    )
    assert list(list_inputs(str(manifest), {}).uris()) == [
        f"{root}/UPPER.JPG",
        f"{root}/{UNICODE_KEY}",
        f"{root}/tiny.png",
    ]


def test_csv_manifest_survives_type_changes_in_other_columns(tmp_path) -> None:
    # Past the reader's first 1 MiB block the "id" column turns from int to text.
    rows = [f"{i},/img/{i}.jpg" for i in range(60_000)] + ["not-a-number,/img/last.jpg"]
    manifest = tmp_path / "big.csv"
    manifest.write_text("id,uri\n" + "\n".join(rows) + "\n")
    assert manifest.stat().st_size > 1 << 20
    uris = list(list_inputs(str(manifest), {}).uris())
    assert len(uris) == 60_001 and uris[-1] == "/img/last.jpg"


def test_parquet_manifest_in_batches(local_corpus, tmp_path, monkeypatch) -> None:
    root, corpus = local_corpus
    uris = sorted(corpus.uris(root))
    table = pa.table({"other": list(range(len(uris))), "uri": uris})
    path = tmp_path / "inputs.parquet"
    pq.write_table(table, path, row_group_size=3)
    monkeypatch.setattr(sources, "MANIFEST_BATCH_ROWS", 4)
    assert list(list_inputs(str(path), {}).uris()) == uris

    dataset = tmp_path / "dataset.parquet"  # a folder of parquet files is a manifest too
    dataset.mkdir()
    pq.write_table(table.slice(0, 5), dataset / "part-0.parquet")
    pq.write_table(table.slice(5), dataset / "part-1.parquet")
    assert list(list_inputs(str(dataset), {}).uris()) == uris


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_manifest_without_uri_column_is_a_value_error(tmp_path, suffix: str) -> None:
    path = tmp_path / f"bad{suffix}"
    if suffix == ".csv":
        path.write_text("path\n/a.jpg\n")
    else:
        pq.write_table(pa.table({"path": ["/a.jpg"]}), path)
    listing = list_inputs(str(path), {})
    with pytest.raises(ValueError, match="no 'uri' column"):
        list(listing.uris())


# --- storage helpers ----------------------------------------------------------------------------


def test_storage_options() -> None:
    endpoint = "http://127.0.0.1:9000"
    assert storage_options("s3://b/k", endpoint) == {"client_kwargs": {"endpoint_url": endpoint}}
    assert storage_options("/local/path", endpoint, '{"anon": true}') == {}
    merged = storage_options("s3://b", endpoint, '{"anon": false, "client_kwargs": {"region_name": "eu-west-1"}}')
    assert merged == {"anon": False, "client_kwargs": {"endpoint_url": endpoint, "region_name": "eu-west-1"}}
    assert storage_options("gs://b", endpoint) == {}  # the endpoint is for S3-compatible stores only
    with pytest.raises(ValueError, match="must start with http"):
        storage_options("s3://b", "127.0.0.1:9000")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"secret": "hunter2-very-secret"', "not valid JSON"),
        ('["hunter2-very-secret"]', "must be a JSON object"),
        ('{"client_kwargs": "hunter2-very-secret"}', "client_kwargs"),
    ],
)
def test_bad_storage_options_never_echo_the_json(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        storage_options("s3://b", None, text)
    assert "hunter2" not in str(info.value)


def test_redact_hides_secrets_at_any_depth() -> None:
    config = {
        "input": "s3://bucket/in",
        "storage_options": {
            "key": TEST_SECRETS[0],
            "secret": TEST_SECRETS[1],
            "client_kwargs": {"aws_session_token": "sess-9f8e7d", "endpoint_url": "http://127.0.0.1:1"},
        },
        "headers": [{"Authorization-Token": "t"}, {"Password": "p"}],
        "proxy": "http://user:pa55@proxy:8080/",
        "batch_size": 8,
        "AWS_ACCESS_KEY_ID": TEST_SECRETS[0],
        "credentials": {"anything": "inside"},
    }
    clean = redact(config)
    text = json.dumps(clean)
    assert not any(secret in text for secret in (*TEST_SECRETS, "pa55", "sess-9f8e7d"))
    assert clean["storage_options"]["client_kwargs"]["endpoint_url"] == "http://127.0.0.1:1"
    assert clean["input"] == "s3://bucket/in" and clean["batch_size"] == 8
    assert clean["credentials"] == "***" and clean["proxy"] == "http://***@proxy:8080/"
    assert config["storage_options"]["key"] == TEST_SECRETS[0]  # the original is untouched


def test_write_atomic_local_leaves_no_temporary(tmp_path) -> None:
    fs, folder = open_fs(str(tmp_path / "out" / "deeper"), {})
    target = f"{folder}/part.parquet"
    write_atomic(fs, target, b"first")
    write_atomic(fs, target, "second")  # replaces
    with open(target, "rb") as f:
        assert f.read() == b"second"
    assert os.listdir(os.path.dirname(target)) == ["part.parquet"]

    tmp = temporary_path(target)
    assert is_temporary(tmp) and os.path.basename(tmp).startswith(".") and not is_temporary(target)
    with open(tmp, "wb") as f:
        f.write(b"half")  # what a killed writer leaves
    assert remove_temporaries(fs, fs.ls(folder, detail=False)) == 1
    assert os.listdir(folder) == ["part.parquet"]


def test_write_atomic_s3_and_qualify(s3_bucket, s3_options) -> None:
    fs, path = open_fs(f"s3://{s3_bucket}/out/run.json", s3_options)
    write_atomic(fs, path, '{"ok": true}')
    assert fs.cat_file(path) == b'{"ok": true}'
    assert fs.ls(f"{s3_bucket}/out", detail=False) == [f"{s3_bucket}/out/run.json"]
    assert qualify(fs, path) == f"s3://{s3_bucket}/out/run.json"


# --- S3 (moto server) ---------------------------------------------------------------------------


def test_s3_prefix_listing_matches_local(s3_bucket, s3_options, s3_fs, local_corpus) -> None:
    local_root, corpus = local_corpus
    write_corpus(f"{s3_bucket}/corpus", s3_fs)
    root = f"s3://{s3_bucket}/corpus"
    for spelling in (root, root + "/"):
        listing = list_inputs(spelling, s3_options)
        uris = list(listing.uris())
        assert set(uris) == set(corpus.uris(root))
        assert [u[len(root) :] for u in uris] == [u[len(local_root) :] for u in _reference_walk(local_root)]
        assert listing.skipped_count == len(corpus.skipped)
    assert f"{root}/{UNICODE_KEY}" in uris

    # Every listed URI opens and decodes as the corpus says.
    expected = corpus.uris(root)
    for uri in uris:
        with fsspec.open(uri, "rb", **s3_options) as f:
            data = f.read()
        if expected[uri].ok:
            assert decode_image(data).shape[1::-1] == expected[uri].size
        else:
            with pytest.raises(DecodeError):
                decode_image(data)


def test_s3_glob_and_manifests(s3_bucket, s3_options, s3_fs) -> None:
    write_corpus(f"{s3_bucket}/corpus", s3_fs)
    root = f"s3://{s3_bucket}/corpus"
    jpgs = list(list_inputs(f"{root}/*.jpg", s3_options).uris())
    assert jpgs == [f"{root}/{n}" for n in ("cmyk.jpg", "empty.jpg", "exif_rotated.jpg", "truncated.jpg")]

    s3_fs.pipe_file(f"{s3_bucket}/lists/in.txt", b"# relative to the manifest's folder\n../corpus/tiny.png\n")
    assert list(list_inputs(f"s3://{s3_bucket}/lists/in.txt", s3_options).uris()) == [f"{root}/tiny.png"]

    s3_fs.pipe_file(f"{s3_bucket}/lists/in.csv", f"uri\n{root}/{UNICODE_KEY}\n".encode())
    assert list(list_inputs(f"s3://{s3_bucket}/lists/in.csv", s3_options).uris()) == [f"{root}/{UNICODE_KEY}"]

    with s3_fs.open(f"{s3_bucket}/lists/in.parquet", "wb") as f:
        pq.write_table(pa.table({"uri": [f"{root}/wide.png", "../corpus/UPPER.JPG"]}), f)
    assert list(list_inputs(f"s3://{s3_bucket}/lists/in.parquet", s3_options).uris()) == [
        f"{root}/wide.png",
        f"{root}/UPPER.JPG",
    ]


def test_s3_missing_inputs(s3_bucket, s3_options) -> None:
    empty_bucket = list_inputs(f"s3://{s3_bucket}", s3_options)  # exists, holds nothing
    assert empty_bucket.kind == "folder" and list(empty_bucket.uris()) == []
    with pytest.raises(FileNotFoundError, match="no-such-prefix"):
        list_inputs(f"s3://{s3_bucket}/no-such-prefix", s3_options)
    with pytest.raises(FileNotFoundError, match="m2f-no-such-bucket"):
        list_inputs("s3://m2f-no-such-bucket-0123/images", s3_options)
