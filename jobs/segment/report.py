"""The end of a segmentation run: the counts, the summary table printed to the terminal, and the run
report `OUTPUT/_runs/<run_id>.json` (configuration without secrets, counts, skipped files, throughput,
versions)."""

from __future__ import annotations

import platform
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from importlib import metadata
from typing import Any

import numpy as np

from m2f.jobs.segment.commit import Commit
from m2f.jobs.segment.resume import WorkPlan


@dataclass
class RunCounts:
    """What one run saw and did. `ok`/`error` count rows written by this run."""

    listed: int = 0  # image URIs the listing yielded (duplicates included)
    duplicates: int = 0  # URIs listed more than once (a manifest repeating itself): processed once
    already_done: int = 0  # images with an ok row from an earlier run, skipped
    pending: int = 0  # images this run set out to process
    ok: int = 0
    error: int = 0
    files_written: int = 0
    error_reasons: Counter[str] = field(default_factory=Counter)  # by category ("not an image", ...)
    inference_ms: float = 0.0  # summed model time of the ok rows

    def add_commit(self, commit: Commit) -> None:
        """Fold in one committed part file (segment.commit)."""
        self.ok += commit.ok
        self.error += commit.error
        self.files_written += 1
        self.inference_ms += commit.inference_ms
        self.error_reasons.update(commit.error_reasons)

    @property
    def processed(self) -> int:
        return self.ok + self.error

    @property
    def error_rate(self) -> float:
        """Errors among the listed images' current rows: this run's errors over this run's rows plus
        the ok rows of earlier runs (an image done yesterday is as good as one done today)."""
        total = self.ok + self.error + self.already_done
        return self.error / total if total else 0.0


class Tally:
    """This run's counts, and the keys of the images it committed: set from the plan, then told of each part
    file by the part writer's thread (`add`)."""

    def __init__(self) -> None:
        self.counts = RunCounts()
        self._keys: list[np.ndarray] = []  # (N,) uint64 keys of each committed part file

    def plan(self, work: WorkPlan) -> None:
        counts = self.counts
        counts.listed, counts.duplicates = work.listed, work.duplicates
        counts.already_done, counts.pending = work.already_done, len(work.pending)

    def add(self, commit: Commit) -> None:
        self.counts.add_commit(commit)
        self._keys.append(commit.keys)

    @property
    def committed(self) -> bool:
        return bool(self._keys)

    def keys(self) -> np.ndarray:
        """(N,) uint64 sorted: every image this run has committed a row for."""
        return np.unique(np.concatenate(self._keys)) if self._keys else np.empty(0, np.uint64)


def versions() -> dict[str, str]:
    """Versions of Python and of the packages that shape the output."""
    out = {"python": platform.python_version()}
    for name in ("m2f", "torch", "ray", "numpy", "pyarrow", "pillow", "pycocotools", "fsspec", "s3fs"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def build_report(
    *,
    run_id: str,
    config: dict[str, Any],
    counts: RunCounts,
    listing: dict[str, Any],
    model: dict[str, Any],
    output: str,
    started: datetime,
    finished: datetime,
    processing_s: float,
    exit_code: int,
    max_error_rate: float,
    previews: int,
    warnings: list[str],
) -> dict[str, Any]:
    """The run report as a JSON-ready dict. `config` must already be redacted."""
    return {
        "run_id": run_id,
        "started_at": started.isoformat(),
        "finished_at": finished.isoformat(),
        "elapsed_s": round((finished - started).total_seconds(), 3),
        "output": output,
        "config": config,
        "model": model,
        "counts": {
            "listed": counts.listed,
            "duplicates": counts.duplicates,
            "already_done": counts.already_done,
            "pending": counts.pending,
            "ok": counts.ok,
            "error": counts.error,
            "error_reasons": dict(sorted(counts.error_reasons.items())),
            "files_written": counts.files_written,
        },
        "error_rate": counts.error_rate,
        "max_error_rate": max_error_rate,
        "exit_code": exit_code,
        "skipped_files": {
            "count": listing.get("skipped", 0),
            "by_extension": listing.get("skipped_by_extension", {}),
            "sample": listing.get("skipped_sample", []),
        },
        "throughput": {
            "processing_s": round(processing_s, 3),
            "images_per_s": round(counts.processed / processing_s, 3) if processing_s > 0 else None,
            "mean_inference_ms": round(counts.inference_ms / counts.ok, 3) if counts.ok else None,
        },
        "previews": previews,
        "warnings": warnings,
        "versions": versions(),
    }


def summary_table(counts: RunCounts, *, skipped_files: int, processing_s: float, output: str, report: str) -> str:
    """The table printed at the end of a run."""
    rate = f"{counts.processed / processing_s:.2f}" if processing_s > 0 and counts.processed else "-"
    rows = [
        ("images ok", str(counts.ok)),
        ("images error", str(counts.error)),
        ("skipped (already done)", str(counts.already_done)),
        ("non-image files skipped", str(skipped_files)),
    ]
    if counts.duplicates:
        rows.append(("duplicate URIs ignored", str(counts.duplicates)))
    rows += [
        ("processing time", f"{processing_s:.1f} s (Ray Data: workers and model start-up included)"),
        ("images / s", rate),
        ("error rate", f"{counts.error_rate:.4f}"),
        ("output", output),
        ("run report", report),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [f"  {name:<{width}}  {value}" for name, value in rows]
    if counts.error_reasons:
        lines.append("  errors by reason:")
        lines += [f"    {n:>6}  {reason}" for reason, n in counts.error_reasons.most_common()]
    return "\n".join(lines)


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
