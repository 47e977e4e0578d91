"""One run per OUTPUT: the lease (jobs/segment/lease.py) on local files and on the moto S3 server, then `m2f segment`
end to end — refused while another run holds OUTPUT, taking over from a SIGKILLed run, two runs at once.

Real parts only: the local filesystem, moto on 127.0.0.1, real processes (a stalled holder is a process
stopped with SIGSTOP, a crashed one is SIGKILLed with its tree).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from fsspec import AbstractFileSystem

from m2f.jobs.segment.lease import EXIT_BUSY, Busy, Lease, process_id
from m2f.pipeline.storage import open_fs, storage_options
from tests.processes import kill_tree
from tests.test_lifecycle import start, wait_for_part_file
from tests.test_segment_job import REPO, rows_of, segment, write_images

RACES = 20
RACERS = 4

# A holder of the lease in a process of its own, until it learns it has lost the lease.
HOLDER = """
import sys, time
from m2f.jobs.segment.lease import Lease
from m2f.pipeline.storage import open_fs, storage_options
uri, endpoint = sys.argv[1], sys.argv[2]
fs, root = open_fs(uri, storage_options(uri, endpoint_url=endpoint or None))
lease = Lease.acquire(fs, root, "stopped-run")
print("held", flush=True)
while not lease.lost:
    time.sleep(0.05)
