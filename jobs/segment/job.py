"""`m2f segment`: list INPUT, skip what OUTPUT already holds, stream the rest through Ray Data, commit
results as they come, report.

The pipeline, one row per listed image all the way:

    work manifest (Parquet, URIs)  --read_work_files, small blocks-->
    prepare_images (CPU tasks: read, decode, resize)  -->
    Segmenter (actor pool: the model, post-processing, a compact form of the masks)  -->
    encode_rows (CPU tasks: RLE, statistics, rows)  --blocks of rows-->
    the driver: PartWriter (segment/commit.py) commits a part file every ROWS_PER_FILE rows or --flush-seconds

A cluster that shrinks below the actor pool (a node lost for good) gets a new pipeline with the actors it
can hold, over the images left (segment/process.py), rather than a stall.

Why the rows come to the driver: the earlier shape repartitioned the actors' output to ROWS_PER_FILE rows
per block before a write stage, and that repartition was a barrier (the first part file landed after the
last model task), so a kill lost the whole run. A commit by size *or age* needs one owner of the buffer
with a clock, and on SIGTERM the driver is the process that is told; segment/commit.py says more.

Ray Data's id-based checkpointing (`ray.data.checkpoint.CheckpointConfig`) was weighed and not used: it
records ids written by a Datasink (a file per block, no size or age rule), keeps its own checkpoint files
beside the data (a second truth that can drift from the dataset: delete a part file and it still believes
the images done), reads them through pyarrow filesystems rather than the fsspec options our users pass,
reserves filter actors of 1 GiB each, and knows ids only — not that an error row is to be retried, or that
an ok row came from another model. Our ledger (segment/resume.py) is the dataset itself.

OUTPUT's layout is pipeline/output.py's. A run is a sequence of phases, each taking the values it needs
and returning one (frozen) value:

    open_place (setup.py)   options -> Place: OUTPUT opened, INPUT listed        exit 2 on a mistake
    take_lease (setup.py)   Place -> Lease: OUTPUT is this run's                 exit 75 while another run holds it
    check_model (setup.py)  Place -> Model: the probe, the task, the options     exit 2 if it does not load
    read_ledger (plan.py)   Place, Model -> Ledger: what OUTPUT holds, tidied
    plan_run (plan.py)      Ledger -> Plan: the work manifest, the counts; then the 'running' report
    process (process.py)    Plan -> Outcome: status, failure, timings, Ray Data's stats
    finish (ending.py)      Reached (every value above), Outcome -> the exit code and the final report

The long-lived objects (the stop flag, the voice, the run log, the tally of commits) travel together as
`Running`; each has a few methods of its own.

How a run ends (the exit code, the report's "status"): 0 or 1 "completed" (error rate within
--max-error-rate or not); 2, bad arguments, nothing written; 3 "failed" (storage, Ray, the model) or
"stalled" (nothing finished for --stall-timeout seconds); 130 / 143 "cancelled" (SIGINT / SIGTERM); 75 "busy",
another run holds OUTPUT, nothing written (one run per OUTPUT at a time: segment/lease.py). Every ending but 2
and 75 keeps what was committed, and a re-run of the same command resumes.
"""

from __future__ import annotations

import contextlib
import json

from m2f.jobs.common.configs import SegmentConfig
from m2f.jobs.common.console import Console, Voice
from m2f.jobs.common.failure import Failure
from m2f.jobs.common.lifecycle import RunLog, Stop, handling_signals
from m2f.jobs.segment.ending import Reached, finish, write_running_report
from m2f.jobs.segment.lease import EXIT_BUSY, Busy
from m2f.jobs.segment.plan import plan_run, read_ledger, require_images
from m2f.jobs.segment.process import Outcome, Running, process
from m2f.jobs.segment.report import Tally
from m2f.jobs.segment.setup import Start, check_model, open_place, take_lease


def run(config: SegmentConfig) -> int:
    """Run the job; returns the exit code (see the module docstring)."""
    stop = Stop(config.grace_seconds)
    with handling_signals(stop):
        start = Start.new(config)
        running = Running(stop, Voice(Console(json_mode=config.json), start.secrets), RunLog(start.run_id), Tally())
        reached = Reached(start)
        try:
            reached, outcome = phases(config, start, running)
            if outcome.refused:
                return refuse(reached, outcome.failure, running, json_mode=config.json)
            exit_code, report = finish(reached, outcome, running)
            if config.json:
                ending = report or reached.running_report
                ending = ending or {"run_id": start.run_id, "status": outcome.status, "exit_code": exit_code}
                running.voice.result(json.dumps(ending, default=str))
            return exit_code
        finally:
            if reached.lease is not None:  # after the final report, in every ending but a SIGKILL
                reached.lease.release()


def phases(config: SegmentConfig, start: Start, running: Running) -> tuple[Reached, Outcome]:
    """The phases in order, each taking the values it needs and returning one; whatever ends them, returns
    the values they reached and how they ended."""
    voice = running.voice
    place = lease = model = ledger = plan = report = None
    try:
        place = open_place(config, start)
        lease = take_lease(place, running.stop, start.secrets)
        model = check_model(place)
        ledger = read_ledger(place, model, voice)
        plan = plan_run(place, model, ledger, voice)
        running.tally.plan(plan.work)
        require_images(place, plan, voice)
        report = write_running_report(Reached(start, place, lease, model, ledger, plan), running)
        outcome = process(place, model, plan, running, lease)
    except Exception as e:
        outcome = Outcome.of(e)
    except BaseException:
        if lease is not None:
            lease.release()
        raise
    return Reached(start, place, lease, model, ledger, plan, report), outcome


def refuse(reached: Reached, failure: Failure | None, running: Running, *, json_mode: bool) -> int:
    """Bad arguments (2) or a busy OUTPUT (75): one line, the run log dropped, nothing left in OUTPUT (a bad
    argument found once Ray answered, a joined cluster without a GPU, takes back the work manifest and the
    'running' report), and with --json the 'invalid' or 'busy' result."""
    assert failure is not None
    running.voice.say(f"error: {failure}", err=True)
    place = reached.place
    if place is not None and reached.running_report is not None:
        for path in (place.work_dir, place.report_path):
            with contextlib.suppress(Exception):
                place.fs.rm(path, recursive=True)
    running.log.close()
    if json_mode:
        invalid = {"run_id": reached.start.run_id, "status": "invalid", "exit_code": 2, "error": str(failure)}
        if isinstance(failure, Busy):
            invalid.update(status="busy", exit_code=EXIT_BUSY, holder=failure.holder)
        running.voice.result(json.dumps(invalid))
    return failure.exit_code
