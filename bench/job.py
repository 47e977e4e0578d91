"""`m2f segment` as the benchmarks run it: `jobs.segment.job.run` from INPUT to a fresh OUTPUT, timed, with its
rates, phases and Ray Data statistics read back from the run report and the part files."""

from __future__ import annotations

import json
import os
import posixpath
import time
from pathlib import Path
from typing import Any

import fsspec
import numpy as np

from bench.common import steady_rate
from m2f.pipeline.storage import Storage


def run_pipeline(
    input: str,
    output: str,
    model_uri: str,
    *,
    batch_size: int,
    actors: int = 1,
    threads: int = 1,
    device: str = "cpu",
    precision: str = "fp32",
    storage: Storage | None = None,
    ray_cpus: int | None = None,
) -> dict[str, Any]:
    """`jobs.segment.job.run` from `input` to a fresh `output`, timed; returns rates, phases and Ray Data's stats.

    Ray: reused when this process already runs one (tests), started here with `ray_cpus` logical CPUs when
    given (timed as the run's ray_start/ray_stop), else started by the job itself as `m2f segment` does.
    Raises ValueError when the actors would leave no CPU for the prepare tasks (the job would stall), and
    RuntimeError when the job does not exit 0. `storage` reaches `input`, `output` and the model (None: local).
    """
    import ray

    from m2f.jobs.common.cluster import connect
    from m2f.jobs.segment.job import SegmentConfig, run

    cpus = ray.cluster_resources().get("CPU", 0) if ray.is_initialized() else ray_cpus or os.cpu_count() or 1
    if actors * threads > cpus - 1:
        raise ValueError(
            f"{actors} actors x {threads} CPUs leave none of Ray's {cpus:g} CPUs for decoding: the job would stall "
            "(lower --actors or --threads, or give Ray more logical CPUs with --ray-cpus)"
        )
    config = SegmentConfig(
        input=input,
        output=output,
        model=model_uri,
        actors=actors,
        batch_size=batch_size,
        device=device,
        cpus_per_actor=float(threads),
        precision=precision,
        # The config holds what `m2f segment` is given: the endpoint and the options as JSON.
        endpoint_url=storage.endpoint_url if storage else None,
        storage_options_json=json.dumps(storage.user_options) if storage and storage.user_options else None,
        progress=False,  # as a scheduled job runs; bars would cost the driver CPU only on a terminal
    )
    own_ray = ray_cpus is not None and not ray.is_initialized()
    ours: dict[str, float] = {}
    start = time.perf_counter()
    if own_ray:
        connect(None, num_cpus=ray_cpus)
        ours["ray_start"] = time.perf_counter() - start
    try:
        code = run(config)
    finally:
        if own_ray:
            clock = time.perf_counter()
            ray.shutdown()
            ours["ray_stop"] = time.perf_counter() - clock
    wall = time.perf_counter() - start
    if code != 0:
        raise RuntimeError(f"m2f segment {input} {output} exited with {code}")
    return _read_back(output, config.storage.options(output), wall, ours, skip=batch_size * actors)


def _read_back(
    output: str, options: dict[str, Any], wall: float, ours: dict[str, float], *, skip: int
) -> dict[str, Any]:
    """A finished run's figures, from its report and part files; `ours`: the Ray start/stop timed here."""
    from m2f.pipeline.output import RUNS_DIR, list_part_files, read_part

    fs, root = fsspec.core.url_to_fs(output, **options)
    fs.invalidate_cache()
    (report_path,) = fs.glob(posixpath.join(root, RUNS_DIR, "*.json"))
    report = json.loads(fs.cat_file(report_path))
    stamps, segments, ok = [], 0, 0
    for path in list_part_files(fs, root):
        part = read_part(fs, path, columns=["status", "processed_at", "segment_count"])
        is_ok = np.asarray(part["status"].to_pylist()) == "ok"
        ok += int(is_ok.sum())
        seconds = part["processed_at"].to_numpy().astype("datetime64[us]").astype(np.int64) / 1e6
        stamps.extend(seconds[is_ok].tolist())
        segments += int(np.nansum(np.asarray(part["segment_count"].to_pylist(), dtype=float)))
    steady, span = steady_rate(stamps, skip=skip)
    timings = {**report.get("timings_s", {}), **ours}
    stats = report.get("ray_data_stats") or {}
    processing = timings.get("processing", 0.0)
    mean_ms = report["throughput"].get("mean_inference_ms") or 0.0
    return {
        "images": ok,
        "errors": report["counts"]["error"],
        "wall_s": wall,
        "images_per_s_with_startup": ok / wall if wall > 0 else None,
        "images_per_s_steady": steady,
        "steady_span_s": span,
        "fill_and_drain_s": processing - span if span is not None else None,
        "actor_model_s": mean_ms * ok / 1000.0,  # to_batch + forward + postprocess, summed over the rows
        "segments": segments,
        "timings_s": timings,
        "operators": stats.get("operators", []),
        "ray_data_stats": stats.get("text", stats.get("error", "")),
        "run_id": report["run_id"],
    }


def run_pipeline_to_file(kwargs: dict[str, Any], result_path: str) -> None:
    """`run_pipeline(**kwargs)` written as JSON to `result_path`: the target of a fresh process (bench.memory)."""
    result = run_pipeline(**kwargs)
    Path(result_path).write_text(json.dumps(result, default=str))
