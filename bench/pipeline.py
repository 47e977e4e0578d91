"""Pipeline efficiency: `m2f segment` end to end against a bare loop over the same images.

    python -m bench.pipeline [--n 200] [--model demo] [--batch-size 4] [--actors 1] [--threads 1]
                             [--sources local,s3] [--repeats 1] [--ray-cpus N]

The same synthetic scenes (`pipeline.training.synthetic.generate`, PNG, 128-320 px a side) go through
- the bare loop: `model.load`, then per image read + decode + resize, per group of equal padded size
  `to_batch` + forward + `postprocess`, per image RLE encoding and statistics: everything the job computes,
  in one process, one step after another, nothing written;
- `jobs.segment.run` (what `m2f segment` calls) from a local folder to local Parquet, and from a moto S3
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
The other benchmarks (memory, scaleout, gpu) reuse the helpers here.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import posixpath
import statistics
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pyarrow.parquet as pq
import torch

from bench.common import publish, table
from tests.moto_server import moto_server

SOURCES = ("local", "s3")
MOTO_KEY, MOTO_SECRET = "m2f-bench-key", "m2f-bench-secret"  # moto accepts any; never real credentials
TARGET_RATIO = 0.9  # issue 5: the pipeline at >= 90 % of the bare loop's images/second


# --- models ---------------------------------------------------------------------------------------


def micro_config() -> Any:
    """A Mask2Former of a few thousand parameters on 64-128 px inputs: the smoke tests' model."""
    from m2f.model.config import (
        DecoderConfig,
        ModelConfig,
        PixelDecoderConfig,
        PostprocessConfig,
        PreprocessConfig,
        ResNetConfig,
    )

    names, is_thing, ids = _synthetic_classes()
    return ModelConfig(
        name="micro-random",
        backbone=ResNetConfig(depths=(1, 1, 1, 1), stem_channels=8, widths=(16, 32, 64, 128), norm="bn"),
        num_classes=len(names),
        class_names=names,
        is_thing=is_thing,
        category_ids=ids,
        pixel_decoder=PixelDecoderConfig(conv_dim=32, mask_dim=32, num_layers=1, num_heads=4, ffn_dim=64, num_groups=8),
        decoder=DecoderConfig(hidden_dim=32, num_queries=8, num_heads=4, ffn_dim=64, num_layers=2),
        preprocess=PreprocessConfig(min_size=64, max_size=128),
        postprocess=PostprocessConfig(object_mask_threshold=0.0, overlap_threshold=0.0),
    )


def demo_architecture_config() -> Any:
    """The bundled demo model's architecture and classes (`m2f train --arch tiny --image-size 256` on the
    synthetic scenes), for random weights while model/assets/demo.safetensors does not exist."""
    from m2f.model.config import ModelConfig, PostprocessConfig, PreprocessConfig
    from m2f.model.presets import ARCHITECTURES

    arch = ARCHITECTURES["tiny"]
    names, is_thing, ids = _synthetic_classes()
    return ModelConfig(
        name="tiny-random",
        backbone=arch.backbone,
        pixel_decoder=arch.pixel_decoder,
        decoder=arch.decoder,
        num_classes=len(names),
        class_names=names,
        is_thing=is_thing,
        category_ids=ids,
        preprocess=PreprocessConfig(min_size=256, max_size=256),
        postprocess=PostprocessConfig(object_mask_threshold=0.0, overlap_threshold=0.0),
    )


def _synthetic_classes() -> tuple[tuple[str, ...], tuple[bool, ...], tuple[int, ...]]:
    from m2f.pipeline.training.synthetic import SYNTHETIC_CATEGORIES

    return (
        tuple(c["name"] for c in SYNTHETIC_CATEGORIES),
        tuple(bool(c["isthing"]) for c in SYNTHETIC_CATEGORIES),
        tuple(int(c["id"]) for c in SYNTHETIC_CATEGORIES),
    )


def save_random(config: Any, path: Path, seed: int = 0) -> str:
    """`config` with random weights (seeded) saved in the project's format at `path`; returns the path."""
    from m2f.model import build_model, save

    torch.manual_seed(seed)
    save(build_model(config), path)
    return str(path)


def resolve_model(name: str, folder: Path) -> tuple[str, str]:
    """`--model` -> (what to pass as `--model`, a description for the results). Random models go to `folder`."""
    from m2f.model import DEMO_MODEL

    if name == "demo" and DEMO_MODEL.exists():
        return "demo", f"bundled demo model ({DEMO_MODEL.name})"
    if name in ("demo", "random-demo"):
        why = " (model/assets/demo.safetensors does not exist yet)" if name == "demo" else ""
        path = save_random(demo_architecture_config(), folder / "random-demo.safetensors")
        return path, f"demo architecture with random weights{why}"
    if name == "micro":
        return save_random(micro_config(), folder / "micro.safetensors"), "micro model, random weights (smoke size)"
    return name, name


# --- images and storage ---------------------------------------------------------------------------


