"""Model forward vs Hugging Face transformers: same weights, same inputs, same threads, one process per configuration.

    python -m bench.forward_vs_hf [--repeats 5] [--threads N] [--models r50,swin_t] [--sizes 512x512,800x1216]
                                  [--allocator both|default|retain]

Full-size R50 and Swin-T Mask2Former configurations (COCO panoptic heads: 133 classes, 100 queries) are
random-initialised in transformers, saved with `save_pretrained`, and loaded with `model.load`; each
timing alternates HF and ours so that any drift in the machine's load hits both, and the table reports
medians. fp32, batch 1, `torch.inference_mode()`. Outputs are compared too, so a fast wrong model
cannot pass.

The allocator: a forward allocates tensors of tens of MB, and glibc's malloc serves those from fresh
mmap'd pages that fault in on first touch unless its (adaptive) threshold has risen past them, which it
does after such a block is freed. So a configuration's times depended on what ran before it in the same
process: Swin-T 512² after R50 800x1216 had HF at 1.37 s, alone at 1.67 s (bench/NOTES.md). Every
(model, size) therefore runs in a fresh process, once with glibc's defaults (`default`, what a user's
process gets) and once with freed memory kept for reuse (`retain`: MALLOC_MMAP_THRESHOLD_ and
MALLOC_TRIM_THRESHOLD_ raised, which takes page faults out of both sides).

Achieved GFLOP/s: each side's FLOPs for one forward are counted once per model and size (`FlopCounterMode`:
matmuls, convolutions, attention; not the deformable gathers or elementwise work) and divided by its
median time. HF's count is the larger: it also computes every decoder layer's mask at 1/4 scale, the mask
features' 1x1 convolution and Swin's window padding, which ours skips or folds away. `of peak` is ours over
this machine's attainable fp32 rate at the same threads (the best large sgemm, `bench.common.sgemm_gflops`).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import tempfile
from concurrent.futures import ProcessPoolExecutor

import torch

from bench.common import count_flops, median, publish, sgemm_gflops, table, timed

# glibc reads these at start-up: memory freed by one forward is kept for the next instead of being unmapped
RETAIN = {"MALLOC_MMAP_THRESHOLD_": str(2**32 - 1), "MALLOC_TRIM_THRESHOLD_": str(2**32 - 1)}


def hf_model(name: str):
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, ResNetConfig, SwinConfig

    stages = ["stage1", "stage2", "stage3", "stage4"]
    if name == "r50":
        backbone = ResNetConfig(
            embedding_size=64,
            hidden_sizes=[256, 512, 1024, 2048],
            depths=[3, 4, 6, 3],
            layer_type="bottleneck",
            out_features=stages,
        )
    elif name == "swin_t":
        backbone = SwinConfig(
            embed_dim=96,
            depths=[2, 2, 6, 2],
            num_heads=[3, 6, 12, 24],
            window_size=7,
            out_features=stages,
            drop_path_rate=0.0,
        )
    else:
        raise ValueError(name)
    labels = {i: f"class_{i}" for i in range(133)}
    config = Mask2FormerConfig(
        backbone_config=backbone, num_labels=133, id2label=labels, label2id={v: k for k, v in labels.items()}
    )
    torch.manual_seed(0)
    return Mask2FormerForUniversalSegmentation(config).eval()


def bench(name: str, size: tuple[int, int], repeats: int, threads: int, peak: float, allocator: str) -> dict:
    """One (model, size): run in a fresh process (`in_fresh_process`), so no earlier configuration has
    shaped the allocator's state."""
    from m2f import model as m2f

    torch.set_num_threads(threads)
    hf = hf_model(name)
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = m2f.load(tmp)
    h, w = size
    x = torch.randn(1, 3, h, w)
    gflop = count_flops(ours, (1, 3, h, w), torch.device("cpu")) / 1e9
    hf_gflop = count_flops(hf, (1, 3, h, w), torch.device("cpu")) / 1e9
    with torch.inference_mode():
        ref, got = hf(pixel_values=x), ours(x)  # warm-up, and the outputs must agree
        diff = max(
            (ref.masks_queries_logits - got.mask_logits).abs().max().item(),
            (ref.class_queries_logits - got.class_logits).abs().max().item(),
        )
        t_hf, t_ours = [], []
        for _ in range(repeats):
            t_hf.append(timed(lambda x=x: hf(pixel_values=x)))
            t_ours.append(timed(lambda x=x: ours(x)))
    row = {
        "model": name,
        "size": f"{h}x{w}",
        "allocator": allocator,
        "hf_s": median(t_hf),
        "ours_s": median(t_ours),
        "speedup": median(t_hf) / median(t_ours),
        "max_abs_diff": diff,
        "gflop": gflop,
        "hf_gflop": hf_gflop,
        "hf_gflops": hf_gflop / median(t_hf),
        "ours_gflops": gflop / median(t_ours),
        "ours_of_peak": gflop / median(t_ours) / peak,
        "hf_runs": t_hf,
        "ours_runs": t_ours,
    }
    print(
        f"{name} {h}x{w} ({allocator} allocator): hf {median(t_hf):.3f}s ours {median(t_ours):.3f}s "
        f"x{row['speedup']:.2f} (max |diff| {diff:.1e}); {hf_gflop:.1f} / {gflop:.1f} GFLOP, "
        f"hf {row['hf_gflops']:.1f} ours {row['ours_gflops']:.1f} GFLOP/s ({row['ours_of_peak']:.0%} of {peak:.0f})",
        flush=True,
    )
    return row


def in_fresh_process(allocator: str, fn, *args):
    """fn(*args) in a new interpreter, started with glibc's defaults or with `RETAIN` in its environment."""
    saved = dict(os.environ)
    if allocator == "retain":
        os.environ.update(RETAIN)
    else:
        for key in RETAIN:
            os.environ.pop(key, None)
    try:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            return pool.submit(fn, *args).result()
    finally:
        os.environ.clear()
        os.environ.update(saved)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--models", default="r50,swin_t")
    parser.add_argument("--sizes", default="512x512,800x1216")
    parser.add_argument("--allocator", choices=["both", "default", "retain"], default="both")
    parser.add_argument("--name", default="forward_vs_hf", help="results file name")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    peak = sgemm_gflops()
    print(f"attainable fp32 (sgemm 2048, {args.threads} threads): {peak:.1f} GFLOP/s", flush=True)
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    allocators = ["default", "retain"] if args.allocator == "both" else [args.allocator]
    rows = [
        in_fresh_process(allocator, bench, name, size, args.repeats, args.threads, peak, allocator)
        for allocator in allocators
        for name in args.models.split(",")
        for size in sizes
    ]
    header = ["model", "size", "allocator", "hf s", "ours s", "speedup", "hf GFLOP/s", "ours GFLOP/s", "of peak"]
    text = table(
        header + ["max|diff|"],
        [
            [
                r["model"],
                r["size"],
                r["allocator"],
                r["hf_s"],
                r["ours_s"],
                r["speedup"],
                r["hf_gflops"],
                r["ours_gflops"],
                f"{r['ours_of_peak']:.0%}",
                f"{r['max_abs_diff']:.1e}",
            ]
            for r in rows
        ],
    )
    payload = {
        "threads": args.threads,
        "repeats": args.repeats,
        "sgemm_gflops": peak,
        "retain_environment": RETAIN,
        "rows": rows,
    }
    publish(args.name, text, payload)


if __name__ == "__main__":
    main()
