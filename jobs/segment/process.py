"""The processing phase of `m2f segment`: start Ray, run the pipeline (segment/dataflow.py) over the plan,
and commit rows as they come (segment/commit.py). Whatever ends it, it returns an `Outcome`."""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any

from m2f.jobs.common.cluster import ray_session
from m2f.jobs.common.console import Voice
from m2f.jobs.common.failure import Failure, one_line, storage_step
from m2f.jobs.common.lifecycle import Cancelled, RunLog, Stop
from m2f.jobs.common.progress import Progress
from m2f.jobs.segment.commit import Commit, PartWriter
from m2f.jobs.segment.dataflow import (
    actor_weights,
    build_dataset,
    capacity_warnings,
    explain_stall,
    fewer_actors,
    resolve_device,
    stream_results,
)
from m2f.jobs.segment.lease import EXIT_BUSY, Lease
from m2f.jobs.segment.plan import Plan
from m2f.jobs.segment.report import Tally, ray_data_stats
from m2f.jobs.segment.resume import WorkPlan, remaining_work
from m2f.jobs.segment.setup import Model, Place
from m2f.pipeline.storage import storage_failure

# Rows per output part file. Larger files suit analysts, smaller ones lose less work to a kill.
ROWS_PER_FILE = int(os.environ.get("M2F_ROWS_PER_FILE", "512"))

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Running:
    """The run's long-lived objects, each with its own few methods: the stop flag (signals, stalls), what
    people are told, the run's log file, and the tally of committed rows."""

    stop: Stop
    voice: Voice
    log: RunLog
    tally: Tally


@dataclass(frozen=True)
class Outcome:
    """How the phases ended: "completed", "cancelled", "stalled" or "failed" (with `failure`), and what the
    processing took."""

    status: str = "completed"
    failure: Failure | None = None
    stats: dict[str, Any] | None = None  # Ray Data's, of the last execution
    timings: dict[str, float] = field(default_factory=dict)  # ray_start, processing, ray_stop (seconds)

    @property
    def processing_s(self) -> float:
        return self.timings.get("processing", 0.0)

    @property
    def refused(self) -> bool:
        """Bad arguments (2), or another run holds OUTPUT (75): nothing is written, nothing reported."""
        return self.failure is not None and self.failure.exit_code in (2, EXIT_BUSY)

    @classmethod
    def of(cls, e: Exception) -> Outcome:
        """The outcome of a phase that raised `e`: a bug or an unexpected Ray error is still one line, exit 3."""
        if isinstance(e, Cancelled):
            return cls("cancelled")
        if isinstance(e, Failure):
            return cls("failed", e)
        log.error("the run failed", exc_info=e)
        return cls("failed", Failure(f"the job failed: {one_line(e)}", 3))


def process(place: Place, model: Model, plan: Plan, running: Running, lease: Lease) -> Outcome:
    """Start Ray, run the pipeline, commit rows as they come; after a signal or a stall, commit what was
    finished within --grace-seconds."""
    if not len(plan.work.pending):
        return Outcome()
    config, stop = model.config, running.stop
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    stop.raise_now = False  # a signal inside ray.init() would leave a half-started Ray behind
    try:
        with running.voice.console.capture_ray(running.log.path), ray_session(config.ray_address, stop):
            import ray

            if stop.requested:
                raise Cancelled(stop.signum or signal.SIGTERM)
            timings["ray_start"] = time.perf_counter() - clock
            resources = ray.cluster_resources()
            try:
                device = resolve_device(config.device, resources.get("GPU", 0), config.gpus_per_actor, config.precision)
            except ValueError as e:
                raise Failure(str(e), 2) from None
            for message in capacity_warnings(resources, config, device):
                running.voice.warn(message)
            stats = _segment(place, model, plan, running, lease, device, resources.get("CPU", 0.0), timings)
            clock = time.perf_counter()
        timings["ray_stop"] = time.perf_counter() - clock
    except Exception as e:
        return dataclasses.replace(Outcome.of(e), timings=timings)
    ended = (stop.status or "cancelled") if stop.requested else "completed"
    return Outcome(ended, stats=stats, timings=timings)


