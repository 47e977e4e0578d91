"""`m2f segment`: list INPUT, skip what OUTPUT already holds, stream the rest through Ray Data, report.

The Ray Data pipeline, one row per listed image all the way:

    work manifest (Parquet, URIs)  --read_work_files, small blocks-->
    prepare_images (CPU tasks: read, decode, resize)  -->
    Segmenter (actor pool: the model, post-processing, RLE)  --streaming repartition to ROWS_PER_FILE-->
    write_part (CPU tasks: one Parquet part file per block)  --small summaries--> driver

Layout of OUTPUT:
    part-<run_id>-<digest>.parquet the dataset (OUTPUT_SCHEMA), each file written atomically
    _runs/<run_id>.json            the run report
    _runs/<run_id>-work/           the run's work manifest, removed when the run ends
    _previews/<image_id>.png       overlays (--preview N)
    _quarantine/                   unreadable part files found on resume, moved out of the dataset

Exactly once (the ledger is `jobs.resume`): a part file appears whole or not at all (hidden
temporary + rename locally, one PUT on object stores). Before processing, the run reads `image_id` and
`status` of the existing part files: images with an ok row are skipped (unless --overwrite), and every
row of an image about to be processed is removed from its file (an atomic rewrite), so that after the
run each listed image has one row. A run killed at any moment leaves whole part files and at most
hidden temporaries, which the next run removes.
One run per OUTPUT at a time.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import posixpath
import secrets
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import typer
from fsspec import AbstractFileSystem

from jobs.report import RunCounts, build_report, error_category, summary_table
from jobs.resume import (
    RUNS_DIR,
    WorkPlan,
    drop_rows,
    parquet_bytes,
    plan_work,
    read_work_files,
    scan_output,
)
from model.config import TASKS, PreprocessConfig
from pipeline.infer import PRECISIONS, Segmenter, model_label, prepare_images, scrub, secret_values
from pipeline.preview import PREVIEWS_DIR
from pipeline.schema import OUTPUT_SCHEMA, STATUS_OK
from pipeline.sources import list_inputs
from pipeline.storage import (
    open_fs,
    qualify,
    redact,
    storage_options,
    write_atomic,
)

DEVICES = ("auto", "cpu", "cuda")

PREPARE_ROWS = 16  # images per prepare task: enough to overlap reads, small enough to spread over CPUs
ACTOR_BATCHES = 4  # the model actor sees this many forward batches at once, to group equal padded sizes
# Rows per output part file. Larger files suit analysts, smaller ones lose less work to a kill.
ROWS_PER_FILE = int(os.environ.get("M2F_ROWS_PER_FILE", "512"))
PREPARE_MEMORY = 512 * 1024**2  # scheduling hint per prepare task; also keeps Ray from fusing it into the actors

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
    score_threshold: float = 0.0
    max_pixels: int = 100_000_000
    max_error_rate: float = 0.0
    overwrite: bool = False
    preview: int = 0
    progress: bool | None = None  # None: when stderr is a terminal (scheduled jobs' logs get none)
    ray_address: str | None = None

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
        for name in ("gpus_per_actor", "cpus_per_actor", "preview"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
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


# --- the write stage ------------------------------------------------------------------------------

SUMMARY_SCHEMA = pa.schema(
    [
        pa.field("file", pa.string()),
        pa.field("ok", pa.int64()),
        pa.field("error", pa.int64()),
        pa.field("inference_ms", pa.float64()),
        pa.field("error_reasons", pa.string()),  # JSON {category: count}
    ]
)


def write_part(
    table: pa.Table,
    *,
    output: str,
    run_id: str,
    endpoint_url: str | None = None,
    storage_options_json: str | None = None,
) -> pa.Table:
    """Write `table` (OUTPUT_SCHEMA rows) as one part file under `output`; return a one-row summary.

    The name derives from the run and the rows' image ids, so a task that Ray retries after its file was
    written (a worker lost before it returned) rewrites the same file instead of adding a duplicate.
    """
    table = table.select(OUTPUT_SCHEMA.names).cast(OUTPUT_SCHEMA)
    status = table["status"]
    ok = int(pc.sum(pc.equal(status, STATUS_OK)).as_py() or 0)
    reasons = Counter(error_category(r) for r in table["error"].to_pylist() if r is not None)
    inference_ms = pc.sum(pc.if_else(pc.equal(status, STATUS_OK), table["inference_ms"], 0.0)).as_py() or 0.0
    name = ""
    if table.num_rows:
        fs, root = open_fs(output, storage_options(output, endpoint_url, storage_options_json))
        digest = hashlib.sha256("\n".join(table["image_id"].to_pylist()).encode("ascii")).hexdigest()[:16]
        name = f"part-{run_id}-{digest}.parquet"
        write_atomic(fs, posixpath.join(root, name), parquet_bytes(table))
    summary = {
        "file": [name],
        "ok": [ok],
        "error": [table.num_rows - ok],
        "inference_ms": [float(inference_ms)],
        "error_reasons": [json.dumps(dict(reasons))],
    }
    return pa.table(summary, schema=SUMMARY_SCHEMA)


# --- Ray ------------------------------------------------------------------------------------------


@contextlib.contextmanager
def ray_session(address: str | None) -> Iterator[None]:
    """Ray for the length of the block: joined (`address`), reused (already initialised in this process),
    or started locally. Only a Ray started here is shut down here."""
    import ray

    from jobs.cluster import connect

    started = connect(address)
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def resolve_device(requested: str, cluster_gpus: float, gpus_per_actor: float, precision: str = "fp32") -> str:
    """auto -> cuda when the Ray cluster has GPUs (and actors may take one), else cpu. Raises ValueError for
    cuda without a GPU, and for fp16 on CPU."""
    device = requested
    if requested == "auto":
        device = "cuda" if cluster_gpus > 0 and gpus_per_actor > 0 else "cpu"
    elif requested == "cuda":
        if cluster_gpus <= 0:
            raise ValueError("--device cuda, but the Ray cluster has no GPU")
        if gpus_per_actor <= 0:
            raise ValueError("--device cuda needs --gpus-per-actor > 0")
    if precision == "fp16" and device != "cuda":
        raise ValueError("--precision fp16 needs a GPU; use bf16 or fp32 on CPU")
    return device


def capacity_warnings(resources: dict[str, float], config: SegmentConfig, device: str) -> list[str]:
    """What the cluster (as it is now; an autoscaler may add more) cannot give the actor pool."""
    cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    out = []
    if config.actors * config.cpus_per_actor > cpus - 1:
        out.append(
            f"{config.actors} actors x {config.cpus_per_actor:g} CPUs leave less than one of the cluster's {cpus:g} "
            "CPUs for reading, decoding and writing: the job may stall (lower --actors or --cpus-per-actor)"
        )
    if device == "cuda" and config.actors * config.gpus_per_actor > gpus:
        out.append(f"{config.actors} actors x {config.gpus_per_actor:g} GPUs exceed the cluster's {gpus:g} GPUs")
    return out


def _quiet_ray_data(progress: bool | None) -> None:
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = sys.stderr.isatty() if progress is None else progress
    ctx.print_on_execution_start = False
    ctx.enable_auto_log_stats = False
    ctx.verbose_stats_logs = False
    # Ray Data sets its loggers up when first imported, after jobs.cluster quietened them: again here.
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    # Its "Progress bars disabled. To enable, set DataContext..." advice is for library users; ours say --progress.
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)


def execute(
    config: SegmentConfig,
    plan: WorkPlan,
    *,
    fs: AbstractFileSystem,
    preprocess: PreprocessConfig,
    task: str,
    device: str,
    run_id: str,
    counts: RunCounts,
) -> dict[str, Any]:
    """Run the Ray Data pipeline over the work manifest, folding write summaries into `counts`; returns
    Ray Data's statistics of the run (`ray_data_stats`)."""
    import ray.data

    started = time.perf_counter()
    _quiet_ray_data(config.progress)
    io_options = {"endpoint_url": config.endpoint_url, "storage_options_json": config.storage_options_json}
    # The work files are read by a plain task, not read_parquet: in Ray 2.60 that datasource starts 32
    # footer-reading actors for a handful of tiny files, which cost tens of seconds of every run's start.
    ds = ray.data.from_items([{"path": p} for p in plan.files])
    ds = ds.map_batches(
        read_work_files, batch_size=1, batch_format="pyarrow", fn_kwargs={"output": config.output, **io_options}
    )
    # Small blocks spread decoding over every CPU (a work file is one block of up to WORK_CHUNK URIs).
    ds = ds.repartition(target_num_rows_per_block=PREPARE_ROWS)
    ds = ds.map_batches(
        prepare_images,
        batch_size=PREPARE_ROWS,
        batch_format="numpy",
        fn_kwargs={"preprocess": preprocess, "max_pixels": config.max_pixels, **io_options},
        memory=PREPARE_MEMORY,
    )
    gpu = {"num_gpus": config.gpus_per_actor} if device == "cuda" else {}
    ds = ds.map_batches(
        Segmenter,
        batch_size=config.batch_size * ACTOR_BATCHES,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=config.actors),
        num_cpus=config.cpus_per_actor,
        fn_constructor_args=(config.model,),
        fn_constructor_kwargs={
            "run_id": run_id,
            "device": device,
            "task": task,
            "precision": config.precision,
            "batch_size": config.batch_size,
            "score_threshold": config.score_threshold,
            "preset": config.preset,
            "storage_options": storage_options(config.model, config.endpoint_url, config.storage_options_json),
            "num_threads": max(1, int(config.cpus_per_actor)),
        },
        **gpu,
    )
    # Coalesce the actors' small outputs into file-sized blocks, streaming (no barrier): one block, one file.
    ds = ds.repartition(target_num_rows_per_block=ROWS_PER_FILE, strict=True)
    ds = ds.map_batches(
        write_part,
        batch_size=None,
        batch_format="pyarrow",
        fn_kwargs={"output": config.output, "run_id": run_id, **io_options},
        num_cpus=0.5,  # mostly waiting on storage
    )
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        for summary in batch.to_pylist():
            counts.add_summary(summary)
    return ray_data_stats(ds, started)


