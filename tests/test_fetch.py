"""Weights by name against real HTTP servers on 127.0.0.1 (tests/file_server.py): downloads, the cache,
offline use, cut transfers, checksums, the Hugging Face hub through huggingface_hub, and pack/unpack."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from m2f import model
from m2f.model import fetch, url_cache, zoo
from m2f.model.config import DecoderConfig, ModelConfig, PixelDecoderConfig, ResNetConfig
from tests import net_guard
from tests.file_server import FileServer, Repo, point_hub_at
from tests.hf_models import tiny_hf_model

pytestmark = pytest.mark.usefixtures("one_thread")
REPO_ROOT = Path(__file__).resolve().parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"
PATH = "/models/tiny.safetensors"


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[list]:
    """No connection beyond 127.0.0.1; no offline flag, proxy or cache from the outer environment."""
    attempts = net_guard.install(monkeypatch)
    for name in ("M2F_OFFLINE", "HF_HUB_OFFLINE", "HF_ENDPOINT", "HF_TOKEN", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(name, "127.0.0.1,localhost")
    monkeypatch.setenv("M2F_CACHE", str(tmp_path / "m2f-cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    yield attempts
    assert not attempts, f"connections beyond 127.0.0.1: {attempts}"


@pytest.fixture(scope="module")
def checkpoint() -> bytes:
    """A Mask2Former of a few thousand parameters in our .safetensors format."""
    torch.manual_seed(0)
    config = ModelConfig(
        name="tiny",
        backbone=ResNetConfig(depths=(1, 1, 1, 1), stem_channels=8, widths=(16, 32, 64, 128), norm="bn"),
        num_classes=3,
        class_names=("sky", "road", "car"),
        is_thing=(False, False, True),
        pixel_decoder=PixelDecoderConfig(conv_dim=32, mask_dim=32, num_layers=1, num_heads=4, ffn_dim=64, num_groups=8),
        decoder=DecoderConfig(hidden_dim=32, num_queries=8, num_heads=4, ffn_dim=64, num_layers=2),
    )
    return model.checkpoint.to_bytes(model.build_model(config))


@pytest.fixture
def server(checkpoint: bytes) -> Iterator[FileServer]:
    with FileServer(files={PATH: checkpoint}) as s:
        yield s


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0)


def cache_files(root: Path) -> list[str]:
    folder = root / "downloads"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_first_fetch_downloads_once_then_asks_only_if_changed(server, checkpoint, tmp_path):
    url = server.url + PATH
    first = fetch.resolve(url)
    assert (first.kind, first.source, first.downloaded) == ("url", url, True)
    assert first.sha256 == hashlib.sha256(checkpoint).hexdigest()
    assert Path(first.local).read_bytes() == checkpoint and first.local.endswith("-tiny.safetensors")
    assert server.count(PATH, status=200) == 1

    second = fetch.resolve(url)
    assert (second.local, second.sha256, second.downloaded) == (first.local, first.sha256, False)
    assert server.count(PATH, status=200) == 1  # no second body
    assert server.count(PATH, status=304) == 1
    assert server.log[-1].headers["If-None-Match"] == json.loads(Path(first.local + ".json").read_text())["etag"]

    loaded = model.load(first.local)
    assert loaded.checkpoint_sha256 == first.sha256
    (tmp_path / "original.safetensors").write_bytes(checkpoint)
    same_weights(loaded, model.load(tmp_path / "original.safetensors"))


@pytest.mark.parametrize("flag", ["M2F_OFFLINE", "HF_HUB_OFFLINE"])
def test_offline_with_a_warm_cache_makes_no_request(server, monkeypatch, flag):
    url = server.url + PATH
    warm = fetch.resolve(url)
    before = len(server.log)
    monkeypatch.setenv(flag, "1")
    again = fetch.resolve(url)
    assert (again.local, again.sha256, again.downloaded) == (warm.local, warm.sha256, False)
    assert len(server.log) == before


def test_offline_with_a_cold_cache_says_how_to_get_the_file(server, monkeypatch):
    monkeypatch.setenv("M2F_OFFLINE", "1")
    with pytest.raises(ValueError, match=r"offline mode is on.*m2f models download .* DEST.*--model") as info:
        fetch.resolve(server.url + PATH)
    assert "\n" not in str(info.value)
    assert server.log == []


def test_a_changed_file_replaces_the_cached_copy(server, checkpoint):
    url = server.url + PATH
    fetch.resolve(url)
    server.files[PATH] = checkpoint[:-8] + b"newbytes"
    fresh = fetch.resolve(url)
    assert fresh.downloaded and Path(fresh.local).read_bytes() == server.files[PATH]
    assert server.count(PATH, status=200) == 2


def test_a_cut_transfer_resumes_and_completes(server, checkpoint):
    server.drops[PATH] = [len(checkpoint) // 3]
    got = fetch.resolve(server.url + PATH)
    assert Path(got.local).read_bytes() == checkpoint and got.sha256 == hashlib.sha256(checkpoint).hexdigest()
    assert [r.status for r in server.log] == [200, 206]
    assert server.log[1].headers["Range"] == f"bytes={len(checkpoint) // 3}-"


def test_a_cut_transfer_restarts_when_the_server_ignores_ranges(server, checkpoint):
    server.ranges = False
    server.drops[PATH] = [100, len(checkpoint) - 1]  # two cuts, the second one byte short
    got = fetch.resolve(server.url + PATH)
    assert Path(got.local).read_bytes() == checkpoint
    assert [r.status for r in server.log] == [200, 200, 200]


def test_a_transfer_that_never_finishes_fails_and_leaves_no_file(server, checkpoint, tmp_path):
    server.drops[PATH] = [1000] * 10
    with pytest.raises(ValueError, match=r"did not finish after 3 tries"):
        fetch.resolve(server.url + PATH, retries=2)
    assert cache_files(tmp_path / "m2f-cache") == [url_cache.cached_name(server.url + PATH) + ".lock"]
    assert server.drops[PATH] == [1000] * 7  # 3 tries


def test_a_sha256_mismatch_fails_and_caches_nothing(server, checkpoint, tmp_path):
    url = server.url + PATH
    with pytest.raises(ValueError, match="sha256 .* does not match the expected 0000"):
        fetch.resolve(url, sha256="0" * 64)
    assert cache_files(tmp_path / "m2f-cache") == [url_cache.cached_name(url) + ".lock"]
    good = fetch.resolve(url, sha256=hashlib.sha256(checkpoint).hexdigest().upper())
    assert good.downloaded
    with pytest.raises(ValueError, match="cached copy .* not the expected"):
        fetch.resolve(url, sha256="1" * 64)


def test_an_unreachable_server_falls_back_to_the_cache_else_says_how_to_get_the_file(server, checkpoint):
    url = server.url + PATH
    warm = fetch.resolve(url)
    server.__exit__()  # the port now refuses connections
    assert fetch.resolve(url, retries=0).local == warm.local
    with pytest.raises(ValueError, match=r"cannot fetch .*/other\.pkl: .*m2f models download"):
        fetch.resolve(url.replace("tiny.safetensors", "other.pkl"), retries=1)


def test_http_errors_are_user_errors(server):
    with pytest.raises(ValueError, match=r"HTTP 404"):
        fetch.resolve(server.url + "/models/absent.pkl")


def test_zoo_names_download_from_the_base_url_and_check_the_md5_in_the_name(server, checkpoint, monkeypatch):
    monkeypatch.setenv("M2F_ZOO_BASE_URL", server.url)
    entry = zoo.find("coco-panoptic/r50")
    path = "/maskformer/mask2former/" + entry.path
    server.files[path] = checkpoint  # not the official bytes: its md5 cannot start with 94dc52
    for name in ("zoo:coco-panoptic/r50", "coco-panoptic/r50"):
        with pytest.raises(ValueError, match=r"md5 [0-9a-f]{32} does not start with 94dc52"):
            fetch.resolve(name)
    assert server.count(path, status=200) == 2
    # with the right md5 prefix, the same path is accepted
    md5 = hashlib.md5(checkpoint).hexdigest()[:6]
    got = url_cache.fetch_url(server.url + path, md5_prefix=md5)
    assert Path(got.path).read_bytes() == checkpoint
    with pytest.raises(ValueError, match="did you mean zoo:coco-panoptic/r50"):
        fetch.resolve("zoo:coco-panoptic/r5")
    monkeypatch.setenv("M2F_OFFLINE", "1")
    with pytest.raises(
        ValueError, match=r"cannot fetch zoo:coco-panoptic/swin-l: offline .*download zoo:coco-panoptic/swin-l DEST"
    ):
        fetch.resolve("coco-panoptic/swin-l")


# A child process: the loopback guard first, then resolve each argument; prints one JSON line per argument.
CHILD = """
import dataclasses, json, sys
import pytest
from tests import net_guard
attempts = net_guard.install(pytest.MonkeyPatch())
from m2f.model import fetch
for name in sys.argv[1:]:
    print(json.dumps(dataclasses.asdict(fetch.resolve(name))), flush=True)
