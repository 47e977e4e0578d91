"""`m2f segment`: list INPUT, skip what OUTPUT already holds, stream the rest through Ray Data, commit
results as they come, report.

The pipeline, one row per listed image all the way:

    work manifest (Parquet, URIs)  --read_work_files, small blocks-->
    prepare_images (CPU tasks: read, decode, resize)  -->
    Segmenter (actor pool: the model, post-processing, RLE)  --blocks of rows-->
    the driver: PartWriter (jobs.commit) commits a part file every ROWS_PER_FILE rows or --flush-seconds

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

Layout of OUTPUT:
    part-<run_id>-<sequence>.parquet  the dataset (OUTPUT_SCHEMA), each file written atomically
    _runs/<run_id>.json               the run report: "running" from the start, then how it ended
    _runs/<run_id>.log                the run's log: warnings, and failures with their tracebacks
    _runs/<run_id>-work/              the run's work manifest, removed when the run ends
    _previews/<stem>-<image_id>.png   overlays of the first N listed images (--preview N)
    _previews/index.html              those overlays with each image's URI and segments
    _quarantine/                      unreadable part files found on resume, moved out of the dataset

How a run ends (the exit code, the report's "status"): 0 or 1 "completed" (error rate within
--max-error-rate or not); 2, bad arguments, nothing written; 3 "failed" (storage, Ray, the model) or
"stalled" (nothing finished for --stall-timeout seconds); 130 / 143 "cancelled" (SIGINT / SIGTERM). Every
ending but 2 keeps what was committed, and a re-run of the same command resumes. One run per OUTPUT at a time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import posixpath
import re
import secrets
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
from fsspec import AbstractFileSystem

from m2f.jobs.cluster import ray_session
from m2f.jobs.commit import FLUSH_SECONDS, Commit, PartWriter
from m2f.jobs.dataflow import build_dataset, capacity_warnings, explain_stall, resolve_device, stream_results
from m2f.jobs.lifecycle import GRACE_SECONDS, STALL_TIMEOUT, Cancelled, RunLog, Stop, Terminal, handling_signals
from m2f.jobs.progress import Progress
from m2f.jobs.report import RunCounts, build_report, ray_data_stats, summary_table
from m2f.jobs.resume import (
    Existing,
    drop_superseded_errors,
    interrupted_overwrites,
    plan_work,
    scan_output,
    supersede,
)
from m2f.model.config import TASKS
from m2f.pipeline.infer import PRECISIONS, model_label
from m2f.pipeline.output import PREVIEWS_DIR, RUNS_DIR, run_file
from m2f.pipeline.secrets import redact, scrub, secret_values
from m2f.pipeline.sources import list_inputs
from m2f.pipeline.storage import (
    StorageError,
    open_fs,
    qualify,
    storage_failure,
    storage_options,
    with_retries,
    write_atomic,
)

DEVICES = ("auto", "cpu", "cuda")

# Rows per output part file. Larger files suit analysts, smaller ones lose less work to a kill.
ROWS_PER_FILE = int(os.environ.get("M2F_ROWS_PER_FILE", "512"))
INSTANCE_SCORE_THRESHOLD = 0.5  # detectron2's demo and Hugging Face's pipeline keep instances scoring >= 0.5
PROGRESS_SECONDS = float(os.environ.get("M2F_PROGRESS_SECONDS", "30"))  # a progress line in logs this often

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SegmentConfig:
    """Everything `m2f segment` was asked to do (cli.py fills it; see `m2f segment --help`)."""

    input: str
    output: str
    model: str = "demo"
    preset: str | None = None
    task: str | None = None  # None: the checkpoint's own task
    endpoint_url: str | None = None
    storage_options_json: str | None = None  # may hold credentials: never printed or stored as is
    actors: int = 1
    batch_size: int = 4
    device: str = "auto"
    gpus_per_actor: float = 1.0
    cpus_per_actor: float = 1.0
    precision: str = "fp32"
    score_threshold: float | None = None  # None: 0.5 for instance output (as detectron2's demo), else 0
    max_pixels: int = 100_000_000
    max_error_rate: float = 0.0
    overwrite: bool = False
    preview: int = 0
    progress: bool | None = None  # None: a bar on a terminal, periodic lines in logs
    allow_empty: bool = False  # an INPUT that lists no image is then not an error
    json: bool = False  # the run report as stdout's last line; everything else on stderr
    flush_seconds: float = FLUSH_SECONDS
    grace_seconds: float = GRACE_SECONDS
    stall_timeout: float = STALL_TIMEOUT
    ray_address: str | None = None
    config_file: str | None = None  # the --config file the values came from, for the report

    def validate(self) -> None:
        """Raise ValueError naming the first bad option."""
        if self.task is not None and self.task not in TASKS:
            raise ValueError(f"--task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.device not in DEVICES:
            raise ValueError(f"--device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.precision == "fp16" and self.device == "cpu":
            raise ValueError("--precision fp16 needs a GPU; use bf16 or fp32 on CPU")
        for name in ("actors", "batch_size", "max_pixels"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("gpus_per_actor", "cpus_per_actor", "preview", "grace_seconds"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        for name in ("flush_seconds", "stall_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        if self.score_threshold is not None and not 0.0 <= self.score_threshold <= 1.0:
            raise ValueError(f"--score-threshold must lie in [0, 1], got {self.score_threshold}")
        if not 0.0 <= self.max_error_rate <= 1.0:
            raise ValueError(f"--max-error-rate must lie in [0, 1], got {self.max_error_rate}")
        if self.storage_options_json:  # checked even when every path is local and would never parse it
            storage_options("s3://", None, self.storage_options_json)

    def redacted(self) -> dict[str, Any]:
        """The configuration for the report: storage options parsed and redacted, URLs stripped of passwords."""
        out = asdict(self)
        raw = out.pop("storage_options_json")
        try:
            out["storage_options"] = redact(json.loads(raw)) if raw else None
        except (json.JSONDecodeError, TypeError):
            out["storage_options"] = "***"
        return redact(out)


def new_run_id() -> str:
    """UTC timestamp plus a short random suffix: sortable, and unique across concurrent starts."""
    return f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


# --- the job --------------------------------------------------------------------------------------


class Failure(Exception):
    """The run cannot go on; the message is the one line the user sees."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def run(config: SegmentConfig) -> int:
    """Run the job; returns the exit code (see the module docstring)."""
    stop = Stop(config.grace_seconds)
    with handling_signals(stop):
        return SegmentRun(config, stop).run()


