"""Inputs nobody vetted: what anyone upstream can drop into a bucket or a manifest.

A FIFO, a character device, a socket, a folder named like an image, a sparse 2 GB `.jpg`, a read that never
finishes, a URI carrying a password, OUTPUT lying inside INPUT. Each is one error row (or one skipped
file), never a full node, a stalled run, a leaked secret or a run that ingests its own output. The reads
are real (local special files, an HTTP server on 127.0.0.1 that stalls, moto S3, a local Ray).
"""

from __future__ import annotations

import http.server
import json
import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from m2f.pipeline.infer import prepare_images
from m2f.pipeline.reading import ReadLimits, read_all
from m2f.pipeline.secrets import has_userinfo, without_userinfo
from m2f.pipeline.sources import excluded_by, list_inputs
from m2f.pipeline.storage import open_fs
from tests.test_infer import png, tiny_config
from tests.test_segment_job import rows_of, segment

PREPROCESS = tiny_config().preprocess
SECRET = "hunter2-S3CRET-pass"


def prepare(uris: list[str], limits: ReadLimits | None = None) -> dict[str, dict]:
    table = prepare_images({"image_uri": uris}, preprocess=PREPROCESS, max_pixels=10**8, limits=limits)
    rows = table.select(["image_uri", "status", "error", "source_bytes", "width"]).to_pylist()
    assert [r["image_uri"] for r in rows] == uris  # one row per URI, in order
    return {r["image_uri"]: r for r in rows}


@pytest.fixture
def special_files(tmp_path: Path) -> Iterator[dict[str, str]]:
    """Real files of every kind a listing can name, each with the reason its row must give."""
    (tmp_path / "good.png").write_bytes(png(40, 30))
    os.mkfifo(tmp_path / "fifo.jpg")  # opened for reading, it blocks until a writer comes: none will
    (tmp_path / "folder.jpg").mkdir()
    with open(tmp_path / "sparse.jpg", "wb") as f:
        f.truncate(2 * 1024**3)  # 2 GB that cost no disk: read whole, they would cost 2 GB of memory
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(tmp_path / "socket.png"))
    os.symlink(tmp_path / "good.png", tmp_path / "link.png")
    yield {
        str(tmp_path / "good.png"): "",
        str(tmp_path / "fifo.jpg"): "not a regular file: a FIFO",
        str(tmp_path / "folder.jpg"): "not a regular file: a directory",
        str(tmp_path / "sparse.jpg"): f"too large: {2 * 1024**3} bytes > limit {512 * 1024**2}",
        str(tmp_path / "socket.png"): "not a regular file: a socket",
        "/dev/zero": "not a regular file: a character device",
        str(tmp_path / "link.png"): "",  # a link to a regular file is read as the file
        str(tmp_path / "missing.png"): "unreadable: file not found",
        "s3://***@bucket/x.jpg": "credentials in URI: refused",
    }
    listener.close()


@pytest.mark.timeout(60)
def test_every_listed_uri_is_inspected_before_it_is_read(special_files: dict[str, str]) -> None:
    rows = prepare(list(special_files))
    for uri, reason in special_files.items():
        row = rows[uri]
        if not reason:
            assert (row["status"], row["width"]) == ("ok", 40), row
        else:
            assert row["status"] == "error" and row["error"].startswith(reason), row
            assert row["source_bytes"] == -1  # nothing was read


def test_a_file_over_the_limit_is_too_large_and_one_at_it_is_read(tmp_path: Path) -> None:
    data = png(64, 48)
    (tmp_path / "a.png").write_bytes(data)
    uri = str(tmp_path / "a.png")
    assert prepare([uri], ReadLimits(max_file_bytes=len(data)))[uri]["status"] == "ok"
    row = prepare([uri], ReadLimits(max_file_bytes=len(data) - 1))[uri]
    assert row["error"] == f"too large: {len(data)} bytes > limit {len(data) - 1} (--max-file-bytes)"


# --- a read that never finishes ------------------------------------------------------------------


class StallingHandler(http.server.BaseHTTPRequestHandler):
    """Serves /good.png; /stall.png announces 5 000 bytes and then sends nothing until the test ends."""

    good = png(32, 24, seed=3)
    release = threading.Event()

    def do_HEAD(self) -> None:  # noqa: N802 (http.server's naming)
        self._headers()

    def do_GET(self) -> None:  # noqa: N802
        self._headers()
        if self.path == "/good.png":
            self.wfile.write(self.good)
        else:
            self.release.wait(60)

    def _headers(self) -> None:
        if self.path not in ("/good.png", "/stall.png"):
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(self.good) if self.path == "/good.png" else 5000))
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def stalling_server() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), StallingHandler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    StallingHandler.release.set()
    server.shutdown()


