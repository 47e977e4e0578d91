"""`m2f segment` on a multi-node Ray that loses the worker node running its model actor, mid-run.

The cluster is `ray.cluster_utils.Cluster`: several raylets on this one machine, started by the test
process without connecting it to them (no `ray.init` here). The head node has no CPU, so the driver is
the only thing on it; everything that needs a CPU (the model actor, the prepare tasks) runs on the one
worker node. Removing that node (`Cluster.remove_node`: its raylet stops and the GCS marks the node dead
at once, as when an autoscaler or a spot market takes a machine away) leaves no CPU at all: without a
replacement nothing can finish, and the run must notice it and end by itself (exit 3, "stalled"); with
a replacement the actor restarts there, the lost work is redone, and the run completes. Either way a
re-run leaves exactly one ok row per image.

`m2f` runs as its own process (`--ray-address` joins the cluster). Ray writes the address of a cluster
started this way to `$RAY_TMPDIR/ray/ray_current_cluster`, where every `ray.init()` on the machine would
find and join it: each test gives Ray a private RAY_TMPDIR, which also tells which processes are ours.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray
from ray.cluster_utils import Cluster

from m2f.pipeline.schema import OUTPUT_SCHEMA
from tests.processes import kill_tree
from tests.test_segment_job import REPO, reports, rows_of, segment, write_images

IMAGES = 1500  # enough that the model is still at work when the first part file lands (600 once was not)
STALL_S = 30  # --stall-timeout without a replacement; it counts the start-up too (first batch: 10-20 s here)
PATIENT_STALL_S = 60  # with one: room for the node to join and the model actor to restart there
GRACE_S = 10  # --grace-seconds
MARGIN_S = 30  # committing, the report, shutting Ray down, on 2 busy cores
START_TIMEOUT_S = 240.0
REPLACEMENT_DELAY_S = 3.0
SEGMENTER = "Segmenter"  # in the actor class name Ray Data gives the model's actors


# --- the cluster and its processes -------------------------------------------------------------------


@pytest.fixture
def ray_tmp(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A private RAY_TMPDIR for the test (its processes inherit it); afterwards, no Ray process of ours."""
    assert not ray.is_initialized(), "the test process must not be connected to a Ray of its own here"
    folder = Path(tempfile.mkdtemp(prefix="m2f-ray-", dir="/tmp"))  # short: Ray's socket paths live below
    monkeypatch.setenv("RAY_TMPDIR", str(folder))
    try:
        yield folder
    finally:
        deadline = time.monotonic() + 20
        while ray_processes(folder) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = ray_processes(folder)
        for pid in left:  # ours by their command line: end them, then fail
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(folder, ignore_errors=True)
    assert not left, f"Ray processes left behind: {left}"


