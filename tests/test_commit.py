"""The driver's part-file writer (segment/commit.py), progress lines (common/progress.py) and the ledger's rules for
replacing rows (segment/resume.py: supersede, interrupted overwrites), on real files."""

from __future__ import annotations

import io
import json
import os
import select
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from m2f.jobs.common.progress import Progress, format_duration
from m2f.jobs.segment.commit import PartWriter
from m2f.jobs.segment.resume import image_key, interrupted_overwrites, plan_work, remaining_work, scan_output, supersede
from m2f.pipeline.schema import OUTPUT_SCHEMA, error_row, ok_row, rows_to_table
from m2f.pipeline.storage import open_fs

STATS = {"segment_count": 0, "class_fractions": [], "mean_score": None}


def rows(names: list[str], *, run_id: str = "r1", model: str = "tiny@0", status: str = "ok"):
    common = {"task": "semantic", "model": model, "run_id": run_id}
    if status == "ok":
        made = [
            ok_row(f"/x/{n}.png", width=1, height=1, segments=[], stats=STATS, inference_ms=2.0, **common)
            for n in names
        ]
    else:
        made = [error_row(f"/x/{n}.png", "not an image: text", **common) for n in names]
    return rows_to_table(made)


def parts(folder: Path) -> list[Path]:
    return sorted(folder.glob("part-*.parquet"))


def uris_in(folder: Path) -> list[str]:
    return sorted(u for p in parts(folder) for u in pq.read_table(p)["image_uri"].to_pylist())


def test_a_file_is_committed_for_every_rows_per_file_rows_and_the_rest_at_close(tmp_path) -> None:
    fs, root = open_fs(str(tmp_path), {})
    commits = []
    writer = PartWriter(fs, root, "run", rows_per_file=4, flush_seconds=3600, on_commit=commits.append)
    writer.add(rows(list("abc")))
    assert writer.buffered == 3
    writer.add(rows(list("defghij")))  # 10 rows: two files of 4 go, 2 rows wait
    deadline = time.monotonic() + 10
    while len(parts(tmp_path)) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert writer.buffered == 2 and uris_in(tmp_path) == [f"/x/{n}.png" for n in "abcdefgh"]
    assert writer.close(timeout=10)
    assert [p.name for p in parts(tmp_path)] == [f"part-run-00000{i}.parquet" for i in range(3)]
    assert [pq.read_metadata(p).num_rows for p in parts(tmp_path)] == [4, 4, 2]
    assert pq.read_schema(parts(tmp_path)[0]).equals(OUTPUT_SCHEMA)
    assert [(c.ok, c.error) for c in commits] == [(4, 0), (4, 0), (2, 0)]
    assert sorted(k for c in commits for k in c.keys.tolist()) == sorted(image_key(f"/x/{n}.png") for n in "abcdefghij")
    assert not list(tmp_path.glob(".*"))  # no temporaries left


def test_drain_commits_everything_and_the_writer_takes_more(tmp_path) -> None:
    fs, root = open_fs(str(tmp_path), {})
    writer = PartWriter(fs, root, "run", rows_per_file=4, flush_seconds=3600)
    writer.add(rows(list("abcde")))
    assert writer.drain(timeout=10)
    assert writer.uncommitted == 0 and [pq.read_metadata(p).num_rows for p in parts(tmp_path)] == [4, 1]
    writer.add(rows(list("fg")))  # still open: a later drain or close commits these too
    assert writer.close(timeout=10)
    assert uris_in(tmp_path) == [f"/x/{n}.png" for n in "abcdefg"]


def test_remaining_work_leaves_out_what_was_committed_and_replaces_the_plan_files(tmp_path) -> None:
    from m2f.pipeline.sources import list_inputs

    uris = [f"/x/{i:04d}.png" for i in range(10)]
    (tmp_path / "in.txt").write_text("\n".join(uris) + "\n")
    fs, root = open_fs(str(tmp_path / "out"), {})
    folder = f"{root}/_runs/r-work"
    fs.makedirs(folder, exist_ok=True)
    listing = list_inputs(str(tmp_path / "in.txt"), {})
    plan = plan_work(listing, np.array(sorted(image_key(u) for u in uris[:2]), np.uint64), fs=fs, folder=folder)
    assert len(plan.pending) == 8
    done = np.array(sorted(image_key(u) for u in uris[2:5] + uris[9:]), np.uint64)
    rest = remaining_work(plan, done, fs=fs, folder=folder, round=1)
    left = [u for f in rest.files for u in pq.read_table(f)["image_uri"].to_pylist()]
    assert left == uris[5:9]
    assert rest.pending.tolist() == sorted(image_key(u) for u in uris[5:9])
    assert (rest.listed, rest.already_done) == (plan.listed, plan.already_done) == (10, 2)
    assert sorted(fs.ls(folder)) == sorted(rest.files) and all("work-r1-" in f for f in rest.files)
    assert (
        remaining_work(
            rest, np.array(sorted(image_key(u) for u in uris), np.uint64), fs=fs, folder=folder, round=2
        ).files
        == []
    )