class SegmentRun:
    """One run of `m2f segment`, from arguments to the run report."""

    def __init__(self, config: SegmentConfig, stop: Stop) -> None:
        self.config, self.stop = config, stop
        self.started = datetime.now(UTC)
        self.run_id = new_run_id()
        self.secrets = secret_values(_parsed_options(config.storage_options_json))
        self.warnings: list[str] = []
        self.counts = RunCounts()
        self.timings: dict[str, float] = {}  # seconds per phase
        self.committed: list[np.ndarray] = []  # (N,) uint64 keys of each committed part file
        self.fs: Any = None
        self.root = ""
        self.probe: dict[str, Any] = {}
        self.task = config.task or ""
        self.listing: Any = None
        self.existing: Existing | None = None
        self.resumed: frozenset[str] = frozenset()
        self.processing_s = 0.0
        self.stats: dict[str, Any] | None = None
        self.log = RunLog(self.run_id)
        self.terminal = Terminal(json_mode=config.json)
        self.report: dict[str, Any] | None = None  # the last report written

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
            if e.exit_code == 2:
                self.say(f"error: {e}", err=True)
                self._unplan()
                self.log.close()
                if self.config.json:
                    invalid = {"run_id": self.run_id, "status": "invalid", "exit_code": 2, "error": str(e)}
                    self.terminal.result(scrub(json.dumps(invalid), self.secrets))
                return 2
            status = "failed"
        except Exception as e:  # a bug or an unexpected Ray error: still one line, a report, and exit 3
            log.exception("the run failed")
            failure = Failure(f"the job failed: {_one_line(e)}", 3)
            status = "failed"
        exit_code = self._finish(status, failure)
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
            self.options = {
                name: storage_options(uri, config.endpoint_url, config.storage_options_json)
                for name, uri in (("input", config.input), ("output", config.output), ("model", config.model))
            }
        except ValueError as e:
            raise Failure(str(e), 2) from None
        self.listing = self._storage(
            "list", config.input, lambda: list_inputs(config.input, self.options["input"]), retry=False
        )
        self.fs, self.root = self._storage(
            "open", config.output, lambda: open_fs(config.output, self.options["output"])
        )
        if self._storage("read", config.output, lambda: self.fs.isfile(self.root)):
            raise Failure(f"OUTPUT {config.output!r} is a file; give a folder or prefix", 2)
        clock = time.perf_counter()
        try:
            self.probe = _probe_model(config, self.options["model"])
        except (ValueError, FileNotFoundError) as e:
            raise Failure(str(e), 2) from None
        self.timings["model_probe"] = time.perf_counter() - clock
        self.task = config.task or self.probe["task"]
        if config.score_threshold is None:
            threshold = INSTANCE_SCORE_THRESHOLD if self.task == "instance" else 0.0
            self.config = dataclasses.replace(config, score_threshold=threshold)
        if config.device == "cuda" and not config.ray_address and not _local_gpu():
            raise Failure("--device cuda, but this machine has no GPU that torch can use (Ray runs locally)", 2)

    def _plan(self) -> None:
        """Read what OUTPUT holds, tidy it, and write this run's work manifest and 'running' report."""
        config, fs, root = self.config, self.fs, self.root
        clock = time.perf_counter()
        label = self.probe["label"]
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
        self._storage("write to", config.output, lambda: _remove_stale_work(fs, root))
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
        self._storage("write to", config.output, lambda: self._write_report("running"))

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
            ds = build_dataset(
                config,
                self.plan,
                preprocess=self.probe["preprocess"],
                task=self.task,
                device=device,
                run_id=self.run_id,
            )
            writer = PartWriter(
                self.fs,
                self.root,
                self.run_id,
                rows_per_file=ROWS_PER_FILE,
                flush_seconds=config.flush_seconds,
                on_commit=self._committed,
            )
            progress = Progress(
                self.counts.pending, bar=config.progress, interval=PROGRESS_SECONDS, stream=self.terminal.err
            )
            start = time.perf_counter()  # from here a signal stops the loop, which commits what it holds
            try:
                stream_results(
                    ds,
                    writer,
                    progress,
                    self.stop,
                    stall_timeout=config.stall_timeout,
                    explain=lambda idle: explain_stall(idle, config, device),
                )
            except Exception as e:
                if writer.failure is not None:  # raised again by add() or flush_if_due(): the cause is the write
                    raise self._write_failure(writer.failure) from None
                log.exception("the pipeline failed")
                raise Failure(f"the job failed: {_one_line(e)}", 3) from None
            finally:
                progress.close()
                self._close_writer(writer)
                self.processing_s = self.timings["processing"] = time.perf_counter() - start
            if not self.stop.requested:
                self.stats = ray_data_stats(ds, start)
            clock = time.perf_counter()
        self.timings["ray_stop"] = time.perf_counter() - clock

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
                    self.warn(f"{writer.buffered} finished rows were not committed within --grace-seconds")
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

    # --- the end ----------------------------------------------------------------------------------

    def _finish(self, status: str, failure: Failure | None) -> int:
        """Tidy OUTPUT, write the report and the log, print the summary; returns the exit code."""
        config, counts = self.config, self.counts
        if failure is None and status == "completed" and counts.processed != counts.pending:
            failure = Failure(f"{counts.pending} images were to be processed but {counts.processed} rows came back", 3)
            status = "failed"
        if self.fs is not None:
            with contextlib.suppress(Exception):
                self.fs.rm(self.work_dir, recursive=True)
        removed = self._supersede()
        previews = self._previews() if status == "completed" and failure is None else 0
        if failure is not None:
            exit_code = failure.exit_code
            self.warnings.append(scrub(str(failure), self.secrets))
        elif status in ("cancelled", "stalled"):
            exit_code = self.stop.exit_code or 130
            if status == "stalled":
                self.warnings.append(scrub(self.stop.stalled or "", self.secrets))
        else:
            exit_code = 0 if counts.error_rate <= config.max_error_rate else 1
        report_uri = self._final_report(status, exit_code, previews)

        if status == "completed" and failure is None:
            if removed:
                self.say(f"removed {removed} earlier row(s) of images this run redid")
            self.say(
                summary_table(
                    counts,
                    skipped_files=self.listing.skipped_count,
                    processing_s=self.processing_s,
                    output=self.output,
                    report=report_uri,
                )
            )
            if previews:
                index = qualify(self.fs, posixpath.join(self.root, PREVIEWS_DIR, "index.html"))
                self.say(f"  previews: {index} ({previews} PNGs)")
            if exit_code == 1:
                self.say(
                    f"error rate {counts.error_rate:.4f} ({counts.error} errors, {counts.ok + counts.already_done} ok) "
                    f"exceeds --max-error-rate {config.max_error_rate}",
                    err=True,
                )
        else:
            self.say(self._ending_line(status, failure, report_uri), err=True)
        return exit_code

    def _ending_line(self, status: str, failure: Failure | None, report_uri: str) -> str:
        """The one line that says how a run that did not complete ended, what it kept, and what next."""
        where = f"; report: {report_uri}" if report_uri else f"; log: {self.log.path}"
        if failure is not None and not self.counts.pending:  # nothing was started: nothing to keep or resume
            return f"m2f segment: error: {failure}{where}"
        kept = f"{self.counts.processed:,} rows committed in {self.counts.files_written} part file(s)"
        left = max(0, self.counts.pending - self.counts.processed)
        if status == "cancelled":
            what = f"cancelled by {self.stop.signal_name() or 'a signal'}"
        elif status == "stalled":
            what = f"stopped: {self.stop.stalled}"
        else:
            what = f"error: {failure}"
        return f"m2f segment: {what}; kept {kept}, {left:,} image(s) left; a re-run resumes{where}"

    def _supersede(self) -> int:
        """Remove the earlier rows of images whose new row this run committed (see jobs.resume)."""
        if self.existing is None or not (self.committed or len(self.existing.resumed_keys)):
            return 0
        keys = np.unique(np.concatenate([*self.committed, self.existing.resumed_keys]))
        try:
            return with_retries(lambda: supersede(self.fs, self.existing.parts, keys, self.resumed))
        except Exception as e:  # the next run finishes the tidying; nothing is lost meanwhile
            log.exception("removing superseded rows failed")
            self.warn(f"could not remove earlier rows of redone images yet ({_one_line(e)}); the next run will")
            return 0

    def _previews(self) -> int:
        if not self.config.preview:
            return 0
        from m2f.pipeline.preview import write_previews

        try:
            return write_previews(
                self.fs,
                self.root,
                self.config.preview,
                uris=dataclasses.replace(self.listing).uris(),  # the first N listed; a copy keeps the counts
                endpoint_url=self.config.endpoint_url,
                storage_options_json=self.config.storage_options_json,
                max_pixels=self.config.max_pixels,
            )
        except Exception as e:  # previews are a convenience: they never fail a run
            self.warn(f"previews failed: {type(e).__name__}: {e}")
            return 0

    def _final_report(self, status: str, exit_code: int, previews: int) -> str:
        """Write the report and the log beside it; returns the report's URI ('' when OUTPUT is unreachable)."""
        if self.fs is None or not self.probe:
            self.log.close(keep=True)
            return ""
        try:
            self._write_report(status, exit_code=exit_code, previews=previews)
            log_path = run_file(self.root, self.run_id, ".log")
            write_atomic(self.fs, log_path, scrub(self.log.text(), self.secrets))
        except Exception:
            log.exception("writing the run report failed")
            self.log.close(keep=True)
            return ""
        self.log.close()
        return qualify(self.fs, self.report_path)

    def _write_report(self, status: str, *, exit_code: int | None = None, previews: int = 0) -> None:
        config = self.config
        report = build_report(
            run_id=self.run_id,
            config=config.redacted(),
            counts=self.counts,
            listing=self.listing.summary(),
            model={**{k: self.probe[k] for k in ("name", "sha256", "label")}, "task": self.task},
            output=self.output,
            started=self.started,
            finished=datetime.now(UTC),
            processing_s=self.processing_s,
            exit_code=exit_code,
            max_error_rate=config.max_error_rate,
            previews=previews,
            warnings=self.warnings,
        )
        report["status"] = status
        report["resumed_runs"] = sorted(self.resumed)
        report["log"] = qualify(self.fs, run_file(self.root, self.run_id, ".log"))
        report["timings_s"] = {name: round(seconds, 3) for name, seconds in self.timings.items()}
        report["ray_data_stats"] = self.stats
        self.report = report
        write_atomic(self.fs, self.report_path, scrub(json.dumps(report, indent=2, default=str), self.secrets) + "\n")

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
        """Run a storage step: a missing INPUT is a bad argument (2); any other failure is one line (3).
        `retry`: start the step over on a transient error (each step reads, or rewrites whole files); not
        for the listing, whose every request is retried already (pipeline.sources)."""
        try:
            return with_retries(fn) if retry else fn()
        except (Cancelled, Failure):
            raise
        except FileNotFoundError as e:
            raise Failure(str(e), 2) from None
        except ValueError as e:  # a manifest without a uri column, a malformed URI
            raise Failure(str(e), 2) from None
        except StorageError as e:
            log.exception("storage failure")
            raise Failure(str(e), 3) from None
        except Exception as e:
            log.exception("storage failure")
            raise Failure(str(storage_failure(e, action, uri, secrets=self.secrets)), 3) from None


ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # Ray colours its task names in exception texts