def ray_processes(folder: Path) -> dict[int, str]:
    """Running processes (not zombies) whose command line names `folder`: raylets, GCS, workers, agents."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if str(folder) in command and state != "Z":
            found[int(entry.name)] = command[:160]
    return found


@contextlib.contextmanager
def multi_node_ray() -> Iterator[Cluster]:
    """A head node without CPUs (the driver joins it); the caller adds the worker nodes."""
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    try:
        yield cluster
    finally:
        cluster.shutdown()
        cluster.global_state.disconnect()


def model_actors(cluster: Cluster) -> list[dict]:
    """The model actors the GCS knows of (alive or not), as `GlobalState.actor_table` describes them."""
    return [a for a in cluster.global_state.actor_table(None).values() if SEGMENTER in a["ActorClassName"]]


def node_of_the_model(cluster: Cluster) -> str:
    deadline = time.monotonic() + 30
    while True:
        alive = [a for a in model_actors(cluster) if a["State"] == "ALIVE"]
        if len(alive) == 1:
            return alive[0]["Address"]["NodeID"]
        assert time.monotonic() < deadline, f"no single live model actor: {model_actors(cluster)}"
        time.sleep(0.2)


def drivers_of(cluster: Cluster, process: subprocess.Popen) -> list[dict]:
    """The Ray jobs `process` started on the cluster (one per `ray.init`), once all of them have ended."""
    deadline = time.monotonic() + 30
    while True:
        jobs = [job for job in cluster.global_state.job_table() if job["DriverPid"] == process.pid]
        if all(job["IsDead"] for job in jobs) or time.monotonic() > deadline:
            return jobs
        time.sleep(0.2)


# --- the job ------------------------------------------------------------------------------------------


def start(source: Path, out: Path, logs: Path, *args: object) -> subprocess.Popen:
    """`m2f segment SOURCE OUT ARGS` as its own process; stdout and stderr to logs/out.txt, logs/err.txt."""
    logs.mkdir(exist_ok=True)
    command = [sys.executable, "-m", "m2f.cli", "segment", str(source), str(out), *map(str, args)]
    with open(logs / "out.txt", "wb") as stdout, open(logs / "err.txt", "wb") as stderr:
        return subprocess.Popen(
            command,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stdout=stdout,
            stderr=stderr,
            start_new_session=True,
        )


@contextlib.contextmanager
def running(source: Path, out: Path, logs: Path, *args: object) -> Iterator[subprocess.Popen]:
    """`start`, and on leaving, the process tree killed if the test left it running (a failed assertion)."""
    process = start(source, out, logs, *args)
    try:
        yield process
    finally:
        if process.poll() is None:
            kill_tree(process)


def job_args(models: dict[str, str], *, stall_timeout: float) -> list[object]:
    return [
        "--model",
        models["semantic"],
        "--batch-size",
        1,
        "--flush-seconds",
        1,
        "--actors",
        1,
        "--cpus-per-actor",
        1,
        "--grace-seconds",
        GRACE_S,
        "--stall-timeout",
        stall_timeout,
    ]


def log_text(logs: Path) -> str:
    return "\n".join(
        f"--- {name} ---\n{(logs / name).read_text(errors='replace')}"
        for name in ("out.txt", "err.txt")
        if (logs / name).exists()
    )


def wait_for_part_file(process: subprocess.Popen, out: Path, logs: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not list(out.glob("part-*.parquet")):
        assert process.poll() is None, log_text(logs)
        assert time.monotonic() < deadline, "no part file appeared\n" + log_text(logs)
        time.sleep(0.05)


def wait_for_exit(process: subprocess.Popen, timeout: float, logs: Path) -> int:
    """The exit code; a process still running after `timeout` is killed and fails the test, with its log."""
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(process)
        pytest.fail(f"m2f segment had not ended after {timeout:.0f} s\n{log_text(logs)}")


def images(folder: Path) -> list[str]:
    return write_images(folder, [(64 + i % 5 * 8, 48) for i in range(IMAGES)])


def assert_one_ok_row_per_image(out: Path, uris: list[str]) -> None:
    rows = rows_of(out, "image_uri, status")
    assert Counter(r["image_uri"] for r in rows) == Counter(uris)
    assert {r["status"] for r in rows} == {"ok"}


def assert_completed_after_the_loss(
    returncode: int, logs: Path, drivers: list[dict], at_the_loss: int, out: Path, uris: list[str]
) -> tuple[dict, str]:
    """A run that lost a node midway (with `at_the_loss` rows committed then) and still completed: exit 0 with
    a clean log, one driver, a "completed" report counting every image ok, and one ok row per image.
    Returns the report and the log's text."""
    text = log_text(logs)
    assert returncode == 0, text
    assert "Traceback" not in text, text
    assert len(drivers) == 1, drivers
    assert at_the_loss < len(uris)
    (report,) = reports(out)
    assert report["status"] == "completed" and report["exit_code"] == 0
    assert report["counts"]["ok"] == len(uris) and report["counts"]["error"] == 0
    assert_one_ok_row_per_image(out, uris)
    return report, text


# --- the tests ----------------------------------------------------------------------------------------


def test_a_lost_node_without_a_replacement_stalls_with_exit_3_and_a_rerun_finishes(models, ray_tmp, tmp_path):
    source, out, logs = tmp_path / "in", tmp_path / "out", tmp_path / "logs"
    uris = images(source)
    with multi_node_ray() as cluster:
        worker = cluster.add_node(num_cpus=2)
        with running(
            source, out, logs, *job_args(models, stall_timeout=STALL_S), "--ray-address", cluster.address
        ) as process:
            wait_for_part_file(process, out, logs)
            assert node_of_the_model(cluster) == worker.node_id
            cluster.remove_node(worker)
            # It must end by itself, the head node still up: no answer from Ray is no excuse to wait on.
            returncode = wait_for_exit(process, STALL_S + GRACE_S + MARGIN_S, logs)
            drivers = drivers_of(cluster, process)
    text = log_text(logs)
    assert returncode == 3, text

    last = (logs / "err.txt").read_text(errors="replace").strip().splitlines()[-1]
    stalled = re.match(r"m2f segment: stopped: no image finished for (\d+) s: (.*)$", last)
    assert stalled, text
    assert int(stalled[1]) >= STALL_S
    assert "a node may have been lost" in stalled[2] and "0 of 0 CPUs free" in stalled[2], last
    kept = re.search(
        r"; kept ([\d,]+) rows committed in (\d+) part file\(s\), ([\d,]+) image\(s\) left; a re-run", last
    )
    assert kept, last

    (report,) = reports(out)
    assert report["status"] == "stalled" and report["exit_code"] == 3
    assert any("a node may have been lost" in warning for warning in report["warnings"])
    parts = sorted(out.glob("part-*.parquet"))
    tables = [pq.read_table(p) for p in parts]  # every committed file reads back whole
    assert all(t.schema.equals(OUTPUT_SCHEMA) for t in tables)
    committed = sum(t.num_rows for t in tables)
    assert 0 < committed < len(uris)
    assert (committed, len(parts), len(uris) - committed) == tuple(int(n.replace(",", "")) for n in kept.groups())
    assert report["counts"]["ok"] + report["counts"]["error"] == committed
    assert len({r["image_uri"] for r in rows_of(out, "image_uri")}) == committed

    # The re-run: a local Ray of its own (the cluster is gone), resuming from what the stalled run kept.
    rerun = start(source, out, tmp_path / "rerun", *job_args(models, stall_timeout=120))
    returncode = wait_for_exit(rerun, 240, tmp_path / "rerun")
    assert returncode == 0, log_text(tmp_path / "rerun")
    assert f"{committed} already done, {len(uris) - committed} to process" in log_text(tmp_path / "rerun")
    assert_one_ok_row_per_image(out, uris)
    assert [r["status"] for r in reports(out)].count("completed") == 1

    # Once the stalled run has shut its Ray down, nothing of it may join the cluster (or start a Ray) again.
    assert len(drivers) == 1, drivers
    assert "Traceback" not in text, text


