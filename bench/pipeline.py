"""Pipeline efficiency: `m2f segment` end to end against a bare loop over the same images.

    python -m bench.pipeline [--n 200] [--model demo] [--batch-size 4] [--actors 1] [--threads 1]
                             [--sources local,s3] [--repeats 1] [--ray-cpus N]

The same synthetic scenes (`pipeline.synthetic.generate`, PNG, 128-320 px a side) go through
- the bare loop: `model.load`, then per image read + decode + resize, per group of equal padded size
  `to_batch` + forward + `postprocess`, per image RLE encoding and statistics: everything the job computes,
  in one process, one step after another, nothing written;
- `jobs.segment.job.run` (what `m2f segment` calls) from a local folder to local Parquet, and from a moto S3
  server (a subprocess on 127.0.0.1) to Parquet on that server.
Same model, batch size and torch threads: the actor gets `--threads` CPUs and as many torch threads, the bare
loop `torch.set_num_threads(--threads)`. The bare loop groups images by padded size within windows of
batch size x ACTOR_BATCHES images, as the actor does, so both run the same forward passes and their segment
counts must agree (checked).

Two rates, in images/second:
- "with start-up": images / wall time. Pipeline: the whole `run()`: Ray start, model probe, listing, the Ray
  Data execution (workers, actor start and its model load, fill and drain), report, Ray shutdown. Bare loop:
  `model.load` + the loop.
- "steady": the images after the first forward batch / the time from that batch's rows to the last row (the
  rows' `processed_at` in the Parquet output; per-batch clock readings in the bare loop).
Where the pipeline's time goes comes from its run report: `timings_s` (phases) and `ray_data_stats`
(Ray Data's per-operator statistics).

Models (`--model`): `demo` (model/assets/demo.safetensors; until it exists, the same architecture with random
weights), `random-demo`, `micro` (a few thousand parameters at 64-128 px: for smoke tests), or any checkpoint
path or URI. Random models get zero post-processing thresholds so that they still produce segments to encode.
Models and images come from `bench.workload`, the timed job from `bench.job`, the S3 server from `bench.moto`;
the other benchmarks (memory, scaleout, gpu) use those too.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from bench.common import names, run_and_publish, steady_rate, table
from bench.job import run_pipeline
from bench.moto import moto_s3, moto_storage, new_bucket, upload_folder
from bench.workload import listed_uris, resolve_model, write_images
from m2f.pipeline.storage import Storage

SOURCES = ("local", "s3")
TARGET_RATIO = 0.9  # issue 5: the pipeline at >= 90 % of the bare loop's images/second
RATIOS = ("ratio_with_startup", "ratio_steady")
OPERATOR_SECONDS = ("start_s", "end_s", "span_s", "task_wall_s", "task_cpu_s", "udf_s")


# --- the bare loop --------------------------------------------------------------------------------


def bare_loop(
    uris: Sequence[str],
    model_uri: str,
    *,
    batch_size: int,
    threads: int,
    device: str = "cpu",
    precision: str = "fp32",
    storage: Storage | None = None,
) -> dict[str, Any]:
    """The job's computation on `uris` in one plain loop: what a user writes without Ray.

    Returns the image count, rates with and without start-up (see the module doc), the seconds spent in
    `model.load`, reading + decoding + resizing, the model (to_batch + forward + postprocess) and encoding,
    and the total segment count.
    """
    from m2f import model as m2f
    from m2f.jobs.segment.dataflow import ACTOR_BATCHES
    from m2f.pipeline.decode import decode_image
    from m2f.pipeline.predictor import Predictor

    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        start = time.perf_counter()
        predictor = Predictor(m2f.load(model_uri, device), precision=precision)
        load_s = time.perf_counter() - start
        times = {"decode": 0.0, "model": 0.0, "encode": 0.0}
        done: list[float] = []  # clock reading after each image's row, as the pipeline's processed_at
        segments = 0
        window = batch_size * ACTOR_BATCHES
        for lo in range(0, len(uris), window):
            clock = time.perf_counter()
            originals, images = [], []
            for uri in uris[lo : lo + window]:
                fs, path = (storage or Storage()).open(uri)
                image = decode_image(fs.cat_file(path))  # (H, W, 3) uint8
                originals.append(image.shape[:2])
                images.append(predictor.resize(image))  # (h, w, 3)
            times["decode"] += time.perf_counter() - clock
            for group in predictor.groups(images, batch_size):
                model_start = time.perf_counter()
                predictions = predictor.predict([images[g] for g in group], [originals[g] for g in group])
                encode_start = time.perf_counter()
                times["model"] += encode_start - model_start
                for g, prediction in zip(group, predictions, strict=True):
                    found = predictor.encode(prediction)
                    predictor.stats(found, *originals[g])
                    segments += len(found)
                    done.append(time.perf_counter())
                times["encode"] += time.perf_counter() - encode_start
        loop_s = time.perf_counter() - start - load_s
    finally:
        torch.set_num_threads(threads_before)
    n = len(uris)
    steady, span = steady_rate(done, skip=batch_size)
    return {
        "images": n,
        "wall_s": load_s + loop_s,
        "images_per_s_with_startup": n / (load_s + loop_s) if n else None,
        "images_per_s_steady": steady,
        "steady_span_s": span,
        "load_s": load_s,
        "decode_s": times["decode"],
        "model_s": times["model"],
        "encode_s": times["encode"],
        "segments": segments,
    }


# --- the benchmark --------------------------------------------------------------------------------


def bench(
    *,
    n: int,
    model: str,
    batch_size: int,
    actors: int,
    threads: int,
    sources: Sequence[str],
    repeats: int,
    workdir: Path,
    ray_cpus: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Bare loop, then the pipeline from each source, `repeats` rounds in turn (so drifting load hits all);
    returns every run and the per-mode medians with the pipeline/bare ratios."""
    unknown = set(sources) - set(SOURCES)
    if unknown or not sources:
        raise ValueError(f"sources must be some of {', '.join(SOURCES)}, got {', '.join(sources) or 'none'}")
    model_uri, model_note = resolve_model(model, workdir)
    images = workdir / "images"
    write_images(str(images), n, seed=seed)
    uris = listed_uris(str(images))
    shared = {"batch_size": batch_size, "actors": actors, "threads": threads, "ray_cpus": ray_cpus}
    runs: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        if "s3" in sources:
            endpoint = stack.enter_context(moto_s3(workdir))
            storage = moto_storage(endpoint)
            bucket = new_bucket(endpoint)
            upload_folder(images, f"s3://{bucket}/images", storage)
        for r in range(repeats):
            bare = bare_loop(uris, model_uri, batch_size=batch_size, threads=threads)
            runs.append({"mode": "bare loop", "repeat": r, **bare})
            for source in sources:
                if source == "local":
                    paths = {"input": str(images), "output": str(workdir / f"out-{r}")}
                else:
                    paths = {
                        "input": f"s3://{bucket}/images/",
                        "output": f"s3://{bucket}/out-{r}/",
                        "storage": storage,
                    }
                result = run_pipeline(model_uri=model_uri, **paths, **shared)
                runs.append({"mode": f"pipeline {source}", "repeat": r, **result})
    return {
        "n": n,
        "model": model_note,
        "batch_size": batch_size,
        "actors": actors,
        "threads": threads,
        "sources": list(sources),
        "repeats": repeats,
        "ray_cpus": ray_cpus,
        "summary": summarise(runs),
        "runs": runs,
    }