def _one_line(e: BaseException) -> str:
    plain = ANSI_ESCAPE.sub("", str(e)).strip()
    text = plain.splitlines()[0] if plain else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _local_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # organisation/model, as on the Hugging Face hub


def _parsed_options(options_json: str | None) -> dict[str, Any]:
    try:
        parsed = json.loads(options_json) if options_json else {}
    except json.JSONDecodeError:
        return {"secret": options_json}  # unparseable: treat the whole text as secret
    return parsed if isinstance(parsed, dict) else {}


def _probe_model(config: SegmentConfig, options: dict[str, Any]) -> dict[str, Any]:
    """Load the checkpoint once in the driver (CPU) for what the plan needs: name, checksum, default task,
    preprocessing. A checkpoint that does not load stops the job here, before any work starts."""
    from m2f import model as m2f_model

    try:
        net = m2f_model.load(config.model, "cpu", preset=config.preset, storage_options=options)
    except FileNotFoundError:
        if HUB_NAME.match(config.model) and not os.path.exists(config.model):
            raise ValueError(
                f"--model {config.model!r} looks like a Hugging Face hub name: m2f never downloads models. On a "
                f"machine with internet access run `huggingface-cli download {config.model} --local-dir DIR` "
                "(or save_pretrained), then pass --model DIR (a local folder or a URI every node can read)"
            ) from None
        raise
    except Exception as e:
        raise ValueError(f"cannot load --model {config.model!r}: {e}") from None
    cfg, sha = net.config, net.checkpoint_sha256
    del net
    return {
        "name": cfg.name,
        "sha256": sha,
        "label": model_label(cfg.name, sha),
        "task": cfg.task,
        "preprocess": cfg.preprocess,
    }


def _remove_stale_work(fs: AbstractFileSystem, root: str) -> None:
    """Work manifests of runs that were killed (one run per OUTPUT at a time, so none is live)."""
    folder = posixpath.join(root, RUNS_DIR)
    if not fs.isdir(folder):
        return
    for entry in fs.ls(folder, detail=True):
        if entry["type"] == "directory" and entry["name"].rstrip("/").endswith("-work"):
            fs.rm(entry["name"], recursive=True)
