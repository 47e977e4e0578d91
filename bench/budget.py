"""CPU budget per image of every stage outside the model, at COCO size, per task.

    python -m bench.budget [--images 64] [--repeats 3]

What one image costs in CPU time (`time.process_time`, one thread: core-milliseconds) in each stage that
`m2f segment` runs besides the forward pass: read + decode (a 640x480 JPEG, as COCO's), resize to the
800-pixel short side + normalise (the R50 COCO preprocessing), the compact form the model actor hands
over (built on the model's device: timed here on the CPU, left out of the total feeding a GPU),
device -> host (nothing on a CPU-only machine: reported as 0, with the bytes that would cross: the compact
form against the full masks it replaces), RLE encoding + statistics + the row from the compact form (the
encode stage, `pipeline.handover.encode_row`; the full masks' `encode_segments` beside it for comparison),
and writing the row to Parquet (amortised over a 512-row part file). The masks are shaped
as a COCO model's output: panoptic, 20 segments tiling the image; semantic, 20 classes tiling it;
instance, 100 overlapping masks before the 0.5 score threshold (`--instance-kept` of them survive it).

From the per-image total it derives what one 16-core node could feed (16 000 / core-ms images/s),
against the targets: <= 25 core-ms for panoptic and semantic, <= 40 for instance (500 images/s).
"""

from __future__ import annotations

import argparse
import io
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import median, run_and_publish, table

TASKS = ("panoptic", "semantic", "instance")
TARGETS_MS = {"panoptic": 25.0, "semantic": 25.0, "instance": 40.0}
NODE_CORES = 16
ROWS_PER_FILE = 512
HEIGHT, WIDTH = 480, 640