assert not attempts, attempts
"""


def run_child(*names: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CHILD, *names], stdout=subprocess.PIPE, cwd=REPO_ROOT)


def results(proc: subprocess.Popen) -> list[dict]:
    out = proc.communicate(timeout=180)[0].decode()
    assert proc.returncode == 0, out
    return [json.loads(line) for line in out.splitlines()]


def test_concurrent_processes_download_once(server, checkpoint, tmp_path):
    server.delay_s = 1.0  # the first download holds the lock while the second process starts
    procs = [run_child(server.url + PATH) for _ in range(2)]
    (a,), (b,) = (results(p) for p in procs)
    assert a["local"] == b["local"] and Path(a["local"]).read_bytes() == checkpoint
    assert sorted([a["downloaded"], b["downloaded"]]) == [False, True]
    assert server.count(PATH, status=200) == 1
    assert server.count(PATH, status=304) == 1


def test_a_killed_download_leaves_nothing_under_the_final_name(server, checkpoint, tmp_path):
    server.delay_s = 30.0  # headers now, body much later: the child is killed while waiting for it
    proc = run_child(server.url + PATH)
    downloads = tmp_path / "m2f-cache" / "downloads"
    deadline = time.monotonic() + 60
    while not any(".part-" in name for name in cache_files(tmp_path / "m2f-cache")):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    name = url_cache.cached_name(server.url + PATH)
    assert sorted(cache_files(tmp_path / "m2f-cache")) == [name + ".lock", f"{name}.part-{proc.pid}"]
    server.delay_s = 0.0
    got = fetch.resolve(server.url + PATH)  # the lock died with the child; its leftover is cleared
    assert got.downloaded and Path(got.local).read_bytes() == checkpoint
    assert sorted(os.listdir(downloads)) == [name, name + ".json", name + ".lock"]


def test_a_fresh_process_uses_the_environment_alone(server, hf_folder, tmp_path, monkeypatch):
    """HF_ENDPOINT, HF_HOME and HF_HUB_CACHE as a user sets them; no request leaves 127.0.0.1."""
    server.repos["acme/tiny-m2f"] = Repo(COMMIT, {p.name: p.read_bytes() for p in hf_folder.iterdir()})
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    (online,) = results(run_child("acme/tiny-m2f"))
    assert (online["kind"], online["revision"], online["downloaded"]) == ("hub", COMMIT, True)
    assert Path(online["local"]).is_relative_to(tmp_path / "hf-cache")
    before = len(server.log)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (offline,) = results(run_child("acme/tiny-m2f"))
    assert offline == {**online, "downloaded": False}
    assert len(server.log) == before


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("facebook/mask2former-swin-large-coco-panoptic", ("facebook/mask2former-swin-large-coco-panoptic", None)),
        ("acme/tiny@v1.0", ("acme/tiny", "v1.0")),
        ("hf://acme/tiny@" + COMMIT, ("acme/tiny", COMMIT)),
        ("hf://acme/tiny", ("acme/tiny", None)),
        ("runs/best.safetensors", None),
        ("s3://bucket/model", None),
        ("demo", None),
        ("a/b/c", None),
        ("./acme/tiny", None),
    ],
)
def test_hub_ids_versus_paths(value, expected):
    assert fetch.hub_id(value) == expected


def test_an_existing_relative_path_is_never_a_hub_id(tmp_path, monkeypatch):
    (tmp_path / "acme" / "tiny").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert fetch.hub_id("acme/tiny") is None
    assert fetch.resolve("acme/tiny") == fetch.Resolved("acme/tiny", "acme/tiny", "local", None, None, False)
    with pytest.raises(ValueError, match="not a Hugging Face hub id"):
        fetch.hub_id("hf://acme")


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("hf") / "tiny-m2f"
    tiny_hf_model("resnet").save_pretrained(folder)
    (folder / "README.md").write_text("not a file model.load reads\n")
    return folder


@pytest.fixture
def hub(server: FileServer, hf_folder: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> FileServer:
    """The test server as the hub, as if HF_ENDPOINT had been set before huggingface_hub was imported.

    huggingface_hub derives ENDPOINT and its URL template from HF_ENDPOINT at import (transformers imported
    it already), and some calls (its agent-harness registry) read only those, so both are set here too.
    `test_a_fresh_process_uses_the_environment_alone` covers the plain environment.
    """
    files = {p.name: p.read_bytes() for p in hf_folder.iterdir()}
    server.repos["acme/tiny-m2f"] = Repo(COMMIT, files)
    point_hub_at(monkeypatch, server.url, tmp_path)
    return server


def outputs(m: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        out = m(x)
    return out.class_logits, out.mask_logits


def test_a_hub_id_resolves_to_a_snapshot_that_loads_like_the_folder(hub, hf_folder, tmp_path, monkeypatch):
    got = fetch.resolve("acme/tiny-m2f")
    assert (got.kind, got.source, got.revision, got.downloaded) == ("hub", "hf://acme/tiny-m2f", COMMIT, True)
    assert Path(got.local).is_relative_to(tmp_path / "hf-cache")
    assert sorted(os.listdir(got.local)) == ["config.json", "model.safetensors"]  # no README
    assert got.sha256 == hashlib.sha256((hf_folder / "model.safetensors").read_bytes()).hexdigest()
    loaded = model.load(got.local)
    assert loaded.checkpoint_sha256 == got.sha256
    for a, b in zip(outputs(loaded), outputs(model.load(str(hf_folder))), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not any("README" in r.path for r in hub.log)

    again = fetch.resolve("hf://acme/tiny-m2f@" + COMMIT)
    assert (again.local, again.revision, again.downloaded) == (got.local, COMMIT, False)

    before = len(hub.log)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    offline = fetch.resolve("acme/tiny-m2f")
    assert (offline.local, offline.revision, offline.sha256) == (got.local, COMMIT, got.sha256)
    assert len(hub.log) == before


def test_hub_errors_are_one_line_user_errors(hub, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="'acme/absent' is neither a local path nor a Hugging Face hub repo"):
        fetch.resolve("acme/absent")
    with pytest.raises(ValueError, match="has no revision 'v9'"):
        fetch.resolve("acme/tiny-m2f@v9")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cold"))
    with pytest.raises(ValueError, match=r"offline mode is on.*m2f models download hf://acme/tiny-m2f DEST") as info:
        fetch.resolve("acme/tiny-m2f")
    assert "\n" not in str(info.value)


def test_download_copies_to_any_fsspec_uri(server, hub, checkpoint, tmp_path):
    import fsspec

    url = server.url + PATH
    into = fetch.download(url, str(tmp_path / "dest") + "/")
    assert into.local == str(tmp_path / "dest" / "tiny.safetensors")
    assert Path(into.local).read_bytes() == checkpoint
    exact = fetch.download(url, str(tmp_path / "exact.safetensors"))
    assert Path(exact.local).read_bytes() == checkpoint

    folder = fetch.download("hf://acme/tiny-m2f", "memory://air-gapped/tiny-m2f")
    assert folder.local == "memory://air-gapped/tiny-m2f" and folder.revision == COMMIT
    fs = fsspec.filesystem("memory")
    assert sorted(p.rsplit("/", 1)[1] for p in fs.ls("/air-gapped/tiny-m2f", detail=False)) == [
        "config.json",
        "model.safetensors",
    ]
    same_weights(model.load(folder.local), model.load(fetch.resolve("acme/tiny-m2f").local))
    with pytest.raises(ValueError, match="nothing to download"):
        fetch.download(str(tmp_path / "exact.safetensors"), "memory://x/")


def test_pack_and_unpack_a_file_and_a_folder(server, hub, checkpoint, tmp_path):
    file = fetch.resolve(server.url + PATH)
    packed = fetch.pack(file.local)
    assert list(packed) == [Path(file.local).name] and packed[Path(file.local).name] == checkpoint
    local = fetch.unpack(packed, tmp_path / "worker")
    assert local.endswith(".safetensors") and Path(local).read_bytes() == checkpoint
    assert fetch.unpack(packed, tmp_path / "worker") == local  # once per content
    same_weights(model.load(local), model.load(file.local))

    snapshot = fetch.resolve("acme/tiny-m2f")
    folder = fetch.unpack(fetch.pack(snapshot.local), tmp_path / "worker")
    assert sorted(os.listdir(folder)) == ["config.json", "model.safetensors"]
    assert model.load(folder).checkpoint_sha256 == snapshot.sha256
    assert sorted(os.listdir(tmp_path / "worker" / "unpacked")) == sorted([Path(local).parent.name, Path(folder).name])

    for bad in ({"../x.pkl": b"x"}, {"a/b.pkl": b"x"}, {".hidden": b"x"}, {}):
        with pytest.raises(ValueError):
            fetch.unpack(bad, tmp_path / "worker")
    with pytest.raises(ValueError, match="neither a checkpoint file nor a folder with config.json"):
        fetch.pack(str(tmp_path))


def test_the_guard_refuses_the_outside_network(loopback_only):
    import socket

    with socket.socket() as sock, pytest.raises(net_guard.OutsideNetwork):
        sock.connect(("192.0.2.1", 80))  # TEST-NET-1: never routed
    with pytest.raises(net_guard.OutsideNetwork):
        socket.create_connection(("example.com", 443), timeout=0.1)
    assert loopback_only == [("192.0.2.1", 80), "example.com"]
    loopback_only.clear()  # refused as intended: not a failure of this test


def test_model_load_fetches_a_url_once_into_the_cache(server, checkpoint, tmp_path):
    url = server.url + PATH
    first, again = model.load(url), model.load(url)
    assert server.count(PATH, status=200) == 1  # the second load asked only whether it changed
    (tmp_path / "original.safetensors").write_bytes(checkpoint)
    same_weights(first, model.load(tmp_path / "original.safetensors"))
    same_weights(again, first)