def ray_data_stats(ds: Any, started: float | None = None) -> dict[str, Any]:
    """Where an executed dataset spent its time, for the run report: the text `ds.stats()` prints, and per
    operator in pipeline order its blocks, rows out, wall-clock span (first task start to last task end) and
    summed task times, in seconds.

    `start_s`/`end_s` place each operator's first task start and last task end in time, in seconds after
    `started` (a `time.perf_counter()` reading of this process; Ray's task clocks are the same monotonic clock
    on one machine, so on a cluster they are only comparable among tasks of the driver's node), or after the
    first task's start without it. Built on Ray's developer API (`get_stats_summary`): whatever a Ray version
    no longer offers is left out, and no failure here fails a run.
    """
    try:
        summary = ds.get_stats_summary()
        out: dict[str, Any] = {"text": summary.to_string()}
        found, stack = [], [summary]
        while stack:  # the last operator first, then its parents
            node = stack.pop()
            found.extend(reversed(node.operators_stats))
            stack.extend(node.parents)
        ops = found[::-1]
        starts = [op.earliest_start_time for op in ops if op.earliest_start_time is not None]
        origin = started if started is not None else min(starts, default=None)
        out["operators"] = [_operator_stats(op, origin) for op in ops]
        return out
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"}


def _operator_stats(op: Any, origin: float | None) -> dict[str, Any]:
    def total(name: str) -> float | None:
        stat = getattr(op, name, None)
        return round(float(stat.sum), 4) if stat is not None else None

    def offset(t: float | None) -> float | None:
        return round(t - origin, 4) if t is not None and origin is not None else None

    rows, wall = getattr(op, "output_num_rows", None), getattr(op, "wall_time", None)
    return {
        "name": op.operator_name,
        "blocks": int(wall.count) if wall is not None else None,
        "rows_out": int(rows.sum) if rows is not None else None,
        "start_s": offset(getattr(op, "earliest_start_time", None)),
        "end_s": offset(getattr(op, "latest_end_time", None)),
        "span_s": round(float(op.time_total_s), 4),
        "task_wall_s": total("wall_time"),
        "task_cpu_s": total("cpu_time"),
        "udf_s": total("function_body_time"),  # inside the stage functions, ours and Ray Data's
    }