@pytest.mark.timeout(60)
def test_a_read_that_never_finishes_is_an_error_row(stalling_server: str) -> None:
    uris = [f"{stalling_server}/stall.png", f"{stalling_server}/good.png"]
    start = time.monotonic()
    rows = prepare(uris, ReadLimits(timeout_s=2.0))
    assert time.monotonic() - start < 20
    assert rows[uris[0]]["error"].startswith("unreadable: read timed out after"), rows[uris[0]]
    assert rows[uris[1]]["status"] == "ok", rows[uris[1]]


# --- a byte budget per task -----------------------------------------------------------------------


def test_reads_run_ahead_only_within_the_byte_budget(tmp_path: Path) -> None:
    """Ten 1 MB files, a 2.5 MB budget: when the consumer takes file i, at most files i..i+1 are read and
    not yet taken (i+2 would make 3 MB), however many threads there are."""
    size = 1_000_000
    uris = []
    for i in range(10):
        (tmp_path / f"{i}.bin").write_bytes(bytes([i]) * size)
        uris.append(str(tmp_path / f"{i}.bin"))
    events: list[tuple[str, int]] = []
    opened: Counter[str] = Counter()
    lock = threading.Lock()

    def open_uri(uri: str):
        with lock:
            opened[uri] += 1
            if opened[uri] == 2:  # the first open inspects, the second reads
                events.append(("read", uris.index(uri)))
        return open_fs(uri, {})

    limits = ReadLimits(budget_bytes=int(2.5 * size), threads=8)
    for uri, data in read_all(uris, open_uri, limits, str):
        index = uris.index(uri)
        assert data == bytes([index]) * size
        with lock:
            started = {i for kind, i in events if kind == "read"}
        assert max(started) <= index + 1, (index, sorted(started))
        time.sleep(0.05)  # a slow decoder: reads ahead would pile up if the budget did not hold them
    assert sorted(i for _, i in events) == list(range(10))


# --- what a listing yields ------------------------------------------------------------------------


def test_user_info_is_recognised_in_the_authority_only() -> None:
    assert has_userinfo(f"s3://KEY:{SECRET}@bucket/a.jpg")
    assert has_userinfo("https://user@example.com/a.jpg")
    assert not has_userinfo("s3://bucket/logo@2x.png")
    assert not has_userinfo("/data/a@b.jpg")
    assert without_userinfo(f"s3://KEY:{SECRET}@bucket/a@2x.jpg") == "s3://***@bucket/a@2x.jpg"
    assert without_userinfo("s3://bucket/a.jpg") == "s3://bucket/a.jpg"


@pytest.mark.parametrize("suffix", [".txt", ".csv"])
def test_a_manifest_entry_with_a_password_is_listed_masked(tmp_path: Path, suffix: str) -> None:
    entries = [f"s3://KEY:{SECRET}@bucket/a.jpg", "s3://bucket/b@2x.jpg"]
    manifest = tmp_path / f"in{suffix}"
    manifest.write_text(("uri\n" if suffix == ".csv" else "") + "\n".join(entries) + "\n")
    assert list(list_inputs(str(manifest), {}).uris()) == ["s3://***@bucket/a.jpg", "s3://bucket/b@2x.jpg"]


def test_output_is_never_listed_whatever_the_nesting(tmp_path: Path) -> None:
    images = tmp_path / "images"
    for rel in ("a.png", "sub/b.png", "out/_previews/a-0.png", "out/deep/c.png", "outer/d.png"):
        (images / rel).parent.mkdir(parents=True, exist_ok=True)
        (images / rel).write_bytes(b"x")
    out = str(images / "out")
    listing = list_inputs(str(images), {}, output=out)
    assert sorted(listing.uris()) == sorted(str(images / r) for r in ("a.png", "sub/b.png", "outer/d.png"))
    # A glob and a manifest leave OUTPUT out too, and count what they left out.
    globbed = list_inputs(f"{images}/**/*.png", {}, output=out)
    assert not [u for u in globbed.uris() if u.startswith(out + "/")]
    assert globbed.summary()["output_excluded"] == 2
    manifest = tmp_path / "m.txt"
    manifest.write_text(f"{images}/a.png\n{out}/deep/c.png\n")
    assert list(list_inputs(str(manifest), {}, output=out).uris()) == [str(images / "a.png")]
    # INPUT inside OUTPUT: the user's images there are listed, OUTPUT's own folders are not.
    inside = list_inputs(out, {}, output=out)
    assert list(inside.uris()) == [f"{out}/deep/c.png"]
    assert excluded_by("s3://b/out/images", "s3://b/out/") == (
        "s3://b/out/_runs",
        "s3://b/out/_previews",
        "s3://b/out/_quarantine",
    )
    assert excluded_by("s3://b/in", "s3://b/in-out") == ("s3://b/in-out",)