def _segment(
    place: Place,
    model: Model,
    plan: Plan,
    running: Running,
    lease: Lease,
    device: str,
    cluster_cpus: float,
    timings: dict[str, float],
) -> dict[str, Any] | None:
    """Stream the plan through the pipeline into a part writer and close it; Ray Data's stats unless stopped."""
    config, stop, voice = model.config, running.stop, running.voice
    committed = functools.partial(_committed, running.tally, lease)
    writer = PartWriter(
        place.fs,
        place.root,
        place.run_id,
        rows_per_file=ROWS_PER_FILE,
        flush_seconds=config.flush_seconds,
        on_commit=committed,
    )
    progress = Progress(running.tally.counts.pending, bar=config.progress, stream=voice.console.err)
    start = time.perf_counter()  # from here a signal stops the loop, which commits what it holds
    try:
        ds = _stream(place, model, plan.work, running, device, cluster_cpus, writer, progress)
    except Exception as e:
        if writer.failure is not None:  # raised again by add() or flush_if_due(): the cause is the write
            raise _write_failure(writer.failure, config.output, voice) from None
        log.exception("the pipeline failed")
        raise Failure(f"the job failed: {one_line(e)}", 3) from None
    finally:
        progress.close()
        _close_writer(writer, stop, voice, config.output)
        timings["processing"] = time.perf_counter() - start
    return None if stop.requested else ray_data_stats(ds, start)


def _stream(
    place: Place,
    model: Model,
    work: WorkPlan,
    running: Running,
    device: str,
    cluster_cpus: float,
    writer: PartWriter,
    progress: Progress,
) -> Any:
    """Run the pipeline over `work` into `writer`; returns the dataset that ran last.

    When the cluster has shrunk below the actor pool (a node lost for good) and nothing finishes, the
    execution ends, what it finished is committed, and a pipeline with as many actors as the cluster
    now holds takes over the images left (`dataflow.fewer_actors`): a run goes on at the cluster's new
    size instead of stalling. Each round has fewer actors, so this ends.
    """
    config, stop, attempt = model.config, running.stop, 0
    weights = actor_weights(model.weights, joined=bool(config.ray_address))  # held for the whole run
    while True:
        ds = build_dataset(
            config,
            work,
            weights=weights,
            preprocess=model.probe.preprocess,
            task=model.task,
            device=device,
            run_id=place.run_id,
            cluster_cpus=cluster_cpus,
        )
        smaller = stream_results(
            ds,
            writer,
            progress,
            stop,
            stall_timeout=config.stall_timeout,
            explain=lambda idle, config=config: explain_stall(idle, config, device),
            shrink=lambda config=config: fewer_actors(config, device),
        )
        if smaller is None:
            return ds
        while not writer.drain(timeout=1.0):  # the rows in hand are committed before the work is re-planned
            if stop.requested:
                return ds
        attempt += 1
        done = running.tally.keys()
        rest = functools.partial(remaining_work, work, done, fs=place.fs, folder=place.work_dir, round=attempt)
        work = storage_step("write to", config.output, rest, secrets=running.voice.secrets)
        running.voice.warn(f"{smaller.reason} for the {len(work.pending)} image(s) left")
        config, cluster_cpus = dataclasses.replace(config, actors=smaller.actors), smaller.cluster_cpus


def _committed(tally: Tally, lease: Lease, commit: Commit) -> None:
    """Called by the writer's thread after each part file is in place."""
    tally.add(commit)
    if lease.lost:  # another run holds OUTPUT now: no more part files
        raise Failure(lease.lost, 3)


def _close_writer(writer: PartWriter, stop: Stop, voice: Voice, output: str) -> None:
    """Commit what the writer holds; after a stop, only within the grace period."""
    try:
        while not writer.close(timeout=min(1.0, stop.time_left())):
            if stop.time_left() <= 0:
                voice.warn(f"{writer.uncommitted} finished rows were not committed within --grace-seconds")
                return
    except Exception as e:
        raise _write_failure(e, output, voice) from None


def _write_failure(e: BaseException, output: str, voice: Voice) -> Failure:
    """A part file that could not be written, after its retries: one line naming the cause (exit 3)."""
    log.error("writing a part file failed", exc_info=e)
    return Failure(str(storage_failure(e, "write to", output, secrets=voice.secrets)), 3)
