"""GPU: forward throughput and achieved TFLOP/s of the R50 and Swin-L presets, and the pipeline with one GPU actor.

    python -m bench.gpu [--presets r50_coco_panoptic,swin_l_coco_panoptic] [--sizes 512x512,800x1333]
                        [--precisions fp32,bf16] [--batches 1,2,4,8,16,32] [--warmup 3] [--iters 10]
                        [--pipeline-n 256] [--pipeline-presets r50_coco_panoptic] [--pipeline-batch-size 8]
                        [--pipeline-precisions fp32,bf16] [--pipeline-model PATH] [--no-pipeline]
    python -m bench.gpu --device cpu --smoke     # the same code on CPU at a tiny size (the smoke test)

Forward: each preset (`model.presets.PRESETS`, random weights, eval mode) on (B, 3, H, W) random input padded
to the model's size divisibility (800x1333 runs as 800x1344, as the pipeline pads it), under
`torch.inference_mode()`, fp32 or bf16 autocast. `--warmup` passes, then `--iters` passes each timed between
`torch.cuda.synchronize()` calls; images/s = B / the median pass. The model's FLOPs are counted once per preset
and input size with `torch.utils.flop_counter.FlopCounterMode` (batch 1, per image; it counts matmuls,
convolutions and attention, not the deformable-attention gathers or elementwise work, so achieved TFLOP/s is a
slight underestimate). A batch that runs out of memory is recorded as OOM and ends that row of batch sizes.

Pipeline: `jobs.segment.job.run` with `--device cuda`, one actor, one GPU, over `--pipeline-n` synthetic scenes
(upscaled by the preset's resize rule to 800 px on the short side) from a local folder to local Parquet
(`bench.job.run_pipeline`); images/s with start-up and steady. Random weights produce almost no
segments above the preset's thresholds, so post-processing and RLE encoding cost less than with a trained
checkpoint: pass one with `--pipeline-model` for figures that include them.

Without CUDA this says so and exits 0, unless `--device cpu --smoke` is given.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from bench.common import count_flops, ints, names, table, write_result

TARGET_R50_BF16_512 = 266.0  # issue 5: images/s, R50 at 512x512, bf16, one H100 (10x mmsegmentation's A100 figure)
SMOKE = {"sizes": "64x64", "batches": "1,2", "warmup": 1, "iters": 2, "pipeline_n": 4, "pipeline_batch_size": 2}


def model_config(preset: str, smoke: bool = False) -> Any:
    """The preset's config; with `smoke`, the same backbone family shrunk to a few thousand parameters at
    64-128 px, so the CPU smoke run goes through the same code (ResNet and Swin)."""
    from m2f.model.config import DecoderConfig, PixelDecoderConfig, PreprocessConfig, ResNetConfig, SwinConfig
    from m2f.model.presets import PRESETS

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(sorted(PRESETS))}")
    config = PRESETS[preset]
    if not smoke:
        return config
    if config.backbone.kind == "swin":
        backbone: Any = SwinConfig(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8), window_size=7)
    else:
        backbone = ResNetConfig(depths=(1, 1, 1, 1), stem_channels=8, widths=(16, 32, 64, 128))
    return config.replace(
        name=f"{config.name}-smoke",
        backbone=backbone,
        pixel_decoder=PixelDecoderConfig(conv_dim=32, mask_dim=32, num_layers=1, num_heads=4, ffn_dim=64, num_groups=8),
        decoder=DecoderConfig(hidden_dim=32, num_queries=8, num_heads=4, ffn_dim=64, num_layers=2),
        preprocess=PreprocessConfig(min_size=64, max_size=128),
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_forward(
    net: torch.nn.Module, x: torch.Tensor, precision: str, *, warmup: int, iters: int
) -> tuple[list[float], float | None]:
    """Seconds per forward pass of `x` (B, 3, H, W) after `warmup` passes, and the peak GPU memory in GB."""
    from m2f.pipeline.predictor import PRECISIONS

    device, dtype = x.device, PRECISIONS[precision]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
    times = []
    with torch.inference_mode(), autocast:
        for _ in range(warmup):
            net(x)
        _sync(device)
        for _ in range(iters):
            start = time.perf_counter()
            net(x)
            _sync(device)
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 1024**3 if device.type == "cuda" else None
    return times, peak


def forward_rows(
    preset: str,
    *,
    sizes: Sequence[tuple[int, int]],
    precisions: Sequence[str],
    batches: Sequence[int],
    device: torch.device,
    warmup: int,
    iters: int,
    smoke: bool = False,
) -> list[dict[str, Any]]:
    """One row per size x precision x batch: images/s, ms per pass, TFLOP/s, peak memory (or OOM)."""
    from m2f.model import build_model
    from m2f.model.preprocess import padded_size

    config = model_config(preset, smoke)
    torch.manual_seed(0)
    net = build_model(config).to(device).eval()
    params = sum(p.numel() for p in net.parameters())
    rows = []
    for h, w in sizes:
        hp, wp = padded_size(h, w, config.preprocess.size_divisibility)
        flops = count_flops(net, (1, 3, hp, wp), device)
        for precision in precisions:
            for b in batches:
                row: dict[str, Any] = {
                    "preset": config.name,
                    "params_m": params / 1e6,
                    "size": f"{h}x{w}",
                    "padded": f"{hp}x{wp}",
                    "precision": precision,
                    "batch": b,
                    "gflops_per_image": flops / 1e9,
                }
                try:
                    times, peak = time_forward(
                        net, torch.randn(b, 3, hp, wp, device=device), precision, warmup=warmup, iters=iters
                    )
                except torch.cuda.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    rows.append({**row, "oom": True})
                    print(f"{config.name} {h}x{w} {precision} batch {b}: out of memory", flush=True)
                    break  # larger batches will not fit either
                seconds = statistics.median(times)
                ips = b / seconds
                rows.append(
                    {
                        **row,
                        "oom": False,
                        "ms_per_pass": seconds * 1000,
                        "images_per_s": ips,
                        "tflops": flops * ips / 1e12,
                        "peak_gb": peak,
                        "runs_s": times,
                    }
                )
                print(f"{config.name} {h}x{w} {precision} batch {b}: {ips:.1f} images/s", flush=True)
    del net
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def pipeline_rows(
    presets: Sequence[str],
    *,
    n: int,
    precisions: Sequence[str],
    batch_size: int,
    device: str,
    workdir: Path,
    smoke: bool = False,
    checkpoint: str | None = None,
) -> list[dict[str, Any]]:
    """`jobs.segment.job.run` with one actor on `device`, per preset (random weights) or `checkpoint`, per precision."""
    from bench.job import run_pipeline
    from bench.workload import save_random, write_images

    images = workdir / "pipeline-images"
    write_images(str(images), n)
    models = {checkpoint: checkpoint} if checkpoint else {}
    for preset in [] if checkpoint else presets:
        models[preset] = save_random(model_config(preset, smoke), workdir / f"{preset}.safetensors")
    rows = []
    for name, path in models.items():
        for precision in precisions:
            result = run_pipeline(
                str(images),
                str(workdir / f"out-{Path(name).stem}-{precision}"),
                path,
                batch_size=batch_size,
                actors=1,
                threads=1,
                device=device,
                precision=precision,
            )
            rows.append({"model": name, "precision": precision, "batch_size": batch_size, **result})
    return rows


def bench(
    *,
    device: str,
    smoke: bool,
    presets: Sequence[str],
    sizes: Sequence[tuple[int, int]],
    precisions: Sequence[str],
    batches: Sequence[int],
    warmup: int,
    iters: int,
    workdir: Path,
    pipeline: bool = True,
    pipeline_n: int = 256,
    pipeline_presets: Sequence[str] = ("r50_coco_panoptic",),
    pipeline_precisions: Sequence[str] = ("fp32", "bf16"),
    pipeline_batch_size: int = 8,
    pipeline_model: str | None = None,
) -> dict[str, Any]:
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick its fastest kernels
    rows = []
    for preset in presets:
        rows += forward_rows(
            preset,
            sizes=sizes,
            precisions=precisions,
            batches=batches,
            device=dev,
            warmup=warmup,
            iters=iters,
            smoke=smoke,
        )
    runs = []
    if pipeline:
        runs = pipeline_rows(
            pipeline_presets,
            n=pipeline_n,
            precisions=pipeline_precisions,
            batch_size=pipeline_batch_size,
            device=device,
            workdir=workdir,
            smoke=smoke,
            checkpoint=pipeline_model,
        )
    return {
        "device": device,
        "smoke": smoke,
        "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "warmup": warmup,
        "iters": iters,
        "forward": rows,
        "pipeline": [{k: v for k, v in run.items() if k != "ray_data_stats"} for run in runs],
        "pipeline_ray_data_stats": [run["ray_data_stats"] for run in runs],
    }


def tables(result: dict[str, Any]) -> str:
    def f(value: float | None, digits: int = 1) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    forward = [
        [r["preset"], r["size"], r["precision"], r["batch"]]
        + (
            ["OOM", "-", "-", "-"]
            if r["oom"]
            else [f(r["images_per_s"]), f(r["ms_per_pass"], 2), f(r["tflops"], 2), f(r.get("peak_gb"), 2)]
        )
        for r in result["forward"]
    ]
    smoke = " (smoke run: tiny models, not figures)" if result["smoke"] else ""
    lines = [
        f"device: {result['gpu'] or result['device']}{smoke}",
        "",
        table(["preset", "size", "precision", "batch", "images/s", "ms/pass", "TFLOP/s", "peak GB"], forward),
        f"(target: >= {TARGET_R50_BF16_512:.0f} images/s for r50 at 512x512 in bf16 on one H100)",
    ]
    flops = {(r["preset"], r["size"]): r["gflops_per_image"] for r in result["forward"]}
    lines += ["", table(["preset", "size", "GFLOP/image"], [[p, s, f(g, 2)] for (p, s), g in flops.items()])]
    if result["pipeline"]:
        lines += ["", "pipeline, one actor:"]
        lines.append(
            table(
                ["model", "precision", "batch", "images", "img/s with start-up", "img/s steady", "wall s"],
                [
                    [
                        Path(r["model"]).name,
                        r["precision"],
                        r["batch_size"],
                        r["images"],
                        f(r["images_per_s_with_startup"], 2),
                        f(r["images_per_s_steady"], 2),
                        f(r["wall_s"], 1),
                    ]
                    for r in result["pipeline"]
                ],
            )
        )
    return "\n".join(lines)


def _sizes(text: str) -> list[tuple[int, int]]:
    return [(int(h), int(w)) for h, w in (s.split("x") for s in text.split(",") if s)]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--smoke", action="store_true", help="tiny models and sizes: exercise the code, no figures")
    parser.add_argument("--presets", default="r50_coco_panoptic,swin_l_coco_panoptic")
    parser.add_argument("--sizes", default="512x512,800x1333", help="HxW, comma-separated")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--batches", default="1,2,4,8,16,32")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--no-pipeline", action="store_true", help="forward passes only")
    parser.add_argument("--pipeline-n", type=int, default=256)
    parser.add_argument("--pipeline-presets", default="r50_coco_panoptic")
    parser.add_argument("--pipeline-precisions", default="fp32,bf16")
    parser.add_argument("--pipeline-batch-size", type=int, default=8)
    parser.add_argument("--pipeline-model", default=None, help="a trained checkpoint instead of random presets")
    parser.add_argument("--name", default="gpu", help="results file name")
    args = parser.parse_args(argv)
    if args.device == "cpu" and not args.smoke:
        parser.error("--device cpu only runs with --smoke (CPU throughput is bench.forward_vs_hf's subject)")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available on this machine: no GPU figures measured, nothing written.")
        print("(python -m bench.gpu --device cpu --smoke runs the same code on the CPU at a tiny size.)")
        return 0
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
    with tempfile.TemporaryDirectory(prefix="m2f-bench-") as tmp:
        result = bench(
            device=args.device,
            smoke=args.smoke,
            presets=names(args.presets),
            sizes=_sizes(args.sizes),
            precisions=names(args.precisions),
            batches=ints(args.batches),
            warmup=args.warmup,
            iters=args.iters,
            workdir=Path(tmp),
            pipeline=not args.no_pipeline,
            pipeline_n=args.pipeline_n,
            pipeline_presets=names(args.pipeline_presets),
            pipeline_precisions=names(args.pipeline_precisions),
            pipeline_batch_size=args.pipeline_batch_size,
            pipeline_model=args.pipeline_model,
        )
    print()
    print(tables(result))
    if args.smoke:
        print("\nsmoke run: nothing written to bench/results")
    else:
        print(f"\nwritten to {write_result(args.name, result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
