"""How `m2f segment` ends when it does not simply finish: SIGTERM and SIGINT from a scheduler, a kill in
the middle of an --overwrite run, storage that cannot be listed. Each interrupted run is a real `m2f`
process with its own local Ray; the re-runs that must complete the work run in-process on the module's Ray.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest

from m2f.jobs.common.lifecycle import DUPLICATE_SIGNAL_S, Stop
from tests.fault_proxy import fault_proxy
from tests.processes import descendants, kill_tree
from tests.test_infer import png
from tests.test_segment_job import REPO, reports, rows_of, segment, write_images

START_TIMEOUT_S = 240.0


def start(source: Path, out: Path, log: Path, *args: object, env: dict[str, str] | None = None) -> subprocess.Popen:
    """`m2f segment SOURCE OUT ARGS` as its own process (its own session, as a scheduler starts it)."""
    command = [sys.executable, "-m", "m2f.cli", "segment", str(source), str(out), *map(str, args)]
    with open(log, "wb") as f:
        return subprocess.Popen(
            command,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def wait_for_part_file(process: subprocess.Popen, out: Path, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not list(out.glob("part-*.parquet")):
        assert process.poll() is None, log.read_text(errors="replace")
        assert time.monotonic() < deadline, "no part file appeared"
        time.sleep(0.05)


def alive(pids: list[int]) -> list[int]:
    """The pids that still run (zombies, already dead, are not counted)."""
    out = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            out.append(pid)
    return out


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_commits_what_is_done_reports_cancelled_and_exits_cleanly(
    ray_cluster, models, tmp_path, signum: int, code: int
) -> None:
    source, out, log = tmp_path / "in", tmp_path / "out", tmp_path / "run.log"
    uris = write_images(source, [(64 + i % 5 * 8, 48) for i in range(600)])
    process = start(
        source,
        out,
        log,
        "--model",
        models["semantic"],
        "--batch-size",
        1,
        "--flush-seconds",
        1,
        env={"M2F_PROGRESS_SECONDS": "1"},  # progress lines in a log that is not a terminal
    )
    try:
        wait_for_part_file(process, out, log)
        tree = descendants(process.pid)
        assert tree, "Ray's processes should run below the CLI"
        process.send_signal(signum)  # the CLI alone, as Kubernetes and Airflow signal it
        returncode = process.wait(timeout=20 + 30)  # the grace period, plus shutting Ray down
    finally:
        if process.poll() is None:
            kill_tree(process)
    text = log.read_text(errors="replace")
    assert returncode == code, text
    assert "Traceback" not in text and "SIGTERM received" not in text and "*** " not in text
    last = text.strip().splitlines()[-1]
    assert last.startswith(f"m2f segment: cancelled by {signal.Signals(signum).name}; kept "), last
    assert "a re-run resumes" in last
    assert any(line.startswith("m2f segment: ") and " images (" in line for line in text.splitlines())

    (report,) = reports(out)
    assert report["status"] == "cancelled" and report["exit_code"] == code
    committed = rows_of(out, "image_uri")
    assert len(committed) == report["counts"]["ok"] + report["counts"]["error"] > 0
    assert (out / "_runs" / f"{report['run_id']}.log").exists()
    deadline = time.monotonic() + 15
    while alive(tree):
        assert time.monotonic() < deadline, f"processes left behind: {alive(tree)}"
        time.sleep(0.2)

    result = segment(source, out, "--model", models["semantic"], "--batch-size", 8)
    assert result.exit_code == 0, result.output
    assert f"{len(committed)} already done" in result.output
    assert Counter(r["image_uri"] for r in rows_of(out, "image_uri, status")) == Counter(uris)
    assert {r["status"] for r in rows_of(out, "status")} == {"ok"}


def test_an_overwrite_killed_midway_loses_no_row_and_its_rerun_finishes_the_replacement(
    ray_cluster, models, tmp_path
) -> None:
    source, out, log = tmp_path / "in", tmp_path / "out", tmp_path / "run.log"
    uris = write_images(source, [(64 + i % 5 * 8, 48) for i in range(400)])
    assert segment(source, out, "--model", models["semantic"], "--batch-size", 8).exit_code == 0
    old = {r["image_uri"]: r["run_id"] for r in rows_of(out, "image_uri, run_id")}

    process = start(source, out, log, "--model", models["panoptic"], "--overwrite", "--batch-size", 1)
    earlier = set(out.glob("part-*.parquet"))
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not set(out.glob("part-*.parquet")) - earlier:  # the overwrite's first file
            assert process.poll() is None, log.read_text(errors="replace")
            assert time.monotonic() < deadline, "the overwrite run wrote nothing"
            time.sleep(0.05)
    finally:
        kill_tree(process)
    # No image lost its ok row; some have two for now (the old model's and the new one's).
    ok = Counter(r["image_uri"] for r in rows_of(out, "image_uri, status") if r["status"] == "ok")
    assert set(ok) == set(uris)
    tasks = Counter(r["task"] for r in rows_of(out, "task"))
    assert tasks["panoptic"] > 0 and tasks["semantic"] == len(uris)
    killed = next(r for r in reports(out) if r["status"] == "running")

    result = segment(source, out, "--model", models["panoptic"], "--overwrite", "--batch-size", 8)
    assert result.exit_code == 0, result.output
    assert f"resuming 1 interrupted --overwrite run(s): {killed['run_id']}" in result.output
    assert f"{tasks['panoptic']} already done" in result.output  # continued, not started over
    rows = rows_of(out, "image_uri, task, status, run_id")
    assert Counter(r["image_uri"] for r in rows) == Counter(uris)
    assert {r["task"] for r in rows} == {"panoptic"} and {r["status"] for r in rows} == {"ok"}
    assert not set(old.values()) & {r["run_id"] for r in rows}
    count = duckdb.sql(f"select count(distinct image_uri) from read_parquet('{out}/part-*.parquet')").fetchall()
    assert count == [(len(uris),)]


def test_listing_an_unreachable_endpoint_exits_3_with_one_line(ray_cluster, models, tmp_path) -> None:
    started = time.monotonic()
    result = segment(
        "s3://bucket/images/", tmp_path / "out", "--endpoint-url", "http://127.0.0.1:9", "--model", models["semantic"]
    )
    elapsed = time.monotonic() - started
    assert result.exit_code == 3, result.output
    assert elapsed < 60
    lines = result.output.strip().splitlines()
    assert len(lines) <= 3 and "Traceback" not in result.output, result.output
    assert lines[-1].startswith("m2f segment: error: cannot list s3://bucket/images/: "), lines


def test_listing_without_credentials_exits_3_and_says_how_to_give_them(models, s3_server, tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    missing = str(tmp_path / "absent")
    env.update(AWS_CONFIG_FILE=missing, AWS_SHARED_CREDENTIALS_FILE=missing, AWS_EC2_METADATA_DISABLED="true")
    env["PYTHONPATH"] = str(REPO)
    command = [sys.executable, "-m", "m2f.cli", "segment", "s3://bucket/images/", str(tmp_path / "out")]
    command += ["--endpoint-url", s3_server, "--model", models["semantic"]]
    started = time.monotonic()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert time.monotonic() - started < 60
    assert done.returncode == 3, done.stdout + done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) <= 3, done.stderr
    assert "no AWS credentials" in done.stderr and "s3://bucket/images/" in done.stderr
    assert not done.stdout.strip()


def test_transient_storage_faults_at_15_percent_leave_every_image_ok(ray_cluster, models, s3_server, s3_bucket, s3_fs):
    """Reads, listings and part-file writes through a proxy that fails 15 % of requests (5xx, dropped
    connections, truncated bodies): m2f's retries, on top of botocore's, finish every image."""
    uris = []
    for i in range(40):
        key = f"{s3_bucket}/in/img{i:02d}.png"
        s3_fs.pipe_file(key, png(48 + i % 3 * 8, 40, seed=i))
        uris.append(f"s3://{key}")
    with fault_proxy(s3_server, rate=0.15, seed=7) as proxy:
        result = segment(
            f"s3://{s3_bucket}/in/",
            f"s3://{s3_bucket}/out/",
            "--endpoint-url",
            proxy.url,
            "--model",
            models["semantic"],
            "--batch-size",
            4,
        )
        injected = dict(proxy.faults)
    assert result.exit_code == 0, result.output
    assert sum(injected.values()) >= 10 and {"500", "503", "drop", "truncate"} <= set(injected), injected
    s3_fs.invalidate_cache()
    rows = []
    for path in s3_fs.glob(f"{s3_bucket}/out/part-*.parquet"):
        with s3_fs.open(path, "rb") as f:
            rows += pq.read_table(f, columns=["image_uri", "status"]).to_pylist()
    assert Counter(r["image_uri"] for r in rows) == Counter(uris)
    assert {r["status"] for r in rows} == {"ok"}


def test_a_part_file_that_cannot_be_written_ends_the_run_with_exit_3_and_one_line(
    ray_cluster, models, s3_server, s3_bucket, s3_fs
):
    """Every write of a part file answered 503, past m2f's retries: the run fails truthfully (exit 3, the
    cause in one line, a report), instead of a traceback or a silent loss."""
    for i in range(6):
        s3_fs.pipe_file(f"{s3_bucket}/in/img{i}.png", png(48, 40, seed=i))

    def part_file_put(method: str, path: str) -> bool:
        return method == "PUT" and "/out/part-" in path

    output = f"s3://{s3_bucket}/out/"
    with fault_proxy(s3_server, always_fail=part_file_put) as proxy:
        result = segment(f"s3://{s3_bucket}/in/", output, "--endpoint-url", proxy.url, "--model", models["semantic"])
        refused = proxy.faults["always"]
    assert result.exit_code == 3, result.output
    assert refused >= 5  # m2f's attempts, each after botocore's own
    last = result.output.strip().splitlines()[-1]
    assert last.startswith(f"m2f segment: error: cannot write to {output}"), last
    assert "Traceback" not in result.output and "the job failed" not in last
    s3_fs.invalidate_cache()
    (path,) = s3_fs.glob(f"{s3_bucket}/out/_runs/*.json")
    report = json.loads(s3_fs.cat_file(path))
    assert report["status"] == "failed" and report["exit_code"] == 3
    assert not s3_fs.glob(f"{s3_bucket}/out/part-*")


SHUTDOWN_UNDER_SIGTERM = """
import os, signal, subprocess, sys
import ray
from m2f.jobs.common.cluster import ray_session
from m2f.jobs.common.lifecycle import Stop, handling_signals

