"""The model actor's time per image, before and after the compact hand-over (issue 12, item 2).

    python -m bench.actor [--images 8] [--repeats 3] [--queries 100]

Three designs of the actor, on this machine's CPU, one torch thread, COCO-size output (640x480):

- full masks, serial (the actor before): forward + post-processing, the (N, H, W) masks to numpy, then
  RLE + statistics + row for each image in turn, inside the actor;
- compact (the actor now): forward + post-processing + the compact form (id map, or packed box crops);
  encoding runs in separate CPU tasks (`pipeline.handover.encode_rows`), timed here per image on its own;
- full masks, thread pool: as the first, but each group's encoding goes to a one-thread pool and
  overlaps the next group's forward pass.

And whether pycocotools holds the GIL: the same RLE work on two threads at once versus one after the
other; with the GIL held the two threads take as long as the serial run.

The model is the micro architecture with `--queries` queries and random weights, on 256-pixel inputs,
so that the forward pass is short and post-processing and encoding weigh as they do on a GPU.
"""

from __future__ import annotations

import argparse
import hashlib
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import median, run_and_publish, table

HEIGHT, WIDTH = 480, 640
TASKS = ("panoptic", "semantic", "instance")


def _model(task: str, queries: int, folder: Path) -> str:
    from bench.workload import micro_config, save_random
    from m2f.model.config import PreprocessConfig

    cfg = micro_config()
    cfg = replace(cfg, task=task, decoder=replace(cfg.decoder, num_queries=queries))
    cfg = replace(cfg, preprocess=PreprocessConfig(min_size=256, max_size=342))
    return save_random(cfg, folder / f"{task}.safetensors", seed=1)