def write_images(
    target: str, n: int, *, seed: int = 0, distinct: int | None = None, storage_options: dict[str, Any] | None = None
) -> None:
    """`n` synthetic scenes as `target/img-NNNNNN.png` (a folder or prefix, any fsspec URI).

    `distinct` scenes (default: n) are drawn with `pipeline.training.synthetic.generate` and repeated in turn to make up
    `n` files; each file is its own URI and so its own row.
    """
    from m2f.pipeline.training.synthetic import generate

    k = n if distinct is None else max(1, min(n, distinct))
    with tempfile.TemporaryDirectory() as scratch:
        generate(scratch, k, seed)
        scenes = [p.read_bytes() for p in sorted(Path(scratch, "images").glob("*.png"))]
    fs, root = fsspec.core.url_to_fs(target, **(storage_options or {}))
    fs.makedirs(root, exist_ok=True)
    for i in range(n):
        fs.pipe_file(posixpath.join(root, f"img-{i:06d}.png"), scenes[i % k])


def listed_uris(input: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """The image URIs `m2f segment` lists under `input`, in its order."""
    from m2f.pipeline.sources import list_inputs

    return list(list_inputs(input, storage_options or {}).uris())


@contextlib.contextmanager
def moto_s3(log_dir: Path) -> Iterator[str]:
    """A moto S3 server (`tests.moto_server`) for the length of the block; yields its endpoint URL.

    127.0.0.1 joins NO_PROXY meanwhile (processes started inside, Ray's workers too, inherit it).
    """
    saved = {name: os.environ.get(name) for name in ("NO_PROXY", "no_proxy")}
    for name, value in saved.items():
        os.environ[name] = ",".join(filter(None, [value, "127.0.0.1", "localhost"]))
    try:
        with moto_server(log_dir) as url:
            yield url
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def moto_options_json() -> str:
    """`--storage-options` for the moto server: fixed fake credentials, so nothing depends on the environment."""
    return json.dumps({"key": MOTO_KEY, "secret": MOTO_SECRET, "client_kwargs": {"region_name": "us-east-1"}})


def new_bucket(endpoint_url: str) -> str:
    """A fresh, empty bucket on the moto server (boto3 comes with moto)."""
    import boto3

    name = f"m2f-bench-{uuid.uuid4().hex[:12]}"
    client = boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        region_name="us-east-1",
        aws_access_key_id=MOTO_KEY,
        aws_secret_access_key=MOTO_SECRET,
    )
    client.create_bucket(Bucket=name)
    return name


def upload_folder(folder: Path, target: str, storage_options: dict[str, Any]) -> None:
    """Every file directly in `folder` to the prefix `target`."""
    fs, root = fsspec.core.url_to_fs(target, **storage_options)
    for path in sorted(folder.iterdir()):
        if path.is_file():
            fs.put_file(str(path), posixpath.join(root, path.name))


# --- the bare loop --------------------------------------------------------------------------------