def _cpu_ms(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Median CPU milliseconds of `fn()` over `repeats` calls, and its last result."""
    times, result = [], None
    for _ in range(repeats):
        start = time.process_time()
        result = fn()
        times.append((time.process_time() - start) * 1000)
    return median(times), result


def _photo(rng: np.random.Generator) -> bytes:
    """A 640x480 JPEG with a photo's texture (smooth gradients and noise), quality 90 as COCO's."""
    from PIL import Image

    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    base = np.stack([x * rng.uniform(0.1, 0.4), y * rng.uniform(0.1, 0.4), (x + y) * 0.2], axis=-1)
    pixels = np.clip(base + rng.normal(0, 18, (HEIGHT, WIDTH, 3)), 0, 255).astype(np.uint8)  # (H, W, 3)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=90)
    return out.getvalue()


def _tiling(rng: np.random.Generator, parts: int) -> np.ndarray:
    """(parts, H, W) bool masks that tile the image: nearest of `parts` random centres (a Voronoi map)."""
    centres = rng.uniform((0, 0), (HEIGHT, WIDTH), size=(parts, 2))
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    distance = (y[None] - centres[:, :1, None]) ** 2 + (x[None] - centres[:, 1:, None]) ** 2  # (parts, H, W)
    owner = distance.argmin(axis=0)  # (H, W)
    return owner[None] == np.arange(parts)[:, None, None]


def _blobs(rng: np.random.Generator, count: int) -> np.ndarray:
    """(count, H, W) bool ellipses that may overlap, 1-20 % of the image each: instance masks."""
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    masks = np.zeros((count, HEIGHT, WIDTH), dtype=bool)
    for i in range(count):
        cy, cx = rng.uniform(0, HEIGHT), rng.uniform(0, WIDTH)
        ry, rx = rng.uniform(15, 140), rng.uniform(15, 180)
        masks[i] = ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1
    return masks


def _masks(task: str, rng: np.random.Generator, instance_kept: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(masks (N, H, W) bool, labels (N,), scores (N,)) as the task's post-processing leaves them."""
    if task == "instance":
        masks = _blobs(rng, instance_kept)  # the ones that pass the 0.5 threshold; the rest are never encoded
    else:
        masks = _tiling(rng, 20)
    n = len(masks)
    labels = rng.choice(80 if task == "instance" else 133, size=n, replace=task != "semantic").astype(np.int64)
    scores = rng.uniform(0.5, 1.0, size=n).astype(np.float32)
    return masks, labels, scores


def bench(images: int, repeats: int, instance_kept: int, seed: int, workdir: Path) -> dict[str, Any]:
    import torch

    from m2f.model.config import PreprocessConfig
    from m2f.model.postprocess import Segments
    from m2f.model.preprocess import resize_image, to_batch
    from m2f.pipeline.compact import compact
    from m2f.pipeline.decode import decode_image
    from m2f.pipeline.encode import encode_segments, image_stats
    from m2f.pipeline.handover import compact_row, encode_row
    from m2f.pipeline.output import parquet_bytes
    from m2f.pipeline.schema import rows_to_table

    torch.set_num_threads(1)
    rng = np.random.default_rng(seed)
    preprocess = PreprocessConfig(min_size=800, max_size=1333)  # R50 COCO
    class_names = tuple(f"class{i}" for i in range(133))
    is_thing = tuple(i < 80 for i in range(133))
    photos = [_photo(rng) for _ in range(images)]
    decoded = [decode_image(photo) for photo in photos]

    common: dict[str, list[float]] = {"read + decode": [], "resize": [], "normalise + pad": []}
    for photo, image in zip(photos, decoded, strict=True):
        common["read + decode"].append(_cpu_ms(lambda p=photo: decode_image(p), repeats)[0])
        ms, resized = _cpu_ms(lambda i=image: resize_image(i, preprocess), repeats)
        common["resize"].append(ms)
        common["normalise + pad"].append(_cpu_ms(lambda r=resized: to_batch([r], preprocess), repeats)[0])

    results: dict[str, Any] = {"images": images, "repeats": repeats, "instance_kept": instance_kept, "tasks": {}}
    for task in TASKS:
        encode_ms, full_ms, compact_ms, rows = [], [], [], []
        full_bytes, compact_bytes = [], []
        for k in range(images):
            masks, labels, scores = _masks(task, rng, instance_kept)
            semantic = task == "semantic"

            def encode_full(masks=masks, labels=labels, scores=scores, semantic=semantic) -> None:
                segments = encode_segments(masks, labels, scores, class_names=class_names, is_thing=is_thing)
                image_stats(segments, HEIGHT, WIDTH, semantic=semantic)

            full_ms.append(_cpu_ms(encode_full, repeats)[0])
            tensors = [torch.from_numpy(masks), torch.from_numpy(labels), torch.from_numpy(scores)]
            if task == "panoptic":  # post-processing's own id map: 0 = void, i+1 = segment i
                tensors.append(torch.from_numpy((masks * np.arange(1, len(masks) + 1)[:, None, None]).sum(0)).int())
            segments = Segments(*tensors)
            ms, prediction = _cpu_ms(lambda s=segments, t=task: compact(t, s, 0.0), repeats)
            compact_ms.append(ms)
            full_bytes.append(masks.nbytes + labels.nbytes + scores.nbytes)  # what `_to_numpy` copied
            sent = prediction.id_map if prediction.id_map is not None else prediction.bits
            extra = 0 if prediction.boxes is None else prediction.boxes.nbytes
            compact_bytes.append(sent.nbytes + extra + prediction.labels.nbytes + prediction.scores.nbytes)
            names = [class_names[i] for i in prediction.labels.tolist()]
            things = [is_thing[i] for i in prediction.labels.tolist()]
            kw = {"model": "bench", "run_id": "bench", "inference_ms": 1.0, "source_bytes": None}
            row = compact_row(
                f"s3://bucket/coco/{k:012d}.jpg", prediction, (prediction.labels.tolist(), names, things), **kw
            )
            ms, out = _cpu_ms(lambda r=row: encode_row(r), repeats)
            encode_ms.append(ms)
            rows.append(out)
        copies = max(1, ROWS_PER_FILE // len(rows))
        batch = (rows * copies)[:ROWS_PER_FILE]
        write_ms, _ = _cpu_ms(lambda b=batch: parquet_bytes(rows_to_table(b)), repeats)
        stages = {
            "read + decode": median(common["read + decode"]),
            "resize": median(common["resize"]),
            "normalise + pad": median(common["normalise + pad"]),
            "compact (device)": median(compact_ms),
            "device -> host": 0.0,
            "encode + statistics + row": median(encode_ms),
            "Parquet write": write_ms / len(batch),
        }
        on_device = stages["normalise + pad"] + stages["compact (device)"]  # the GPU's work, with one
        results["tasks"][task] = {
            "stages_core_ms": stages,
            "total_core_ms": sum(stages.values()) - on_device,
            "total_core_ms_cpu_only": sum(stages.values()),
            "target_core_ms": TARGETS_MS[task],
            "images_per_s_16_cores": NODE_CORES * 1000 / (sum(stages.values()) - on_device),
            "encode_full_masks_core_ms": median(full_ms),  # encode_segments + image_stats, as the actor did
            "device_to_host_bytes": {"full_masks": median(full_bytes), "compact": median(compact_bytes)},
        }
    results["note"] = (
        "normalise + pad and the compact form run on the model's device (the uint8 pixels travel, then the GPU "
        "does the float work; the masks are compacted before they travel back), so the total feeding a GPU "
        "leaves them out; a CPU-only run pays them too (total_core_ms_cpu_only). device -> host is 0 here, "
        "with no GPU; on one it is the copy of the compact form (device_to_host_bytes)."
    )
    return results


def tables(result: dict[str, Any]) -> str:
    stages = list(next(iter(result["tasks"].values()))["stages_core_ms"])
    rows = []
    for stage in stages:
        rows.append([stage, *[result["tasks"][t]["stages_core_ms"][stage] for t in TASKS]])
    rows.append(["total feeding a GPU, core-ms / image", *[result["tasks"][t]["total_core_ms"] for t in TASKS]])
    rows.append(["total on a CPU-only node", *[result["tasks"][t]["total_core_ms_cpu_only"] for t in TASKS]])
    rows.append(["target", *[result["tasks"][t]["target_core_ms"] for t in TASKS]])
    rows.append(
        [
            "encode + statistics from full masks (before)",
            *[result["tasks"][t]["encode_full_masks_core_ms"] for t in TASKS],
        ]
    )
    for form in ("full_masks", "compact"):
        label = f"device -> host KiB / image, {form.replace('_', ' ')}"
        rows.append([label, *[result["tasks"][t]["device_to_host_bytes"][form] / 1024 for t in TASKS]])
    rows.append(
        [f"images/s one {NODE_CORES}-core node feeds", *[result["tasks"][t]["images_per_s_16_cores"] for t in TASKS]]
    )
    head = (
        f"{result['images']} COCO-size images (640x480 JPEG -> 800 short side), median CPU ms of "
        f"{result['repeats']} runs, one thread; instance: {result['instance_kept']} masks kept\n\n"
    )
    return head + table(["stage", *TASKS], rows) + f"\n\n{result['note']}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--instance-kept", type=int, default=100, help="instance masks that pass the threshold")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="budget", help="results file name")
    run_and_publish(parser.parse_args(), bench, tables)


if __name__ == "__main__":
    main()