print(lease.lost, flush=True)
lease.release()
"""


@pytest.fixture(params=["local", "s3"])
def output(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[AbstractFileSystem, str, str]:
    """(fs, root, uri) of an OUTPUT that does not exist yet: a local folder, or a prefix on moto."""
    if request.param == "local":
        uri, endpoint = str(tmp_path / "out"), None
    else:
        uri, endpoint = f"s3://{request.getfixturevalue('s3_bucket')}/out", request.getfixturevalue("s3_server")
    fs, root = open_fs(uri, storage_options(uri, endpoint_url=endpoint))
    return fs, root, uri


def lease_file(root: str) -> str:
    return f"{root}/_runs/_lease.json"


def read_lease(fs: AbstractFileSystem, root: str) -> dict[str, Any] | None:
    fs.invalidate_cache()
    return json.loads(fs.cat_file(lease_file(root))) if fs.exists(lease_file(root)) else None


def write_lease(fs: AbstractFileSystem, root: str, *, age_s: float = 0.0, **fields: Any) -> dict[str, Any]:
    """A lease as another run would have left it; `age_s`: how old its heartbeat is."""
    beat = datetime.fromtimestamp(time.time() - age_s, UTC).isoformat(timespec="milliseconds")
    record = {"run_id": "other-run", "host": "elsewhere", "pid": 1, "started": beat, "heartbeat": beat}
    record |= {"stale_after_s": 90.0, "process": ""} | fields
    fs.makedirs(f"{root}/_runs", exist_ok=True)
    fs.pipe_file(lease_file(root), json.dumps(record).encode())
    return record


# --- the lease ------------------------------------------------------------------------------------


def test_a_lease_names_its_holder_keeps_its_heartbeat_and_is_gone_after_release(output, monkeypatch) -> None:
    fs, root, _ = output
    monkeypatch.setenv("M2F_LEASE_STALE_S", "1.2")  # a heartbeat every 0.2 s
    lease = Lease.acquire(fs, root, "run-a")
    first = read_lease(fs, root)
    assert first["run_id"] == "run-a" and first["pid"] == os.getpid() and first["host"] == socket.gethostname()
    assert first["stale_after_s"] == 1.2 and first["started"]
    time.sleep(0.8)
    later = read_lease(fs, root)
    assert datetime.fromisoformat(later["heartbeat"]) > datetime.fromisoformat(first["heartbeat"])
    assert lease.lost is None
    lease.release()
    assert read_lease(fs, root) is None
    lease.release()  # twice is harmless


def test_a_second_run_is_refused_while_the_lease_is_live_and_told_who_holds_it(output) -> None:
    fs, root, uri = output
    lease = Lease.acquire(fs, root, "run-a")
    before = read_lease(fs, root)
    with pytest.raises(Busy) as refused:
        Lease.acquire(fs, root, "run-b")
    assert refused.value.exit_code == EXIT_BUSY == 75
    message = str(refused.value)
    assert "run-a" in message and socket.gethostname() in message and f"pid {os.getpid()}" in message
    assert "heartbeat 0 s ago" in message and uri.rstrip("/") in message
    assert refused.value.holder["run_id"] == "run-a" and refused.value.holder["heartbeat_age_s"] < 5
    assert read_lease(fs, root) == before  # the refused run wrote nothing
    lease.release()


def test_a_stale_lease_is_taken_over_and_a_fresh_one_is_not(output) -> None:
    fs, root, _ = output
    write_lease(fs, root, age_s=600)  # a run that died ten minutes ago, elsewhere
    lease = Lease.acquire(fs, root, "run-a")
    assert read_lease(fs, root)["run_id"] == "run-a"
    lease.release()

    write_lease(fs, root, stale_after_s=1.0)  # alive: its heartbeat is fresh, by what it promised
    with pytest.raises(Busy, match="other-run on host elsewhere"):
        Lease.acquire(fs, root, "run-b")
    time.sleep(1.3)
    lease = Lease.acquire(fs, root, "run-b")
    assert read_lease(fs, root)["run_id"] == "run-b"
    lease.release()


def test_a_dead_holder_on_this_machine_is_taken_over_at_once(output) -> None:
    fs, root, _ = output
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        write_lease(fs, root, host=socket.gethostname(), pid=sleeper.pid, process=process_id(sleeper.pid))
        with pytest.raises(Busy):
            Lease.acquire(fs, root, "run-a")
    finally:
        sleeper.kill()
        sleeper.wait()
    lease = Lease.acquire(fs, root, "run-a")  # its heartbeat is fresh, but its process is gone
    assert read_lease(fs, root)["run_id"] == "run-a"
    lease.release()


def race(fs: AbstractFileSystem, root: str) -> tuple[list[tuple[str, Lease]], list[str], list[Exception]]:
    """RACERS threads call `Lease.acquire` at once: (winners, refused, errors)."""
    winners, refused, errors = [], [], []
    barrier = threading.Barrier(RACERS)

    def racer(name: str) -> None:
        barrier.wait()
        try:
            winners.append((name, Lease.acquire(fs, root, name)))
        except Busy:
            refused.append(name)
        except Exception as e:  # reported by the caller
            errors.append(e)

    threads = [threading.Thread(target=racer, args=(f"racer-{i}",)) for i in range(RACERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return winners, refused, errors


@pytest.mark.parametrize("taken", ["free", "stale"])
def test_of_runs_racing_for_one_lease_exactly_one_wins(output, taken: str) -> None:
    fs, base, _ = output
    for attempt in range(RACES):
        root = f"{base}/race{attempt}"
        if taken == "stale":
            write_lease(fs, root, age_s=600)
        winners, refused, errors = race(fs, root)
        assert not errors and len(winners) == 1 and len(refused) == RACERS - 1, (attempt, winners, refused, errors)
        (name, lease), record = winners[0], read_lease(fs, root)
        assert record["run_id"] == name, attempt
        lease.release()
        assert read_lease(fs, root) is None


def test_a_stalled_holder_that_was_taken_over_learns_it_and_leaves_the_new_lease_alone(
    output, monkeypatch, tmp_path
) -> None:
    fs, root, uri = output
    endpoint = fs.client_kwargs.get("endpoint_url", "") if uri.startswith("s3://") else ""
    env = {**os.environ, "PYTHONPATH": str(REPO), "M2F_LEASE_STALE_S": "1.5"}
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, uri, endpoint], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        os.kill(holder.pid, signal.SIGSTOP)  # stalled: no heartbeat
        with pytest.raises(Busy):
            Lease.acquire(fs, root, "new-run")
        time.sleep(2.0)
        lease = Lease.acquire(fs, root, "new-run")
        os.kill(holder.pid, signal.SIGCONT)
        out, _ = holder.communicate(timeout=30)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    assert holder.returncode == 0
    assert out.strip().startswith("lost the lease on OUTPUT to run new-run on host "), out
    assert read_lease(fs, root)["run_id"] == "new-run"  # the old holder's release left it alone
    assert lease.lost is None
    lease.release()
    assert read_lease(fs, root) is None


# --- m2f segment ----------------------------------------------------------------------------------


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` and its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_run_while_another_holds_output_exits_75_and_touches_nothing(models, tmp_path) -> None:
    source, out = tmp_path / "in", tmp_path / "out"
    write_images(source, [(16, 12)] * 3)
    # What a run's planning would remove, were it to go on: a dead run's work manifests, a temporary.
    (out / "_runs" / "20990101T000000Z-dead-work").mkdir(parents=True)
    (out / "_runs" / "20990101T000000Z-dead-work" / "0.parquet").write_bytes(b"manifest")
    (out / ".part-x.parquet.m2f-tmp-0123").write_bytes(b"half")
    fs, root = open_fs(str(out), {})
    me = dict(host=socket.gethostname(), pid=os.getpid(), process=process_id(os.getpid()))
    write_lease(fs, root, run_id="holding-run", **me)
    before = snapshot(out)

    started = time.monotonic()
    result = segment(source, out, "--model", models["semantic"])
    assert time.monotonic() - started < 30
    assert result.exit_code == 75, result.output
    (line,) = [line for line in result.output.splitlines() if "holding-run" in line]
    assert f"run holding-run on host {me['host']} (pid {me['pid']}), heartbeat " in line, line
    assert "Traceback" not in result.output

    result = segment(source, out, "--model", models["semantic"], "--json")
    assert result.exit_code == 75
    ending = json.loads(result.stdout.strip().splitlines()[-1])
    assert ending["status"] == "busy" and ending["exit_code"] == 75
    assert ending["holder"]["run_id"] == "holding-run" and ending["holder"]["pid"] == os.getpid()
    assert snapshot(out) == before


def test_a_sigkilled_holder_blocks_until_its_heartbeat_is_stale_then_a_rerun_completes(
    ray_cluster, models, tmp_path, monkeypatch
) -> None:
    source, out, log = tmp_path / "in", tmp_path / "out", tmp_path / "killed.log"
    uris = write_images(source, [(24 + i % 3 * 8, 16) for i in range(40)])
    env = {"M2F_ROWS_PER_FILE": "4", "M2F_LEASE_STALE_S": "5"}
    process = start(source, out, log, "--model", models["semantic"], "--batch-size", 1, "--flush-seconds", 1, env=env)
    try:
        wait_for_part_file(process, out, log)
    finally:
        kill_tree(process)
    fs, root = open_fs(str(out), {})
    killed = read_lease(fs, root)
    assert killed is not None and killed["pid"] == process.pid and killed["stale_after_s"] == 5.0

    # As if the killed run had been on another machine (its process cannot be seen to be gone), and had
    # beaten its heart just now: refused until the heartbeat is 5 s old, as it promised.
    fields = {k: v for k, v in killed.items() if k != "heartbeat"} | {"host": "elsewhere", "process": "a/1/2/3"}
    write_lease(fs, root, **fields)
    written, before = time.monotonic(), snapshot(out)
    result = segment(source, out, "--model", models["semantic"])
    assert time.monotonic() - written < 5, "the refused run took longer than the stale time"
    assert result.exit_code == 75 and killed["run_id"] in result.output, result.output
    assert snapshot(out) == before

    time.sleep(max(0.0, written + 5.5 - time.monotonic()))  # now the heartbeat is overdue
    monkeypatch.setenv("M2F_LEASE_STALE_S", "5")
    result = segment(source, out, "--model", models["semantic"], "--batch-size", 8)
    assert result.exit_code == 0, result.output
    rows = rows_of(out, "image_uri, status")
    assert Counter(r["image_uri"] for r in rows) == Counter(uris) and {r["status"] for r in rows} == {"ok"}
    assert read_lease(fs, root) is None


def test_of_two_runs_started_together_one_completes_and_the_other_exits_75(models, tmp_path) -> None:
    source, out = tmp_path / "in", tmp_path / "out"
    uris = write_images(source, [(24, 16)] * 8)
    args = ("--model", models["semantic"], "--batch-size", 4)
    first = start(source, out, tmp_path / "first.log", *args)
    time.sleep(1.0)
    second = start(source, out, tmp_path / "second.log", *args)
    try:
        codes = sorted(p.wait(timeout=240) for p in (first, second))
    finally:
        for p in (first, second):
            if p.poll() is None:
                kill_tree(p)
    logs = "\n".join(p.read_text(errors="replace") for p in (tmp_path / "first.log", tmp_path / "second.log"))
    assert codes == [0, 75], logs
    assert "is in use by run " in logs
    rows = rows_of(out, "image_uri, status")
    assert Counter(r["image_uri"] for r in rows) == Counter(uris) and {r["status"] for r in rows} == {"ok"}
    assert not (out / "_runs" / "_lease.json").exists()


def test_a_run_whose_lease_was_taken_over_stops_and_exits_3(models, tmp_path) -> None:
    source, out, log = tmp_path / "in", tmp_path / "out", tmp_path / "stalled.log"
    write_images(source, [(24 + i % 3 * 8, 16) for i in range(100)])
    env = {"M2F_ROWS_PER_FILE": "4", "M2F_LEASE_STALE_S": "3"}
    process = start(source, out, log, "--model", models["semantic"], "--batch-size", 1, "--flush-seconds", 1, env=env)
    fs, root = open_fs(str(out), {})
    try:
        wait_for_part_file(process, out, log)
        os.kill(process.pid, signal.SIGSTOP)  # the driver stalls: no heartbeat, no commits
        time.sleep(3.5)
        lease = Lease.acquire(fs, root, "new-holder")
        os.kill(process.pid, signal.SIGCONT)
        code = process.wait(timeout=120)
    finally:
        if process.poll() is None:
            kill_tree(process)
    text = log.read_text(errors="replace")
    assert code == 3, text
    last = text.strip().splitlines()[-1]
    assert last.startswith("m2f segment: error: lost the lease on OUTPUT to run new-holder on host "), last
    (report,) = [json.loads(p.read_text()) for p in (out / "_runs").glob("2*.json")]
    assert report["status"] == "failed" and report["exit_code"] == 3
    assert read_lease(fs, root)["run_id"] == "new-holder"  # the run that lost it left it alone
    lease.release()
