"""`m2f segment`: list INPUT, skip what OUTPUT already holds, stream the rest through Ray Data, commit
results as they come, report.

The pipeline, one row per listed image all the way:

    work manifest (Parquet, URIs)  --read_work_files, small blocks-->
    prepare_images (CPU tasks: read, decode, resize)  -->
    Segmenter (actor pool: the model, post-processing, a compact form of the masks)  -->
    encode_rows (CPU tasks: RLE, statistics, rows)  --blocks of rows-->
    the driver: PartWriter (jobs.commit) commits a part file every ROWS_PER_FILE rows or --flush-seconds

A cluster that shrinks below the actor pool (a node lost for good) gets a new pipeline with the actors it
can hold, over the images left (SegmentRun._stream), rather than a stall.

Why the rows come to the driver: the earlier shape repartitioned the actors' output to ROWS_PER_FILE rows
per block before a write stage, and that repartition was a barrier (the first part file landed after the
last model task), so a kill lost the whole run. A commit by size *or age* needs one owner of the buffer
with a clock, and on SIGTERM the driver is the process that is told; jobs/commit.py says more.

Ray Data's id-based checkpointing (`ray.data.checkpoint.CheckpointConfig`) was weighed and not used: it
records ids written by a Datasink (a file per block, no size or age rule), keeps its own checkpoint files
beside the data (a second truth that can drift from the dataset: delete a part file and it still believes
the images done), reads them through pyarrow filesystems rather than the fsspec options our users pass,
reserves filter actors of 1 GiB each, and knows ids only — not that an error row is to be retried, or that
an ok row came from another model. Our ledger (jobs.resume) is the dataset itself.

OUTPUT's layout is pipeline/output.py's; how a run ends is jobs/segment_end.py's.

How a run ends (the exit code, the report's "status"): 0 or 1 "completed" (error rate within
--max-error-rate or not); 2, bad arguments, nothing written; 3 "failed" (storage, Ray, the model) or
"stalled" (nothing finished for --stall-timeout seconds); 130 / 143 "cancelled" (SIGINT / SIGTERM); 75 "busy",
another run holds OUTPUT, nothing written (one run per OUTPUT at a time: jobs/lease.py). Every ending but 2
and 75 keeps what was committed, and a re-run of the same command resumes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import signal
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import numpy as np

from m2f.jobs.cluster import ray_session
from m2f.jobs.commit import Commit, PartWriter
from m2f.jobs.configs import SegmentConfig
from m2f.jobs.console import Console
from m2f.jobs.dataflow import (
    build_dataset,
    capacity_warnings,
    explain_stall,
    fewer_actors,
    resolve_device,
    stream_results,
)
from m2f.jobs.failure import Failure, one_line, storage_step
from m2f.jobs.lease import EXIT_BUSY, Busy, Lease
from m2f.jobs.lifecycle import Cancelled, RunLog, Stop, handling_signals
from m2f.jobs.model_probe import ModelProbe, local_gpu, probe_model
from m2f.jobs.progress import Progress
from m2f.jobs.report import RunCounts, ray_data_stats
from m2f.jobs.resume import (
    Existing,
    drop_superseded_errors,
    interrupted_overwrites,
    plan_work,
    remaining_work,
    remove_stale_work,
    scan_output,
)
from m2f.jobs.segment_end import finish, write_report
from m2f.pipeline.output import new_run_id, run_file
from m2f.pipeline.predictor import default_score_threshold
from m2f.pipeline.secrets import scrub, secret_values
from m2f.pipeline.sources import list_inputs
from m2f.pipeline.storage import Storage, open_fs, qualify, storage_failure

# Rows per output part file. Larger files suit analysts, smaller ones lose less work to a kill.
ROWS_PER_FILE = int(os.environ.get("M2F_ROWS_PER_FILE", "512"))

log = logging.getLogger(__name__)


# --- the job --------------------------------------------------------------------------------------


def run(config: SegmentConfig) -> int:
    """Run the job; returns the exit code (see the module docstring)."""
    stop = Stop(config.grace_seconds)
    with handling_signals(stop):
        job = SegmentRun(config, stop)
        try:
            return job.run()
        finally:
            if job.lease is not None:  # after the final report, in every ending but a SIGKILL
                job.lease.release()


class SegmentRun:
    """One run of `m2f segment`, from arguments to the run report."""

    def __init__(self, config: SegmentConfig, stop: Stop) -> None:
        self.config, self.stop = config, stop
        self.started = datetime.now(UTC)
        self.run_id = new_run_id()
        self.secrets = secret_values(_parsed_options(config.storage_options_json))  # before they are checked
        self.storage: Storage | None = None  # set by _arguments, from the checked options
        self.warnings: list[str] = []
        self.counts = RunCounts()
        self.timings: dict[str, float] = {}  # seconds per phase
        self.committed: list[np.ndarray] = []  # (N,) uint64 keys of each committed part file
        self.fs: Any = None
        self.root = ""
        self.probe: ModelProbe | None = None
        self.task = config.task or ""
        self.listing: Any = None
        self.existing: Existing | None = None
        self.resumed: frozenset[str] = frozenset()
        self.processing_s = 0.0
        self.stats: dict[str, Any] | None = None
        self.log = RunLog(self.run_id)
        self.terminal = Console(json_mode=config.json)
        self.report: dict[str, Any] | None = None  # the last report written
        self.lease: Lease | None = None  # one run per OUTPUT (jobs/lease.py): taken before OUTPUT is touched

    def say(self, message: str, *, err: bool = False) -> None:
        self.terminal.line(scrub(message, self.secrets), err=err)

    def warn(self, message: str) -> None:
        self.warnings.append(scrub(message, self.secrets))
        log.warning("%s", scrub(message, self.secrets))
        self.say(f"warning: {message}", err=True)

    def run(self) -> int:
        status, failure = "completed", None
        try:
            self._arguments()
            self._plan()
            self._process()
            if self.stop.requested:
                status = self.stop.status or "cancelled"
        except Cancelled:
            status = "cancelled"
        except Failure as e:
            failure = e
            if e.exit_code in (2, EXIT_BUSY):  # bad arguments, or another run holds OUTPUT: nothing written
                self.say(f"error: {e}", err=True)
                self._unplan()
                self.log.close()
                if self.config.json:
                    invalid = {"run_id": self.run_id, "status": "invalid", "exit_code": 2, "error": str(e)}
                    if isinstance(e, Busy):
                        invalid.update(status="busy", exit_code=EXIT_BUSY, holder=e.holder)
                    self.terminal.result(scrub(json.dumps(invalid), self.secrets))
                return e.exit_code
            status = "failed"
        except Exception as e:  # a bug or an unexpected Ray error: still one line, a report, and exit 3
            log.exception("the run failed")
            failure = Failure(f"the job failed: {one_line(e)}", 3)
            status = "failed"
        exit_code = finish(self, status, failure)
        if self.config.json:
            ending = self.report or {"run_id": self.run_id, "status": status, "exit_code": exit_code}
            self.terminal.result(scrub(json.dumps(ending, default=str), self.secrets))
        return exit_code

    # --- phases -----------------------------------------------------------------------------------

    def _arguments(self) -> None:
        """Everything checkable before Ray starts: options, INPUT, OUTPUT, the model. Exit 2 on a mistake."""
        config = self.config
        try:
            config.validate()
            self.storage = storage = config.storage
            self.options = {
                name: storage.options(uri)
                for name, uri in (("input", config.input), ("output", config.output), ("model", config.model))
            }
        except ValueError as e:
            raise Failure(str(e), 2) from None
        self.fs, self.root = self._storage(
            "open", config.output, lambda: open_fs(config.output, self.options["output"])
        )
        self.listing = self._storage(
            "list",
            config.input,
            lambda: list_inputs(config.input, self.options["input"], output=self.output),
            retry=False,
        )
        if self._storage("read", config.output, lambda: self.fs.isfile(self.root)):
            raise Failure(f"OUTPUT {config.output!r} is a file; give a folder or prefix", 2)
        take = functools.partial(Lease.acquire, self.fs, self.root, self.run_id, on_lost=self.stop.stall)
        self.lease = self._storage("write to", config.output, take)  # raises Busy (75) while another run holds it
        clock = time.perf_counter()
        try:
            self.probe = probe_model(config.model, config.preset, self.options["model"])
        except (ValueError, FileNotFoundError) as e:
            raise Failure(str(e), 2) from None
        self.timings["model_probe"] = time.perf_counter() - clock
        self.task = config.task or self.probe.task
        if config.score_threshold is None:
            threshold = default_score_threshold(self.task)
            self.config = dataclasses.replace(config, score_threshold=threshold)
        if config.device == "cuda" and not config.ray_address and not local_gpu():
            raise Failure("--device cuda, but this machine has no GPU that torch can use (Ray runs locally)", 2)

    def _plan(self) -> None:
        """Read what OUTPUT holds, tidy it, and write this run's work manifest and 'running' report."""
        config, fs, root = self.config, self.fs, self.root
        clock = time.perf_counter()
        label = self.probe.label
        if config.overwrite:
            self.resumed = self._storage(
                "read", config.output, lambda: interrupted_overwrites(fs, root, model=label, task=self.task)
            )
        existing = self.existing = self._storage(
            "read", config.output, lambda: scan_output(fs, root, model=label, task=self.task, resumed=self.resumed)
        )
        self.timings["scan_output"] = time.perf_counter() - clock
        if existing.temporaries_removed:
            self.say(f"removed {existing.temporaries_removed} temporary file(s) left by an interrupted run")
        for path in existing.quarantined:
            self.warn(f"unreadable part file moved to {path}")
        if existing.other_model_rows and not config.overwrite:
            self.warn(
                f"{existing.other_model_rows} existing ok rows were made with another model or task; they are kept "
                "(use --overwrite to redo them, or another OUTPUT)"
            )
        if existing.duplicate_ok_rows:
            self.warn(f"{existing.duplicate_ok_rows} images have more than one ok row in {self.output}")
        # Error rows of images that have an ok row are superseded already: safe to remove now.
        self._storage(
            "write to",
            config.output,
            lambda: drop_superseded_errors(fs, existing.with_errors, existing.ok_keys),
        )
        self._storage("write to", config.output, lambda: remove_stale_work(fs, root))
        if self.resumed:
            self.say(f"resuming {len(self.resumed)} interrupted --overwrite run(s): {', '.join(sorted(self.resumed))}")
        clock = time.perf_counter()
        done = existing.resumed_keys if config.overwrite else existing.ok_keys
        self.plan = self._storage(
            "list", config.input, lambda: plan_work(self.listing, done, fs=fs, folder=self.work_dir), retry=False
        )
        self.timings["list_and_plan"] = time.perf_counter() - clock
        counts, plan = self.counts, self.plan
        counts.listed, counts.duplicates = plan.listed, plan.duplicates
        counts.already_done, counts.pending = plan.already_done, len(plan.pending)
        self.say(
            f"m2f segment {self.run_id}: {plan.listed} images listed ({self.listing.skipped_count} other files "
            f"skipped), {plan.already_done} already done, {counts.pending} to process with {label} ({self.task})"
        )
        if not plan.listed:
            message = (
                f"no images found under {config.input} ({self.listing.skipped_count} other files skipped; image "
                "extensions: jpg, jpeg, png, webp, bmp, gif, tif, tiff)"
            )
            if not config.allow_empty:
                raise Failure(message, 1)
            self.warn(message + "; --allow-empty accepts it")
        self._storage("write to", config.output, lambda: write_report(self, "running"))

    def _process(self) -> None:
        """Start Ray, run the pipeline, commit rows as they come."""
        if not self.counts.pending:
            return
        config = self.config
        clock = time.perf_counter()
        self.stop.raise_now = False  # a signal inside ray.init() would leave a half-started Ray behind
        with self.terminal.capture_ray(self.log.path), ray_session(config.ray_address, self.stop):
            import ray

            if self.stop.requested:
                raise Cancelled(self.stop.signum or signal.SIGTERM)
            self.timings["ray_start"] = time.perf_counter() - clock
            resources = ray.cluster_resources()
            try:
                device = resolve_device(config.device, resources.get("GPU", 0), config.gpus_per_actor, config.precision)
            except ValueError as e:
                raise Failure(str(e), 2) from None
            for message in capacity_warnings(resources, config, device):
                self.warn(message)
            writer = PartWriter(
                self.fs,
                self.root,
                self.run_id,
                rows_per_file=ROWS_PER_FILE,
                flush_seconds=config.flush_seconds,
                on_commit=self._committed,
            )
            progress = Progress(self.counts.pending, bar=config.progress, stream=self.terminal.err)
            start = time.perf_counter()  # from here a signal stops the loop, which commits what it holds
            try:
                ds = self._stream(config, device, resources.get("CPU", 0.0), writer, progress)
            except Exception as e:
                if writer.failure is not None:  # raised again by add() or flush_if_due(): the cause is the write
                    raise self._write_failure(writer.failure) from None
                log.exception("the pipeline failed")
                raise Failure(f"the job failed: {one_line(e)}", 3) from None
            finally:
                progress.close()
                self._close_writer(writer)
                self.processing_s = self.timings["processing"] = time.perf_counter() - start
            if not self.stop.requested:
                self.stats = ray_data_stats(ds, start)
            clock = time.perf_counter()
        self.timings["ray_stop"] = time.perf_counter() - clock

    def _stream(
        self, config: SegmentConfig, device: str, cluster_cpus: float, writer: PartWriter, progress: Progress
    ) -> Any:
        """Run the pipeline over the plan into `writer`; returns the dataset that ran last.

        When the cluster has shrunk below the actor pool (a node lost for good) and nothing finishes, the
        execution ends, what it finished is committed, and a pipeline with as many actors as the cluster
        now holds takes over the images left (`dataflow.fewer_actors`): a run goes on at the cluster's new
        size instead of stalling. Each round has fewer actors, so this ends.
        """
        attempt = 0
        while True:
            ds = build_dataset(
                config,
                self.plan,
                preprocess=self.probe.preprocess,
                task=self.task,
                device=device,
                run_id=self.run_id,
                cluster_cpus=cluster_cpus,
            )
            smaller = stream_results(
                ds,
                writer,
                progress,
                self.stop,
                stall_timeout=config.stall_timeout,
                explain=lambda idle, config=config: explain_stall(idle, config, device),
                shrink=lambda config=config: fewer_actors(config, device),
            )
            if smaller is None:
                return ds
            while not writer.drain(timeout=1.0):  # the rows in hand are committed before the work is re-planned
                if self.stop.requested:
                    return ds
            attempt += 1
            done = self.committed_keys()
            rest = functools.partial(remaining_work, self.plan, done, fs=self.fs, folder=self.work_dir, round=attempt)
            self.plan = self._storage("write to", config.output, rest)
            self.warn(f"{smaller.reason} for the {len(self.plan.pending)} image(s) left")
            config, cluster_cpus = dataclasses.replace(config, actors=smaller.actors), smaller.cluster_cpus

    def _unplan(self) -> None:
        """A bad argument found once Ray answered (a joined cluster without a GPU): take back the work
        manifest and the 'running' report, so that a bad argument leaves nothing behind."""
        if self.fs is None or self.report is None:
            return
        for path in (self.work_dir, self.report_path):
            with contextlib.suppress(Exception):
                self.fs.rm(path, recursive=True)

    def _close_writer(self, writer: PartWriter) -> None:
        """Commit what the writer holds; after a stop, only within the grace period."""
        try:
            while not writer.close(timeout=min(1.0, self.stop.time_left())):
                if self.stop.time_left() <= 0:
                    self.warn(f"{writer.uncommitted} finished rows were not committed within --grace-seconds")
                    return
        except Exception as e:
            raise self._write_failure(e) from None

    def _write_failure(self, e: BaseException) -> Failure:
        """A part file that could not be written, after its retries: one line naming the cause (exit 3)."""
        log.error("writing a part file failed", exc_info=e)
        return Failure(str(storage_failure(e, "write to", self.config.output, secrets=self.secrets)), 3)

    def _committed(self, commit: Commit) -> None:
        """Called by the writer's thread after each part file is in place."""
        self.counts.add_commit(commit)
        self.committed.append(commit.keys)
        if self.lease is not None and self.lease.lost:  # another run holds OUTPUT now: no more part files
            raise Failure(self.lease.lost, 3)

    def committed_keys(self) -> np.ndarray:
        """(N,) uint64 sorted: every image this run has committed a row for."""
        return np.unique(np.concatenate(self.committed)) if self.committed else np.empty(0, np.uint64)

    # --- helpers ----------------------------------------------------------------------------------

    @property
    def output(self) -> str:
        return qualify(self.fs, self.root)

    @property
    def work_dir(self) -> str:
        return run_file(self.root, self.run_id, "-work")

    @property
    def report_path(self) -> str:
        return run_file(self.root, self.run_id, ".json")

    def _storage(self, action: str, uri: str, fn: Callable[[], Any], *, retry: bool = True) -> Any:
        return storage_step(action, uri, fn, retry=retry, secrets=self.secrets)


def _parsed_options(options_json: str | None) -> dict[str, Any]:
    try:
        parsed = json.loads(options_json) if options_json else {}
    except json.JSONDecodeError:
        return {"secret": options_json}  # unparseable: treat the whole text as secret
    return parsed if isinstance(parsed, dict) else {}