def bare_loop(
    uris: Sequence[str],
    model_uri: str,
    *,
    batch_size: int,
    threads: int,
    device: str = "cpu",
    precision: str = "fp32",
    storage_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The job's computation on `uris` in one plain loop: what a user writes without Ray.

    Returns the image count, rates with and without start-up (see the module doc), the seconds spent in
    `model.load`, reading + decoding + resizing, the model (to_batch + forward + postprocess) and encoding,
    and the total segment count.
    """
    from m2f import model as m2f
    from m2f.jobs.dataflow import ACTOR_BATCHES
    from m2f.model.postprocess import postprocess
    from m2f.model.preprocess import group_by_padded_size, resize_image, to_batch
    from m2f.pipeline.decode import decode_image
    from m2f.pipeline.encode import encode_segments, image_stats
    from m2f.pipeline.infer import PRECISIONS
    from m2f.pipeline.storage import open_fs

    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        start = time.perf_counter()
        net = m2f.load(model_uri, device)
        load_s = time.perf_counter() - start
        cfg, dev, dtype = net.config, torch.device(device), PRECISIONS[precision]
        times = {"decode": 0.0, "model": 0.0, "encode": 0.0}
        done: list[float] = []  # clock reading after each image's row, as the pipeline's processed_at
        segments = 0
        window = batch_size * ACTOR_BATCHES
        for lo in range(0, len(uris), window):
            clock = time.perf_counter()
            originals, images = [], []
            for uri in uris[lo : lo + window]:
                fs, path = open_fs(uri, storage_options or {})
                image = decode_image(fs.cat_file(path))  # (H, W, 3) uint8
                originals.append(image.shape[:2])
                images.append(resize_image(image, cfg.preprocess))  # (h, w, 3)
            times["decode"] += time.perf_counter() - clock
            sizes = [image.shape[:2] for image in images]
            for group in group_by_padded_size(sizes, batch_size, cfg.preprocess.size_divisibility):
                model_start = time.perf_counter()
                with torch.inference_mode():
                    pixel_values, image_sizes = to_batch([images[g] for g in group], cfg.preprocess, device=dev)
                    autocast = torch.autocast(dev.type, dtype=dtype) if dtype else contextlib.nullcontext()
                    with autocast:
                        out = net(pixel_values)  # pixel_values (B, 3, Hp, Wp)
                    results = postprocess(
                        cfg.task,
                        out.class_logits.float(),
                        out.mask_logits.float(),
                        config=cfg,
                        image_sizes=image_sizes,
                        output_sizes=[originals[g] for g in group],
                        padded_size=tuple(pixel_values.shape[-2:]),
                    )
                    results = [(r.masks.cpu().numpy(), r.labels.cpu().numpy(), r.scores.cpu().numpy()) for r in results]
                encode_start = time.perf_counter()
                times["model"] += encode_start - model_start
                for g, (masks, labels, scores) in zip(group, results, strict=True):
                    found = encode_segments(
                        masks,
                        labels,
                        scores,
                        class_names=cfg.class_names,
                        is_thing=cfg.is_thing,
                        category_ids=cfg.category_ids or None,
                    )
                    image_stats(found, *originals[g], semantic=cfg.task == "semantic")
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


def steady_rate(times: Sequence[float], skip: int) -> tuple[float | None, float | None]:
    """(images/s, span in s) after the first `skip` rows: rows finished after the `skip`-th one over the time
    from it to the last. Drops start-up (the first forward batch waits for everything before it) and nothing
    else; None when there are too few rows."""
    times = sorted(times)
    skip = max(1, min(skip, len(times) - 1))
    if len(times) < 2:
        return None, None
    span = times[-1] - times[skip - 1]
    return ((len(times) - skip) / span if span > 0 else None), span


# --- the pipeline ---------------------------------------------------------------------------------


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
    endpoint_url: str | None = None,
    storage_options_json: str | None = None,
    ray_cpus: int | None = None,
) -> dict[str, Any]:
    """`jobs.segment.run` from `input` to a fresh `output`, timed; returns rates, phases and Ray Data's stats.

    Ray: reused when this process already runs one (tests), started here with `ray_cpus` logical CPUs when
    given (timed as the run's ray_start/ray_stop), else started by the job itself as `m2f segment` does.
    Raises ValueError when the actors would leave no CPU for the prepare tasks (the job would stall), and
    RuntimeError when the job does not exit 0.
    """
    import ray

    from m2f.jobs.cluster import connect
    from m2f.jobs.segment import SegmentConfig, run

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
        endpoint_url=endpoint_url,
        storage_options_json=storage_options_json,
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

    from m2f.pipeline.storage import storage_options

    fs, root = fsspec.core.url_to_fs(output, **storage_options(output, endpoint_url, storage_options_json))
    fs.invalidate_cache()
    (report_path,) = fs.glob(posixpath.join(root, "_runs", "*.json"))
    report = json.loads(fs.cat_file(report_path))
    stamps, segments, ok = [], 0, 0
    for path in fs.glob(posixpath.join(root, "part-*.parquet")):
        with fs.open(path, "rb") as f:
            part = pq.read_table(f, columns=["status", "processed_at", "segment_count"])
        is_ok = np.asarray(part["status"].to_pylist()) == "ok"
        ok += int(is_ok.sum())
        seconds = part["processed_at"].to_numpy().astype("datetime64[us]").astype(np.int64) / 1e6
        stamps.extend(seconds[is_ok].tolist())
        segments += int(np.nansum(np.asarray(part["segment_count"].to_pylist(), dtype=float)))
    steady, span = steady_rate(stamps, skip=batch_size * actors)
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
            options_json = moto_options_json()
            bucket = new_bucket(endpoint)
            from m2f.pipeline.storage import storage_options

            upload_folder(images, f"s3://{bucket}/images", storage_options("s3://", endpoint, options_json))
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
                        "endpoint_url": endpoint,
                        "storage_options_json": options_json,
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
                [
                    s["mode"],
                    s["images"],
                    s["segments"],
                    _f(s["images_per_s_with_startup"]),
                    _f(s["images_per_s_steady"]),
                    _f(s["ratio_with_startup"]),
                    _f(s["ratio_steady"]),
                ]
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
                        [
                            o["name"][:60],
                            o["blocks"],
                            o["rows_out"],
                            _f(o["start_s"]),
                            _f(o["end_s"]),
                            _f(o["span_s"]),
                            _f(o["task_wall_s"]),
                            _f(o["task_cpu_s"]),
                            _f(o["udf_s"]),
                        ]
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
    parser.add_argument("--sources", default="local,s3", help="comma-separated: local, s3 (moto)")
    parser.add_argument("--repeats", type=int, default=1, help="rounds of bare loop + pipelines, medians reported")
    parser.add_argument("--ray-cpus", type=int, default=None, help="start Ray with this many logical CPUs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="pipeline", help="results file name")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="m2f-bench-") as tmp:
        result = bench(
            n=args.n,
            model=args.model,
            batch_size=args.batch_size,
            actors=args.actors,
            threads=args.threads,
            sources=[s for s in args.sources.split(",") if s],
            repeats=args.repeats,
            workdir=Path(tmp),
            ray_cpus=args.ray_cpus,
            seed=args.seed,
        )
    publish(args.name, tables(result), result)


if __name__ == "__main__":
    main()
