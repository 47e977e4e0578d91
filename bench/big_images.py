"""Big images: peak memory of every stage for an ordinary image, a 48 MP photo and a 100 MP 1-bit PNG.

    python -m bench.big_images [--models demo,r50] [--images ordinary,48mp,100mp] [--tasks panoptic,instance]
                               [--label after] [--limit-gb 12]

One image at a time goes through the stages `m2f segment` runs, called directly (no Ray), each in the
process role that runs it in the job: decode and resize (a prepare task: `decode_resized`, one stage,
where it exists; before it, `decode_image` and then `resize_image`), the model's prediction to the
compact form and its row (the model actor), RLE encoding and statistics (an encode task), and the
preview (the driver, which decodes the image again). Every (model, image, task) runs in a fresh spawned
process under an address-space limit (`--limit-gb`), so a stage that would exhaust the machine fails with
"out of memory" instead of taking it down.

Memory is the kernel's own peak RSS (VmHWM), reset before each stage (`/proc/self/clear_refs`), so a
stage's peak is exact, not sampled: per stage, its peak above the RSS it started at. Per role, the largest
of its stages; "tree" is the sum of the roles: what the job's processes hold above their idle state when
each handles this image, the figure the target is about (a 100 MP image at most 2 GB above an ordinary
one). "process" is the peak RSS of the child that ran every stage in turn (the model included).

Models: `demo` (the bundled model, 256 px input, its own thresholds) and `r50` (the R50 COCO panoptic
preset, random weights, 800x1333 input, zero thresholds and score threshold, so that its 100 queries
all become segments: the worst case for post-processing). Images are generated: a 640x480 JPEG and an
8000x6000 JPEG (smooth noise and shapes, quality 90), and a 10000x9990 1-bit PNG of a few shapes (tens
of KB on disk). `--label` names the run (before / after a change); the results file keeps other labels,
and a label's configurations that this run did not measure.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import io
import json
import multiprocessing
import resource
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import RESULTS, machine, names, publish, table

IMAGES = {"ordinary": (640, 480, "jpeg"), "48mp": (8000, 6000, "jpeg"), "100mp": (10000, 9990, "png1")}
ROLES = {"decode": "prepare", "resize": "prepare", "predict": "actor", "row": "actor", "encode": "encode"}
ROLES["preview"] = "driver"
TARGET_GB = 2.0  # a 100 MP image costs at most this much above an ordinary one in the process tree
MB = 1024**2


# --- inputs -----------------------------------------------------------------------------------------------


def make_image(kind: str, seed: int = 0) -> bytes:
    """The encoded file of IMAGES[kind]: a photo-like JPEG, or a 1-bit PNG of a few shapes."""
    from PIL import Image, ImageDraw

    width, height, fmt = IMAGES[kind]
    rng = np.random.default_rng(seed)
    if fmt == "png1":
        picture = Image.new("1", (width, height), 0)
        draw = ImageDraw.Draw(picture)
        for _ in range(6):
            x0, y0 = rng.integers(0, width // 2), rng.integers(0, height // 2)
            box = (x0, y0, x0 + rng.integers(width // 8, width // 2), y0 + rng.integers(height // 8, height // 2))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=1)
    else:
        coarse = rng.uniform(0, 255, (height // 64 + 2, width // 64 + 2, 3)).astype(np.uint8)  # smooth noise
        picture = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
        draw = ImageDraw.Draw(picture)
        for _ in range(12):
            x0, y0 = rng.integers(0, width), rng.integers(0, height)
            size = rng.integers(min(width, height) // 10, min(width, height) // 3)
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x0 + size, y0 + size), fill=colour)
    out = io.BytesIO()
    picture.save(out, "PNG" if fmt == "png1" else "JPEG", **({} if fmt == "png1" else {"quality": 90}))
    return out.getvalue()


def make_model(name: str, folder: Path) -> tuple[str, float | None]:
    """(checkpoint for `model.load`, score threshold: None for the task's default)."""
    if name == "demo":
        return "demo", None
    if name != "r50":
        raise ValueError(f"unknown model {name!r}: demo or r50")
    from dataclasses import replace

    import torch

    from m2f.model import build_model, save
    from m2f.model.presets import PRESETS

    path = folder / "r50-random.safetensors"
    if not path.exists():
        config = PRESETS["r50_coco_panoptic"]
        config = replace(config, postprocess=replace(config.postprocess, object_mask_threshold=0.0))
        torch.manual_seed(0)
        save(build_model(config), path)
    return str(path), 0.0


# --- one configuration, in a fresh process --------------------------------------------------------------


def _trim() -> None:
    """Give freed heap back to the system, so that a stage starts from what is really held."""
    gc.collect()
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


class Stages:
    """Runs stages one after another, recording each one's seconds and exact peak RSS above its start."""

    def __init__(self) -> None:
        self.figures: dict[str, dict[str, float]] = {}
        self.process_peak = _status("VmHWM")

    def run(self, name: str, fn: Any) -> Any:
        _trim()
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        start_rss, clock = _status("VmRSS"), time.perf_counter()
        result = fn()
        peak = _status("VmHWM")
        self.process_peak = max(self.process_peak, peak)
        self.figures[name] = {"above_start_mb": (peak - start_rss) / MB, "s": time.perf_counter() - clock}
        return result


def measure_one(model_uri: str, score_threshold: float | None, path: str, task: str, limit_gb: float) -> dict:
    """Every stage for one image; runs in a fresh process. Returns the figures or the stage that failed."""
    resource.setrlimit(resource.RLIMIT_AS, (int(limit_gb * 1024**3), resource.RLIM_INFINITY))
    import torch

    from m2f.model import load
    from m2f.model.preprocess import resize_image, resized_shape
    from m2f.pipeline import decode as decoding
    from m2f.pipeline.decode import decode_image
    from m2f.pipeline.handover import compact_row, compact_table, encode_rows
    from m2f.pipeline.predictor import Predictor, default_score_threshold
    from m2f.pipeline.preview import picture as preview

    torch.set_num_threads(1)
    threshold = default_score_threshold(task) if score_threshold is None else score_threshold
    predictor = Predictor(load(model_uri), task=task, score_threshold=threshold)
    _warm_up(predictor)
    prepared = getattr(decoding, "decode_resized", None)  # where it exists, what the prepare task runs
    data = Path(path).read_bytes()
    stages, state, caught = Stages(), {}, []
    out: dict[str, Any] = {"idle_mb": _status("VmRSS") / MB}

    def decode() -> None:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            if prepared is not None:  # the prepare task's path: decoded and resized in one step
                cfg = predictor.config.preprocess
                state["size"], state["resized"] = prepared(
                    data, lambda h, w: resized_shape(h, w, cfg.min_size, cfg.max_size)
                )
            else:
                state["image"] = decode_image(data)
                state["size"] = state["image"].shape[:2]
        caught.extend(f"{w.category.__name__}: {w.message}" for w in seen)

    def resize() -> None:  # before decode_resized: the array at full size, then resized
        if "image" in state:
            state["resized"] = resize_image(state.pop("image"), predictor.config.preprocess)

    def predict() -> None:
        (state["prediction"],) = predictor.predict([state.pop("resized")], [state["size"]])

    def row() -> None:
        prediction = state.pop("prediction")
        classes = predictor.classes(prediction)
        state["table"] = compact_table(
            [compact_row("x", prediction, classes, model="m", run_id="r", inference_ms=0.0, source_bytes=len(data))]
        )

    def preview_png() -> None:
        drawn = getattr(preview, "preview_png", None)  # the bounded driver path, where it exists
        if drawn is not None:
            state["png"] = drawn(data, state["segments"], max_pixels=100_000_000)
        else:  # what pipeline.preview.write did before it: decode in full, then draw
            state["png"] = preview.png_bytes(preview.render_preview(decode_image(data), state["segments"]))

    stage = "decode"
    try:
        stages.run("decode", decode)
        stage = "resize"
        stages.run("resize", resize)
        for stage, fn in (("predict", predict), ("row", row)):
            stages.run(stage, fn)
        stage = "encode"
        table_out = stages.run("encode", lambda: encode_rows(state.pop("table")))
        state["segments"] = table_out.to_pylist()[0]["segments"] or []
        out["segments"] = len(state["segments"])
        stage = "preview"
        stages.run("preview", preview_png)
    except (MemoryError, RuntimeError) as e:  # torch reports a failed allocation as RuntimeError
        out["failed"] = f"{stage}: {type(e).__name__}: {str(e)[:200]}"
    out.update(stages=stages.figures, process_peak_mb=stages.process_peak / MB, warnings=caught)
    return out


def _warm_up(predictor: Any) -> None:
    """One small image through the stages first, so that no stage's figure includes first-use costs (lazy
    imports, pyarrow's and pycocotools' set-up, torch's thread pool)."""
    from m2f.pipeline.handover import compact_row, compact_table, encode_rows
    from m2f.pipeline.preview.picture import png_bytes, render_preview

    image = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    (prediction,) = predictor.predict([predictor.resize(image)], [(48, 64)])
    row = compact_row(
        "x", prediction, predictor.classes(prediction), model="m", run_id="r", inference_ms=0.0, source_bytes=1
    )
    segments = encode_rows(compact_table([row])).to_pylist()[0]["segments"] or []
    png_bytes(render_preview(image, segments))


def _summarise(result: dict) -> dict:
    roles: dict[str, float] = {}
    for name, fig in result.get("stages", {}).items():
        roles[ROLES[name]] = max(roles.get(ROLES[name], 0.0), fig["above_start_mb"])
    result["roles_mb"] = roles
    result["tree_mb"] = None if "failed" in result else sum(roles.values())
    return result


def bench(
    models: str, images: str, tasks: str, label: str, limit_gb: float, workdir: Path, seed: int = 0
) -> dict[str, Any]:
    files = {}
    for kind in names(images):
        files[kind] = workdir / f"{kind}.{'png' if IMAGES[kind][2] == 'png1' else 'jpg'}"
        files[kind].write_bytes(make_image(kind, seed))
    runs = []
    context = multiprocessing.get_context("spawn")
    for model_name in names(models):
        model_uri, threshold = make_model(model_name, workdir)
        for kind in names(images):
            for task in names(tasks):
                with context.Pool(1, maxtasksperchild=1) as pool:
                    args = (model_uri, threshold, str(files[kind]), task, limit_gb)
                    try:
                        result = pool.apply(measure_one, args)
                    except Exception as e:  # the child died (killed for memory): record it, go on
                        result = {"failed": f"process: {type(e).__name__}: {e}"}
                entry = {"model": model_name, "image": kind, "task": task, "bytes": files[kind].stat().st_size}
                runs.append({**entry, **_summarise(result)})
                print(json.dumps({k: v for k, v in runs[-1].items() if k != "stages"}, default=str), flush=True)
    return {"label": label, "machine": machine(), "limit_gb": limit_gb, "runs": runs}


def tables(result: dict[str, Any]) -> str:
    header = ["model", "image", "task", "segs", "decode", "resize", "predict", "row", "encode", "preview"]
    header += ["tree", "process", "warnings"]
    rows = []
    for run in result["runs"]:
        stages = run.get("stages", {})
        cells = [f"{stages[s]['above_start_mb']:.0f}" if s in stages else "-" for s in header[4:10]]
        tree = "failed" if run.get("tree_mb") is None else f"{run['tree_mb']:.0f}"
        process = f"{run['process_peak_mb']:.0f}" if "process_peak_mb" in run else "-"
        rows.append([run["model"], run["image"], run["task"], run.get("segments", "-"), *cells, tree, process])
        rows[-1].append(len(run.get("warnings", [])))
    text = f"{result['label']}: MB above each stage's start; tree = the roles' sum; process = the child's peak RSS\n"
    text += table(header, rows)
    for run in result["runs"]:
        if "failed" in run:
            text += f"\n{run['model']} {run['image']} {run['task']}: {run['failed']}"
    return text + _target(result)


def _target(result: dict[str, Any]) -> str:
    lines = []
    by = {(r["model"], r["image"], r["task"]): r.get("tree_mb") for r in result["runs"]}
    for (model_name, image, task), tree in by.items():
        base = by.get((model_name, "ordinary", task))
        if image == "100mp" and tree is not None and base is not None:
            extra = (tree - base) / 1024
            verdict = "meets" if extra <= TARGET_GB else "misses"
            lines.append(f"{model_name} {task}: 100 MP costs {extra:.2f} GB above 640x480 ({verdict} {TARGET_GB} GB)")
    return "\n" + "\n".join(lines) if lines else ""


def _key(run: dict) -> tuple[str, str, str]:
    return run["model"], run["image"], run["task"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="demo,r50", help="demo and/or r50")
    parser.add_argument("--images", default=",".join(IMAGES), help=f"of {', '.join(IMAGES)}")
    parser.add_argument("--tasks", default="panoptic,instance")
    parser.add_argument("--label", default="after", help="this run's name in the results (before / after)")
    parser.add_argument("--limit-gb", type=float, default=12.0, help="address-space limit of each child")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="big_images", help="results file name")
    args = parser.parse_args()
    import tempfile

    with tempfile.TemporaryDirectory(prefix="m2f-bench-") as tmp:
        result = bench(args.models, args.images, args.tasks, args.label, args.limit_gb, Path(tmp), args.seed)
    previous = RESULTS / f"{args.name}.json"
    runs = json.loads(previous.read_text()).get("runs_by_label", {}) if previous.exists() else {}
    kept = [r for r in runs.get(args.label, {}).get("runs", []) if _key(r) not in {_key(n) for n in result["runs"]}]
    runs[args.label] = {**result, "runs": kept + result["runs"]}  # a label's other configurations stay
    publish(args.name, tables(result), {"runs_by_label": runs})


if __name__ == "__main__":
    main()