def test_rows_that_waited_flush_seconds_are_committed_without_more_rows(tmp_path) -> None:
    fs, root = open_fs(str(tmp_path), {})
    commits = []
    writer = PartWriter(fs, root, "run", rows_per_file=512, flush_seconds=0.3, on_commit=commits.append)
    writer.add(rows(["a"], status="error"))
    assert not writer.flush_if_due() and not parts(tmp_path)
    time.sleep(0.35)
    assert writer.flush_if_due()
    assert not writer.flush_if_due()  # nothing left to commit
    assert writer.close(timeout=10)
    assert uris_in(tmp_path) == ["/x/a.png"]
    assert commits[0].error == 1 and commits[0].error_reasons == {"not an image": 1}


def test_a_write_that_fails_is_raised_and_earlier_files_stay(tmp_path) -> None:
    fs, root = open_fs(str(tmp_path), {})
    writer = PartWriter(fs, root, "run", rows_per_file=2, flush_seconds=3600)
    writer.add(rows(list("ab")))
    assert writer.close(timeout=10)
    (tmp_path / "blocked").write_text("a file where the next part's folder would be")
    writer = PartWriter(fs, str(tmp_path / "blocked"), "run2", rows_per_file=1, flush_seconds=3600)
    writer.add(rows(["c"]))
    with pytest.raises(OSError):
        writer.close(timeout=10)
    assert uris_in(tmp_path) == ["/x/a.png", "/x/b.png"]


def test_close_gives_up_at_its_timeout_while_the_upload_thread_is_busy(tmp_path) -> None:
    fs, root = open_fs(str(tmp_path), {})
    release = threading.Event()
    writer = PartWriter(fs, root, "run", rows_per_file=1, flush_seconds=3600, on_commit=lambda c: release.wait(30))
    writer.add(rows(["a"]))  # the upload thread writes it, then waits in on_commit
    started = time.monotonic()
    assert writer.close(timeout=0.5) is False
    assert time.monotonic() - started < 5
    release.set()
    assert writer.close(timeout=10) is True
    assert uris_in(tmp_path) == ["/x/a.png"]


def test_a_close_out_of_time_keeps_its_rows_for_the_next_call(tmp_path) -> None:
    """close(timeout=0), the grace period spent: the buffered rows still take a free place in the queue;
    with none free they stay buffered and counted, never dropped (they were, before)."""
    fs, root = open_fs(str(tmp_path), {})
    release = threading.Event()
    writer = PartWriter(fs, root, "run", rows_per_file=100, flush_seconds=3600, max_queued=1)
    writer.on_commit = lambda c: release.wait(30)
    writer.add(rows(["a"]))
    assert writer.close(timeout=0) is False  # queued, then written: the upload thread waits in on_commit
    deadline = time.monotonic() + 10
    while not (tmp_path / "part-run-000000.parquet").exists():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    writer.add(rows(["b"]))
    assert writer.close(timeout=0) is False  # the one free place in the queue
    writer.add(rows(["c"]))
    assert writer.close(timeout=0) is False  # the queue is full: back to the buffer
    assert (writer.buffered, writer.uncommitted) == (1, 3)
    release.set()
    assert writer.close(timeout=10) is True and writer.uncommitted == 0
    assert uris_in(tmp_path) == ["/x/a.png", "/x/b.png", "/x/c.png"]