def summarise(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per mode: median rates over the repeats, and the pipeline's ratios to the bare loop's medians."""
    modes: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        modes.setdefault(run["mode"], []).append(run)

    def med(rows: list[dict[str, Any]], key: str) -> float | None:
        values = [r[key] for r in rows if r.get(key) is not None]
        return statistics.median(values) if values else None

    bare = modes.get("bare loop", [])
    out = []
    for mode, rows in modes.items():
        entry: dict[str, Any] = {"mode": mode, "images": rows[0]["images"], "segments": rows[0]["segments"]}
        for key in ("images_per_s_with_startup", "images_per_s_steady", "wall_s"):
            entry[key] = med(rows, key)
        for key in ("images_per_s_with_startup", "images_per_s_steady"):
            ref = med(bare, key)
            entry[f"ratio_{key.removeprefix('images_per_s_')}"] = (
                entry[key] / ref if ref and entry[key] is not None else None
            )
        out.append(entry)
    return out


def _f(value: Any, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def tables(result: dict[str, Any]) -> str:
    """The printed report: rates and ratios, where the pipeline's time goes, and Ray Data's operators."""
    lines = [
        f"{result['n']} synthetic images, model: {result['model']}, batch {result['batch_size']}, "
        f"{result['actors']} actor(s) x {result['threads']} thread(s)",
        "'with start-up' = images / whole wall time; 'steady' = after the first forward batch (see the module doc)",
        "",
        table(
            ["mode", "images", "segments", "img/s with start-up", "img/s steady", "ratio w/ start-up", "ratio steady"],
            [
                [s["mode"], s["images"], s["segments"]]
                + [_f(s[k]) for k in ("images_per_s_with_startup", "images_per_s_steady", *RATIOS)]
                for s in result["summary"]
            ],
        ),
        f"(target: pipeline >= {TARGET_RATIO:.0%} of the bare loop)",
    ]
    segment_counts = {s["segments"] for s in result["summary"]}
    if len(segment_counts) > 1:
        lines.append(f"WARNING: segment counts differ between modes ({sorted(segment_counts)}): not the same work")
    bare = [r for r in result["runs"] if r["mode"] == "bare loop"]
    if bare:
        lines += ["", "bare loop, seconds:"]
        lines.append(
            table(
                ["repeat", "load", "read+decode+resize", "model", "encode", "total"],
                [
                    [r["repeat"]] + [_f(r[k]) for k in ("load_s", "decode_s", "model_s", "encode_s", "wall_s")]
                    for r in bare
                ],
            )
        )
    pipelines = [r for r in result["runs"] if r["mode"] != "bare loop"]
    if pipelines:
        phases = ["ray_start", "model_probe", "scan_output", "list_and_plan", "processing", "ray_stop"]
        lines += ["", "pipeline, where the wall time goes (seconds; processing = fill and drain + steady):"]
        rows = []
        for r in pipelines:
            t = r["timings_s"]
            other = r["wall_s"] - sum(t.get(p, 0.0) for p in phases)
            rows.append(
                [r["mode"], r["repeat"], _f(r["wall_s"])]
                + [_f(t.get(p)) for p in phases[:4]]
                + [_f(t.get("processing")), _f(r["fill_and_drain_s"]), _f(r["steady_span_s"]), _f(r["actor_model_s"])]
                + [_f(t.get("ray_stop")), _f(other)]
            )
        header = ["mode", "rep", "wall", "ray start", "probe", "scan", "list+plan", "processing", "fill+drain"]
        lines.append(table(header + ["steady", "actor model", "ray stop", "other"], rows))
        for r in pipelines:
            title = f"Ray Data operators, {r['mode']} (repeat {r['repeat']}); start, end: s after execution began:"
            lines += ["", title]
            lines.append(
                table(
                    ["operator", "blocks", "rows", "start", "end", "span", "task wall", "task cpu", "in udf"],
                    [
                        [o["name"][:60], o["blocks"], o["rows_out"]] + [_f(o[k]) for k in OPERATOR_SECONDS]
                        for o in r["operators"]
                    ],
                )
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=200, help="images")
    parser.add_argument("--model", default="demo", help="demo | random-demo | micro | a checkpoint path or URI")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--actors", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads = CPUs per actor")
    parser.add_argument("--sources", default="local,s3", type=names, help="comma-separated: local, s3 (moto)")
    parser.add_argument("--repeats", type=int, default=1, help="rounds of bare loop + pipelines, medians reported")
    parser.add_argument("--ray-cpus", type=int, default=None, help="start Ray with this many logical CPUs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="pipeline", help="results file name")
    run_and_publish(parser.parse_args(argv), bench, tables)


if __name__ == "__main__":
    main()
