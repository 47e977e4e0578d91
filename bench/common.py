"""What every benchmark shares: the machine, versions and date it records, how results are written and
printed, the steady rate, and the `main` that runs a benchmark in a temporary folder."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"


def machine() -> dict[str, Any]:
    import numpy
    import torch

    info: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "processor": _cpu_model(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average_at_start": os.getloadavg(),
    }
    for name in ("transformers", "ray"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            info[name] = None
    try:
        info["git_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
        ).stdout.strip()
    except OSError:
        info["git_commit"] = None
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def count_flops(net: Any, shape: tuple[int, int, int, int], device: Any) -> int:
    """FLOPs of one fp32 forward pass on zeros of `shape` (B, 3, H, W), as FlopCounterMode counts them."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from m2f.model.linear import unfused

    # The counter's module tracker hooks every tensor that requires grad, which in no_grad or inference mode
    # includes views of parameters and fails: count with parameters frozen instead.
    flags = [p.requires_grad for p in net.parameters()]
    net.requires_grad_(False)
    counter = FlopCounterMode(display=False)
    try:
        with counter, unfused():
            net(torch.zeros(shape, device=device))
    finally:
        for p, flag in zip(net.parameters(), flags, strict=True):
            p.requires_grad_(flag)
    return int(counter.get_total_flops())


def sgemm_gflops(n: int = 2048, repeats: int = 5) -> float:
    """This machine's attainable fp32 rate at torch's current thread count: the best of `repeats` (n x n) @ (n x n)
    products, 2n^3 FLOPs each. The yardstick for a model's achieved GFLOP/s: a dense product is as close to
    the cores' peak as BLAS gets (the nominal peak, clock x FMA width, assumes a clock the cores may not hold)."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up: thread pool, page faults
    best = min(timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def write_result(name: str, payload: dict[str, Any]) -> Path:
    """bench/results/<name>.json (the latest run) — the figures the README and NOTES quote."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=1, default=str) + "\n")
    return path


def publish(name: str, text: str, payload: dict[str, Any]) -> Path:
    """Print a benchmark's tables, record `payload` in bench/results/<name>.json and say where."""
    print()
    print(text)
    path = write_result(name, payload)
    print(f"\nwritten to {path}")
    return path


def table(header: list[str], rows: list[list[Any]]) -> str:
    cells = [header] + [[f"{c:.3f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


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


def names(text: str) -> list[str]:
    """A comma-separated option as a list ("a,b," -> ["a", "b"])."""
    return [v for v in text.split(",") if v]


def ints(text: str) -> list[int]:
    return [int(v) for v in names(text)]


def run_and_publish(
    args: argparse.Namespace, bench: Callable[..., dict[str, Any]], tables: Callable[[dict[str, Any]], str]
) -> None:
    """A benchmark's `main`: `bench(**options, workdir=a fresh temporary folder)` with the parsed options (named
    as `bench`'s parameters), then its tables printed and the result recorded as bench/results/<--name>.json."""
    options = dict(vars(args))
    name = options.pop("name")
    with tempfile.TemporaryDirectory(prefix="m2f-bench-") as tmp:
        result = bench(**options, workdir=Path(tmp))
    publish(name, tables(result), result)