# --- the job --------------------------------------------------------------------------------------


def run(config: SegmentConfig) -> int:
    """Run the job; returns the exit code: 0 when the error rate stays within --max-error-rate, 1 above it,
    2 for bad arguments (nothing done), 3 when the job itself failed (Ray, storage; a re-run resumes)."""
    started = datetime.now(UTC)
    run_id = new_run_id()
    known_secrets = secret_values(_parsed_options(config.storage_options_json))
    warnings: list[str] = []

    def say(message: str, *, err: bool = False) -> None:
        typer.echo(scrub(message, known_secrets), err=err)

    def warn(message: str) -> None:
        warnings.append(scrub(message, known_secrets))
        say(f"warning: {message}", err=True)

    try:
        config.validate()
        options = {
            name: storage_options(uri, config.endpoint_url, config.storage_options_json)
            for name, uri in (("input", config.input), ("output", config.output), ("model", config.model))
        }
        listing = list_inputs(config.input, options["input"])
        fs, root = open_fs(config.output, options["output"])
        if fs.isfile(root):
            raise ValueError(f"OUTPUT {config.output!r} is a file; give a folder or prefix")
        clock = time.perf_counter()
        probe = _probe_model(config, options["model"])
        probe_s = time.perf_counter() - clock
    except (ValueError, FileNotFoundError) as e:
        say(f"error: {e}", err=True)
        return 2
    task = config.task or probe["task"]
    output = qualify(fs, root)

    clock = time.perf_counter()
    existing = scan_output(fs, root, model=probe["label"], task=task)
    scan_s = time.perf_counter() - clock
    if existing.temporaries_removed:
        say(f"removed {existing.temporaries_removed} temporary file(s) left by an interrupted run")
    for path in existing.quarantined:
        warn(f"unreadable part file moved to {path}")
    if existing.other_model_rows and not config.overwrite:
        warn(
            f"{existing.other_model_rows} existing ok rows were made with another model or task; they are kept "
            "(use --overwrite to redo them, or another OUTPUT)"
        )
    if existing.duplicate_ok_rows:
        warn(f"{existing.duplicate_ok_rows} images have more than one ok row in {output}")

    work_dir = posixpath.join(root, RUNS_DIR, f"{run_id}-work")
    counts = RunCounts()
    processing_s = 0.0
    failure: str | None = None
    timings: dict[str, float] = {"model_probe": probe_s, "scan_output": scan_s}  # seconds per phase
    stats: dict[str, Any] | None = None
    try:
        _remove_stale_work(fs, root)
        clock = time.perf_counter()
        try:
            plan = plan_work(listing, existing.ok_keys, overwrite=config.overwrite, fs=fs, folder=work_dir)
        except (ValueError, FileNotFoundError) as e:  # a manifest without a uri column, a vanished folder
            say(f"error: {e}", err=True)
            return 2
        timings["list_and_plan"] = time.perf_counter() - clock
        counts.listed, counts.duplicates = plan.listed, plan.duplicates
        counts.already_done, counts.pending = plan.already_done, len(plan.pending)
        say(
            f"m2f segment {run_id}: {plan.listed} images listed ({listing.skipped_count} other files skipped), "
            f"{plan.already_done} already done, {counts.pending} to process with {probe['label']} ({task})"
        )

        if not plan.listed:
            warn(f"no images found in {config.input} (image extensions: jpg, jpeg, png, webp, bmp, gif, tif, tiff)")

        def drop_earlier_rows() -> None:
            dropped = drop_rows(
                fs, existing.parts if config.overwrite else existing.with_errors, plan.pending, existing.ok_keys
            )
            if dropped:
                say(f"removed {dropped} earlier row(s) of images this run redoes")

        if not counts.pending:
            drop_earlier_rows()
        else:
            clock = time.perf_counter()
            with ray_session(config.ray_address):
                import ray

                timings["ray_start"] = time.perf_counter() - clock
                try:
                    resources = ray.cluster_resources()
                    device = resolve_device(
                        config.device, resources.get("GPU", 0), config.gpus_per_actor, config.precision
                    )
                except ValueError as e:
                    say(f"error: {e}", err=True)
                    return 2
                for message in capacity_warnings(resources, config, device):
                    warn(message)
                drop_earlier_rows()
                start = time.perf_counter()
                try:
                    stats = execute(
                        config,
                        plan,
                        fs=fs,
                        preprocess=probe["preprocess"],
                        task=task,
                        device=device,
                        run_id=run_id,
                        counts=counts,
                    )
                except Exception as e:  # Ray or storage failed: what was written stays, a re-run resumes
                    say(f"error: the job failed: {type(e).__name__}: {e}", err=True)
                    failure = f"the job failed: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e) else ''}"
                processing_s = timings["processing"] = time.perf_counter() - start
                clock = time.perf_counter()
            timings["ray_stop"] = time.perf_counter() - clock
    finally:
        with contextlib.suppress(Exception):
            fs.rm(work_dir, recursive=True)
    if failure is not None:
        warnings.append(scrub(failure, known_secrets))
    elif counts.processed != counts.pending:
        warn(f"{counts.pending} images were to be processed but {counts.processed} rows came back")

    previews = 0
    if config.preview and failure is None:
        from pipeline.preview import write_previews

        try:
            previews = write_previews(
                fs,
                root,
                config.preview,
                endpoint_url=config.endpoint_url,
                storage_options_json=config.storage_options_json,
                max_pixels=config.max_pixels,
            )
        except Exception as e:  # previews are a convenience: they never fail a run
            warn(f"previews failed: {type(e).__name__}: {e}")

    exit_code = 3 if failure is not None else 0 if counts.error_rate <= config.max_error_rate else 1
    report_path = posixpath.join(root, RUNS_DIR, f"{run_id}.json")
    report = build_report(
        run_id=run_id,
        config=config.redacted(),
        counts=counts,
        listing=listing.summary(),
        model={"name": probe["name"], "sha256": probe["sha256"], "label": probe["label"], "task": task},
        output=output,
        started=started,
        finished=datetime.now(UTC),
        processing_s=processing_s,
        exit_code=exit_code,
        max_error_rate=config.max_error_rate,
        previews=previews,
        warnings=warnings,
    )
    report["timings_s"] = {name: round(seconds, 3) for name, seconds in timings.items()}
    report["ray_data_stats"] = stats
    write_atomic(fs, report_path, scrub(json.dumps(report, indent=2, default=str), known_secrets) + "\n")

    report_uri = qualify(fs, report_path)
    say(
        summary_table(
            counts, skipped_files=listing.skipped_count, processing_s=processing_s, output=output, report=report_uri
        )
    )
    if previews:
        say(f"  previews: {qualify(fs, posixpath.join(root, PREVIEWS_DIR))} ({previews} PNGs)")
    if exit_code == 1:
        say(
            f"error rate {counts.error_rate:.4f} ({counts.error} errors, {counts.ok + counts.already_done} ok) "
            f"exceeds --max-error-rate {config.max_error_rate}",
            err=True,
        )
    return exit_code


def _parsed_options(options_json: str | None) -> dict[str, Any]:
    try:
        parsed = json.loads(options_json) if options_json else {}
    except json.JSONDecodeError:
        return {"secret": options_json}  # unparseable: treat the whole text as secret
    return parsed if isinstance(parsed, dict) else {}


def _probe_model(config: SegmentConfig, options: dict[str, Any]) -> dict[str, Any]:
    """Load the checkpoint once in the driver (CPU) for what the plan needs: name, checksum, default task,
    preprocessing. A checkpoint that does not load stops the job here, before any work starts."""
    import model as m2f_model

    try:
        net = m2f_model.load(config.model, "cpu", preset=config.preset, storage_options=options)
    except FileNotFoundError:
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