def test_progress_lines_in_logs_and_a_bar_on_terminals() -> None:
    log = io.StringIO()
    progress = Progress(1000, bar=False, interval=0.0, stream=log)
    progress.tick()
    assert log.getvalue().strip() == "m2f segment: 0/1,000 images (0 errors), waiting for the first results"
    progress.update(10, 1)
    progress._first -= 2.0  # two seconds in
    progress.update(10)
    progress.tick()
    last = log.getvalue().strip().splitlines()[-1]
    assert last.startswith("m2f segment: 20/1,000 images (1 errors), ") and " images/s, ETA " in last
    quiet = Progress(10, bar=False, interval=3600, stream=log)
    before = log.getvalue()
    quiet.tick()
    assert log.getvalue() == before  # not yet due

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    screen = Terminal()
    bar = Progress(5, interval=0.0, stream=screen)
    bar.update(5)
    bar.tick()  # no log lines on a terminal: the bar is the progress
    bar.close()
    assert "5/5" in screen.getvalue() and "m2f segment: 5/5 images" not in screen.getvalue()
    assert [format_duration(s) for s in (42, 403, 24180)] == ["42s", "6m43s", "6h43m"]


def test_the_bar_draws_on_a_pseudo_terminal_that_has_no_size() -> None:
    """What a CI runner or `script` gives: a real pty reporting 0 x 0 (tqdm alone draws nothing there)."""
    master, slave = os.openpty()
    try:
        with os.fdopen(slave, "w", closefd=False) as screen:
            assert screen.isatty() and os.get_terminal_size(slave) == (0, 0)
            bar = Progress(30, stream=screen)
            bar.update(30, 2)
            bar.close()
        drawn = b""
        while select.select([master], [], [], 0.2)[0]:
            drawn += os.read(master, 65536)
    finally:
        os.close(master)
        os.close(slave)
    assert b"30/30" in drawn and b"errors=2" in drawn


def test_supersede_removes_earlier_rows_only_of_images_redone(tmp_path) -> None:
    pq.write_table(rows(["a", "b"], run_id="old"), tmp_path / "part-old-1.parquet")
    pq.write_table(rows(["c"], run_id="old", status="error"), tmp_path / "part-old-2.parquet")
    pq.write_table(rows(["d"], run_id="resumed"), tmp_path / "part-resumed-1.parquet")
    pq.write_table(rows(["e"], run_id="resumed", status="error"), tmp_path / "part-resumed-2.parquet")
    fs, root = open_fs(str(tmp_path), {})
    existing = scan_output(fs, root, model="tiny@0", task="semantic", resumed=frozenset({"resumed"}))
    assert existing.resumed_keys.tolist() == [image_key("/x/d.png")]
    # This run committed new rows for a, c and e; d's row from the resumed run counts as new too.
    new = np.sort(np.array([image_key(f"/x/{n}.png") for n in "aced"], np.uint64))
    assert supersede(fs, existing.parts, new, frozenset({"resumed"})) == 3
    assert uris_in(tmp_path) == ["/x/b.png", "/x/d.png"]  # b untouched; d kept (its resumed ok row)
    assert not (tmp_path / "part-old-2.parquet").exists() and not (tmp_path / "part-resumed-2.parquet").exists()


def test_an_interrupted_overwrite_run_is_continued_only_by_the_same_model_and_task(tmp_path) -> None:
    runs = tmp_path / "_runs"
    runs.mkdir()

    def report(run_id: str, status: str, overwrite: bool = True, label: str = "b@1") -> None:
        body = {"run_id": run_id, "status": status, "config": {"overwrite": overwrite}}
        body["model"] = {"label": label, "task": "semantic"}
        (runs / f"{run_id}.json").write_text(json.dumps(body))

    fs, root = open_fs(str(tmp_path), {})
    assert interrupted_overwrites(fs, root, model="b@1", task="semantic") == frozenset()
    report("20260101T000000Z-aaaaaa", "completed")
    report("20260102T000000Z-bbbbbb", "running")  # killed
    report("20260103T000000Z-cccccc", "completed", overwrite=False)  # a plain run in between
    report("20260104T000000Z-dddddd", "cancelled")
    assert interrupted_overwrites(fs, root, model="b@1", task="semantic") == {
        "20260102T000000Z-bbbbbb",
        "20260104T000000Z-dddddd",
    }
    assert interrupted_overwrites(fs, root, model="c@2", task="semantic") == frozenset()
    assert interrupted_overwrites(fs, root, model="b@1", task="panoptic") == frozenset()
    report("20260105T000000Z-eeeeee", "completed")  # the overwrite finished: a new one starts over
    assert interrupted_overwrites(fs, root, model="b@1", task="semantic") == frozenset()