def test_a_lost_node_replaced_within_the_stall_timeout_completes_with_one_row_per_image(models, ray_tmp, tmp_path):
    source, out, logs = tmp_path / "in", tmp_path / "out", tmp_path / "logs"
    uris = images(source)
    with multi_node_ray() as cluster:
        worker = cluster.add_node(num_cpus=2)
        args = job_args(models, stall_timeout=PATIENT_STALL_S)
        with running(source, out, logs, *args, "--ray-address", cluster.address) as process:
            wait_for_part_file(process, out, logs)
            assert node_of_the_model(cluster) == worker.node_id
            cluster.remove_node(worker)
            at_the_loss = len(rows_of(out, "image_uri"))
            time.sleep(REPLACEMENT_DELAY_S)
            assert process.poll() is None, "the run ended before the replacement node joined\n" + log_text(logs)
            replacement = cluster.add_node(num_cpus=2)
            returncode = wait_for_exit(process, PATIENT_STALL_S + GRACE_S + MARGIN_S, logs)
            actors = model_actors(cluster)
            drivers = drivers_of(cluster, process)
    assert_completed_after_the_loss(returncode, logs, drivers, at_the_loss, out, uris)
    # The loss hit the model: its one actor was restarted, on the replacement node.
    assert len(actors) == 1 and actors[0]["NumRestarts"] >= 1, actors
    assert actors[0]["Address"]["NodeID"] == replacement.node_id, actors

    # A re-run finds everything done: nothing to process, so no Ray starts in this process.
    result = segment(source, out, "--model", models["semantic"])
    assert result.exit_code == 0, result.output
    assert f"{len(uris)} already done, 0 to process" in result.output
    assert not ray.is_initialized()
    assert_one_ok_row_per_image(out, uris)


def test_a_lost_node_that_leaves_too_few_cpus_for_every_actor_and_the_prepare_stage_goes_on_with_fewer(
    models, ray_tmp, tmp_path
):
    """Two model actors on a 3-CPU cluster, then a 1-CPU node goes: the 2 CPUs left could hold both actors
    (Ray restarts a lost one wherever a CPU is free) and nothing for prepare_images, which feeds them, or one
    actor and prepare while the other waits for a CPU with tasks in hand. Either way nothing finishes; the run
    notices, commits what it has, and goes on with the one actor the cluster holds, without a new node."""
    source, out, logs = tmp_path / "in", tmp_path / "out", tmp_path / "logs"
    uris = images(source)
    with multi_node_ray() as cluster:
        cluster.add_node(num_cpus=2)
        small = cluster.add_node(num_cpus=1)
        args = [*job_args(models, stall_timeout=PATIENT_STALL_S), "--actors", 2]
        with running(source, out, logs, *args, "--ray-address", cluster.address) as process:
            wait_for_part_file(process, out, logs)
            cluster.remove_node(small)
            at_the_loss = len(rows_of(out, "image_uri"))
            returncode = wait_for_exit(process, 240, logs)
            drivers = drivers_of(cluster, process)
    report, text = assert_completed_after_the_loss(returncode, logs, drivers, at_the_loss, out, uris)
    # Whether the loss starved the pipeline depends on where Ray had put what; when it did, the run said so.
    replanned = [w for w in report["warnings"] if "no longer holds 2 model actor(s)" in w]
    assert all("going on with 1 actor(s)" in w for w in replanned), replanned
    assert len(replanned) == text.count("no longer holds 2 model actor(s)") <= 1, text
    assert not list((out / "_runs").glob("*-work")), "the work manifests outlive the run"