def _full_masks(predictor: Any, images: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
    """The actor before: post-processed full masks, copied to numpy (what `_to_numpy` did)."""
    from m2f.model.postprocess import postprocess
    from m2f.model.preprocess import to_batch

    with torch.inference_mode():
        pixels, sizes = to_batch(images, predictor.config.preprocess)  # (B, 3, Hp, Wp)
        out = predictor.net(pixels)
        segs = postprocess(
            predictor.task,
            out.class_logits,
            out.mask_logits,
            config=predictor.config,
            image_sizes=sizes,
            output_sizes=[(HEIGHT, WIDTH)] * len(images),
            padded_size=tuple(pixels.shape[-2:]),
        )
    return [{"masks": s.masks.numpy(), "labels": s.labels.numpy(), "scores": s.scores.numpy()} for s in segs]


def _encode_full(predictor: Any, p: dict[str, np.ndarray]) -> dict[str, Any]:
    """The actor before, after the copy: threshold, encode_segments, image_stats, the row."""
    from m2f.pipeline.encode import encode_segments, image_stats
    from m2f.pipeline.schema import ok_row

    masks, scores = p["masks"], p["scores"]
    keep = scores >= predictor.score_threshold
    if predictor.task == "instance":
        keep &= masks.reshape(len(masks), -1).any(axis=1)
    cfg = predictor.config
    segments = encode_segments(
        masks[keep], p["labels"][keep], scores[keep], class_names=cfg.class_names, is_thing=cfg.is_thing
    )
    stats = image_stats(segments, HEIGHT, WIDTH, semantic=predictor.task == "semantic")
    kw = {"task": predictor.task, "model": "bench", "run_id": "bench"}
    return ok_row("x", width=WIDTH, height=HEIGHT, segments=segments, stats=stats, inference_ms=1.0, **kw)


def _per_image_ms(fn: Any, n: int, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000 / n)
    return median(times)


def _designs(predictor: Any, images: list[np.ndarray], batch: int, repeats: int) -> dict[str, float]:
    from m2f.pipeline.handover import compact_row, encode_row

    groups = [images[i : i + batch] for i in range(0, len(images), batch)]
    n = len(images)

    def serial() -> None:
        for group in groups:
            for p in _full_masks(predictor, group):
                _encode_full(predictor, p)

    def compact_only() -> list:
        return [p for g in groups for p in predictor.predict(g, [(HEIGHT, WIDTH)] * len(g))]

    predictions = compact_only()
    rows = [
        compact_row("x", p, predictor.classes(p), model="b", run_id="b", inference_ms=1.0, source_bytes=1)
        for p in predictions
    ]

    def encode_stage() -> None:
        for row in rows:
            encode_row(row)

    def pooled() -> None:
        with ThreadPoolExecutor(max_workers=1) as pool:
            futures = []
            for group in groups:
                ps = _full_masks(predictor, group)  # overlaps the encoding of the group before
                futures.append(pool.submit(lambda ps=ps: [_encode_full(predictor, p) for p in ps]))
            for future in futures:
                future.result()

    return {
        "forward + post-processing + full masks": _per_image_ms(
            lambda: [_full_masks(predictor, g) for g in groups], n, repeats
        ),
        "actor before (full masks + encode, serial)": _per_image_ms(serial, n, repeats),
        "actor now (compact on the device)": _per_image_ms(compact_only, n, repeats),
        "encode stage from compact (a CPU task)": _per_image_ms(encode_stage, n, repeats),
        "actor with a thread pool (full masks, encode overlaps)": _per_image_ms(pooled, n, repeats),
        "segments per image": float(np.mean([len(p.scores) for p in predictions])),
    }


def gil_check(masks: int, repeats: int, seed: int) -> dict[str, float]:
    """Wall ms of pycocotools' encoder and of ours (from crops) on two equal workloads: one after the
    other, then on two threads at once. Ratio ~1: the GIL is held; ~0.5: released (with two free cores:
    the control, hashing, which releases it, says what this machine's load allows)."""
    from pycocotools import mask as mask_utils

    from m2f.pipeline.encode import rles_from_crops

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    full = []
    for _ in range(masks):
        cy, cx, ry, rx = rng.uniform(0, HEIGHT), rng.uniform(0, WIDTH), rng.uniform(15, 140), rng.uniform(15, 180)
        full.append(((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1)
    full = [m for m in full if m.any()]
    stack = np.asfortranarray(np.stack(full, axis=-1).astype(np.uint8))  # (H, W, N) column-major
    boxes, crops = [], []
    for m in full:
        rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
        boxes.append((rows[0], cols[0], rows[-1] + 1, cols[-1] + 1))
        crops.append(m[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1])
    boxes = np.array(boxes)
    blob = bytes(64 * 2**20)
    work = {
        "control: sha256 of 64 MB (releases the GIL)": lambda: hashlib.sha256(blob).digest(),
        "pycocotools encode (full masks)": lambda: mask_utils.encode(stack),
        "rles_from_crops (numpy + frPyObjects)": lambda: rles_from_crops(crops, boxes, HEIGHT, WIDTH),
    }
    out = {}
    for name, fn in work.items():
        serial = _per_image_ms(lambda fn=fn: (fn(), fn()), 1, repeats)
        with ThreadPoolExecutor(max_workers=2) as pool:
            threaded = _per_image_ms(lambda fn=fn: [f.result() for f in [pool.submit(fn), pool.submit(fn)]], 1, repeats)
        out[name] = {"serial_ms": serial, "two_threads_ms": threaded, "ratio": threaded / serial}
    return out


def bench(images: int, repeats: int, queries: int, batch: int, seed: int, workdir: Path) -> dict[str, Any]:
    from m2f import model
    from m2f.model.preprocess import resize_image
    from m2f.pipeline.predictor import Predictor

    torch.set_num_threads(1)
    rng = np.random.default_rng(seed)
    originals = [rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8) for _ in range(images)]
    result: dict[str, Any] = {"images": images, "repeats": repeats, "queries": queries, "batch": batch, "tasks": {}}
    for task in TASKS:
        predictor = Predictor(model.load(_model(task, queries, workdir)), task=task)
        resized = [resize_image(image, predictor.config.preprocess) for image in originals]
        result["tasks"][task] = _designs(predictor, resized, batch, repeats)
    result["gil"] = gil_check(queries, repeats, seed)
    return result


def tables(result: dict[str, Any]) -> str:
    names = list(next(iter(result["tasks"].values())))
    rows = [[name, *[result["tasks"][t][name] for t in TASKS]] for name in names]
    head = (
        f"Actor wall ms per image, {result['images']} images of 640x480 output, forward batches of "
        f"{result['batch']}, micro model with {result['queries']} queries at 256 px, one torch thread, CPU\n\n"
    )
    gil = [[name, g["serial_ms"], g["two_threads_ms"], g["ratio"]] for name, g in result["gil"].items()]
    gil_head = f"\n\nThe GIL: {result['queries']} instance masks encoded twice, wall ms (ratio ~1: held)\n\n"
    return head + table(["", *TASKS], rows) + gil_head + table(["", "serial", "two threads", "ratio"], gil)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="actor", help="results file name")
    run_and_publish(parser.parse_args(), bench, tables)


if __name__ == "__main__":
    main()
