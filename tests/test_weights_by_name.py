"""`m2f segment --model NAME`: weights named by URL or Hugging Face hub id, fetched once per run in the driver
and read by every model actor from the cache, end to end on a local Ray. The servers are the tests' own, on
127.0.0.1 (tests/file_server.py); the download logic itself is tested in tests/test_fetch.py."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.file_server import FileServer, Repo, point_hub_at
from tests.hf_models import tiny_hf_model
from tests.test_segment_job import rows_of, segment, write_images

PATH = "/models/tiny.safetensors"
COMMIT = "89abcdef0123456789abcdef0123456789abcdef"
SAME = "* exclude (processed_at, run_id, inference_ms)"  # what two runs of one model share


def finished_downloads(cache: Path) -> list[str]:
    """The files a download finished (not its lock files)."""
    return sorted(name for name in os.listdir(cache / "downloads") if not name.endswith(".lock"))


@pytest.fixture
def isolated_caches(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("M2F_OFFLINE", "HF_HUB_OFFLINE", "HF_TOKEN", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("M2F_CACHE", str(tmp_path / "m2f-cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")


@pytest.fixture
def images(tmp_path: Path) -> Path:
    folder = tmp_path / "in"
    write_images(folder, [(40, 32), (48, 40), (32, 32)])
    return folder


def test_a_url_is_fetched_once_per_run_however_many_actors(
    ray_cluster, models, images, isolated_caches, tmp_path
) -> None:
    with FileServer(files={PATH: Path(models["semantic"]).read_bytes()}) as server:
        url = server.url + PATH
        args = ["--model", url, "--actors", 2, "--cpus-per-actor", 0.5, "--json"]
        first = segment(images, tmp_path / "out1", *args)
        assert first.exit_code == 0, first.output
        assert server.count(PATH, status=200) == 1  # the driver's one GET; the two actors read the cache
        again = segment(images, tmp_path / "out2", *args)
        assert again.exit_code == 0, again.output
        assert server.count(PATH, status=200) == 1  # no second body: at most a conditional request
        assert server.count(PATH, method="GET") - server.count(PATH, status=200) == server.count(PATH, status=304)
        cached = finished_downloads(tmp_path / "m2f-cache")
        wrong = segment(images, tmp_path / "out4", "--model", url + "?v=2", "--model-sha256", "0" * 64, "--json")
        assert wrong.exit_code == 2 and "sha256" in wrong.output, wrong.output  # a digest that does not match
        assert finished_downloads(tmp_path / "m2f-cache") == cached  # nothing new under a final name
    report = json.loads(first.stdout.strip().splitlines()[-1])
    assert (report["model"]["source"], report["model"]["kind"]) == (url, "url")
    local = segment(images, tmp_path / "out3", "--model", models["semantic"])
    assert local.exit_code == 0, local.output
    assert rows_of(tmp_path / "out1", SAME) == rows_of(tmp_path / "out3", SAME)  # the same model, the same rows


@pytest.fixture
def hub(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator:
    folder = tmp_path_factory.mktemp("hf") / "tiny-m2f"
    tiny_hf_model("resnet").save_pretrained(folder)
    with FileServer() as server:
        server.repos["acme/tiny-m2f"] = Repo(COMMIT, {p.name: p.read_bytes() for p in folder.iterdir()})
        point_hub_at(monkeypatch, server.url, tmp_path)
        yield server, folder


def test_a_hub_id_gives_the_rows_of_the_same_folder_and_runs_offline_from_the_cache(
    ray_cluster, images, isolated_caches, hub, monkeypatch, tmp_path
) -> None:
    server, folder = hub
    by_name = segment(images, tmp_path / "by-name", "--model", "acme/tiny-m2f", "--json")
    assert by_name.exit_code == 0, by_name.output
    report = json.loads(by_name.stdout.strip().splitlines()[-1])
    assert (report["model"]["kind"], report["model"]["revision"]) == ("hub", COMMIT)
    by_folder = segment(images, tmp_path / "by-folder", "--model", folder)
    assert by_folder.exit_code == 0, by_folder.output
    assert rows_of(tmp_path / "by-name", SAME) == rows_of(tmp_path / "by-folder", SAME)

    requests = len(server.log)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    offline = segment(images, tmp_path / "offline", "--model", "acme/tiny-m2f")
    assert offline.exit_code == 0, offline.output
    assert len(server.log) == requests  # from the cache alone
    assert rows_of(tmp_path / "offline", SAME) == rows_of(tmp_path / "by-folder", SAME)


def test_a_hub_id_not_in_the_cache_offline_is_a_bad_argument(isolated_caches, images, monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with FileServer() as server:  # nothing may be asked of it, nor of anyone else
        point_hub_at(monkeypatch, server.url, tmp_path)
        result = segment(images, tmp_path / "out", "--model", "facebook/mask2former-swin-tiny-coco-instance", "--json")
        assert server.log == []
    assert result.exit_code == 2, result.output
    assert "m2f models download" in result.output
    assert json.loads(result.stdout.strip().splitlines()[-1])["status"] == "invalid"
    assert not (tmp_path / "out" / "_runs").exists() or not any((tmp_path / "out" / "_runs").iterdir())


def test_models_lists_the_catalog_and_download_copies_a_checkpoint(models, isolated_caches, tmp_path) -> None:
    from typer.testing import CliRunner

    from m2f.cli import app
    from m2f.model import zoo

    listed = CliRunner().invoke(app, ["models", "--json"])
    assert listed.exit_code == 0, listed.output
    names = [r["name"] for r in json.loads(listed.stdout.strip().splitlines()[-1])]
    assert names == [e.name for e in zoo.entries()] and "coco-panoptic/swin-l" in names
    with FileServer(files={PATH: Path(models["semantic"]).read_bytes()}) as server:
        copied = CliRunner().invoke(app, ["models", "download", server.url + PATH, str(tmp_path / "dest")])
    assert copied.exit_code == 0, copied.output
    (target,) = (tmp_path / "dest").iterdir()
    assert target.read_bytes() == Path(models["semantic"]).read_bytes()
    assert f"--model {target}" in copied.output