def test_a_manifest_line_too_long_for_a_uri_is_skipped_and_counted(tmp_path: Path) -> None:
    manifest = tmp_path / "in.txt"
    with open(manifest, "w") as f:
        f.write("/data/a.jpg\n" + "x" * 5_000_000 + "\n/data/b.jpg\n" + "y" * 100_000)
    listing = list_inputs(str(manifest), {})
    assert list(listing.uris()) == ["/data/a.jpg", "/data/b.jpg"]
    assert listing.skipped_count == 2


def test_an_input_that_is_a_fifo_or_a_device_is_refused(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "list.txt")
    for special in (str(tmp_path / "list.txt"), "/dev/zero"):
        with pytest.raises(ValueError, match="is not a regular file or folder"):
            list_inputs(special, {})


# --- end to end -----------------------------------------------------------------------------------


class TreeMemory:
    """Peak resident memory of this process and all its descendants (Ray's workers included), sampled."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self.peak = max(self.peak, tree_rss(os.getpid()))


def tree_rss(root: int) -> int:
    parents, rss = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(entry)] = int(fields[1])
        rss[int(entry)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
    tree, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        children = [p for p, pp in parents.items() if pp == parent and p not in tree]
        tree.update(children)
        frontier.extend(children)
    return sum(rss.get(p, 0) for p in tree)


@pytest.mark.timeout(300)
def test_a_hostile_manifest_finishes_with_one_row_per_line(
    ray_cluster, models, special_files, s3_server, tmp_path, capfd
) -> None:
    manifest = tmp_path / "hostile.txt"
    lines = [u for u in special_files if not u.startswith("s3://")] + [f"s3://KEY:{SECRET}@bucket/x.jpg"]
    manifest.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    baseline = tree_rss(os.getpid())
    with TreeMemory() as memory:
        result = segment(
            manifest, out, "--model", models["semantic"], "--max-error-rate", 1, "--endpoint-url", s3_server, "--json"
        )
    assert result.exit_code == 0, result.output
    rows = rows_of(out)
    masked = {
        u if not u.startswith("s3://") else without_userinfo(u): r
        for u, r in zip(lines, special_files.values(), strict=True)
    }
    assert Counter(r["image_uri"] for r in rows) == Counter(list(masked))  # one row per line, the secret masked
    for row in rows:
        reason = masked[row["image_uri"]]
        assert (row["status"] == "ok") == (not reason), row
        assert row["error"] is None if not reason else row["error"].startswith(reason), row
    # The sparse 2 GB file was not read: nothing grew by anything like it.
    assert memory.peak - baseline < 1.5 * 1024**3, (baseline, memory.peak)
    captured = capfd.readouterr()
    report = json.loads(result.stdout.strip().splitlines()[-1])
    for text in (result.output, captured.out, captured.err, json.dumps(report)):
        assert SECRET not in text
    for path in out.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


@pytest.mark.timeout(300)
def test_output_inside_input_lists_the_same_images_on_a_rerun(ray_cluster, models, tmp_path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for i in range(4):
        (images / f"{i}.png").write_bytes(png(48, 40, seed=i))
    out = images / "segments"
    first = segment(images, out, "--model", models["semantic"], "--preview", 4)
    assert first.exit_code == 0, first.output
    assert len(list((out / "_previews").glob("*.png"))) == 4
    again = segment(images, out, "--model", models["semantic"], "--preview", 4)
    assert again.exit_code == 0, again.output
    assert "4 images listed" in again.output and "4 already done" in again.output, again.output
    assert sorted(r["image_uri"] for r in rows_of(out)) == sorted(str(images / f"{i}.png") for i in range(4))