stop = Stop()
stop.raise_now = False  # as while results flow: the handler only records the request
with handling_signals(stop):
    with ray_session(None, stop):
        ray.get(ray.remote(lambda: 1).remote())
        pid = os.getpid()
        storm = "import os, signal, time\\nfor _ in range(60):\\n    time.sleep(0.05)\\n"
        storm += f"    os.kill({pid}, signal.SIGTERM)"
        killer = subprocess.Popen([sys.executable, "-c", storm])
    killer.wait()  # SIGTERMs went on arriving through ray.shutdown() and after it
print("handled", stop.signal_name())
"""


def test_sigterm_while_ray_shuts_down_still_reaches_the_jobs_handler() -> None:
    """The window a run ends in: Ray's shutdown used to reset SIGTERM to its default action, so a scheduler's
    SIGTERM then killed the driver mid-shutdown (exit -15, Ray's processes left, the report 'running')."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_DISABLE_FAILURE_SIGNAL_HANDLER"}
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run(
        [sys.executable, "-c", SHUTDOWN_UNDER_SIGTERM], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert done.stdout.strip().endswith("handled SIGTERM")
    assert "SIGTERM received" not in done.stderr


def test_the_same_signal_twice_at_once_is_one_request_a_later_one_ends_the_grace() -> None:
    """`timeout` (and a scheduler signalling a process and its group) delivers SIGTERM twice within
    microseconds: that must not cut the grace period short, as a deliberate second signal does."""
    stop = Stop(grace_seconds=20)
    stop.raise_now = False
    stop._handle(signal.SIGTERM, None)
    stop._handle(signal.SIGTERM, None)  # the duplicate
    assert stop.exit_code == 143 and stop.time_left() > 15
    stop._handle(signal.SIGINT, None)  # another signal: the user insists
    assert stop.time_left() == 0 and stop.exit_code == 143
    again = Stop(grace_seconds=20)
    again.raise_now = False
    again._handle(signal.SIGTERM, None)
    again._first_signal -= DUPLICATE_SIGNAL_S + 0.1  # the same signal, later
    again._handle(signal.SIGTERM, None)
    assert again.time_left() == 0
