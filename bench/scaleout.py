"""Scale-out: 1 vs 2 model actors on the CPU, one torch thread each (cpus_per_actor=1).

    python -m bench.scaleout [--n 200] [--model demo] [--actors 1,2] [--batch-size 4] [--threads 1]
                             [--repeats 1] [--ray-cpus CORES+1]

`jobs.segment.job.run` from a local folder of synthetic scenes to local Parquet (`bench.job.run_pipeline`),
once per actor count, `--repeats` rounds in turn. Reported: images/s with start-up and steady (after the first
forward batch, from the rows' `processed_at`), and the speed-up over the first actor count (target: 2 actors
>= 1.8x one actor on 2 cores).

Decoding also needs CPU: the prepare tasks (read, decode, resize) ask Ray for one CPU each, and with every
core held by an actor they would never be scheduled. So Ray is started with `--ray-cpus` logical CPUs
(default: cores + 1): on 2 cores with 2 actors the decoding shares the cores with the model, and the
speed-up can reach 2x only as far as decoding is cheap next to the forward pass. The table shows each stage's
CPU seconds from Ray Data's statistics, so that share is visible.
"""

from __future__ import annotations

import argparse
import os
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import ints, run_and_publish, table
from bench.job import run_pipeline
from bench.memory import PeakSampler
from bench.workload import resolve_model, write_images

TARGET_SPEEDUP = 1.8  # issue 5: 2 actors >= 1.8x one actor on 2 cores with 1 thread each


def stage_cpu(operators: Sequence[dict[str, Any]], fragment: str) -> float | None:
    """Summed task CPU seconds of the operators whose name contains `fragment`."""
    found = [o["task_cpu_s"] for o in operators if fragment in o["name"] and o.get("task_cpu_s") is not None]
    return sum(found) if found else None


def bench(
    *,
    n: int,
    model: str,
    actor_counts: Sequence[int],
    batch_size: int,
    threads: int,
    repeats: int,
    workdir: Path,
    ray_cpus: int | None,
    seed: int = 0,
) -> dict[str, Any]:
    """Every actor count once per round; medians per count and speed-ups over the first count."""
    if not actor_counts:
        raise ValueError("actor_counts is empty")
    model_uri, model_note = resolve_model(model, workdir)
    images = workdir / "images"
    write_images(str(images), n, seed=seed)
    runs = []
    for r in range(repeats):
        for actors in actor_counts:
            sampler = PeakSampler(os.getpid(), interval=0.5)  # this process is the driver; Ray starts below it
            sampler.start()
            try:
                result = run_pipeline(
                    str(images),
                    str(workdir / f"out-{actors}-{r}"),
                    model_uri,
                    batch_size=batch_size,
                    actors=actors,
                    threads=threads,
                    ray_cpus=ray_cpus,
                )
            finally:
                sampler.stop()
            runs.append(
                {
                    "actors": actors,
                    "repeat": r,
                    "prepare_cpu_s": stage_cpu(result["operators"], "prepare_images"),
                    "segmenter_cpu_s": stage_cpu(result["operators"], "Segmenter"),
                    "process_cpu_s": sampler.cpu_by_role(),
                    **{k: v for k, v in result.items() if k != "ray_data_stats"},
                }
            )
    summary = []
    for actors in actor_counts:
        mine = [run for run in runs if run["actors"] == actors]
        entry: dict[str, Any] = {"actors": actors}
        for key in ("images_per_s_with_startup", "images_per_s_steady", "prepare_cpu_s", "segmenter_cpu_s"):
            values = [run[key] for run in mine if run[key] is not None]
            entry[key] = statistics.median(values) if values else None
        summary.append(entry)
    for entry in summary:
        for key in ("images_per_s_with_startup", "images_per_s_steady"):
            base = summary[0][key]
            entry[f"speedup_{key.removeprefix('images_per_s_')}"] = entry[key] / base if base and entry[key] else None
    return {
        "n": n,
        "model": model_note,
        "batch_size": batch_size,
        "threads_per_actor": threads,
        "ray_cpus": ray_cpus,
        "cores": os.cpu_count(),
        "repeats": repeats,
        "summary": summary,
        "runs": runs,
    }


def cpu_table(result: dict[str, Any]) -> str:
    """Roles as rows, the first repeat of each actor count as columns."""
    firsts = [next(run for run in result["runs"] if run["actors"] == s["actors"]) for s in result["summary"]]
    roles: list[str] = []
    for run in firsts:
        roles += [role for role in run["process_cpu_s"] if role not in roles]
    rows = [[role[:48], *(f"{run['process_cpu_s'].get(role, 0.0):.1f}" for run in firsts)] for role in roles]
    rows.append(["all processes", *(f"{sum(run['process_cpu_s'].values()):.1f}" for run in firsts)])
    rows.append(["capacity (wall x cores)", *(f"{run['wall_s'] * result['cores']:.1f}" for run in firsts)])
    return table(["process", *(f"{run['actors']} actor(s)" for run in firsts)], rows)


def tables(result: dict[str, Any]) -> str:
    def f(value: float | None, digits: int = 2) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    rows = [
        [
            s["actors"],
            f(s["images_per_s_with_startup"]),
            f(s["images_per_s_steady"]),
            f(s["speedup_with_startup"]),
            f(s["speedup_steady"]),
            f(s["prepare_cpu_s"], 1),
            f(s["segmenter_cpu_s"], 1),
        ]
        for s in result["summary"]
    ]
    ray_cpus = result["ray_cpus"] if result["ray_cpus"] is not None else "(the running Ray's)"
    return "\n".join(
        [
            f"{result['n']} synthetic images, model: {result['model']}, batch {result['batch_size']}, "
            f"{result['threads_per_actor']} thread(s) per actor; Ray: {ray_cpus} logical CPUs on "
            f"{result['cores']} cores",
            "",
            table(
                [
                    "actors",
                    "img/s with start-up",
                    "img/s steady",
                    "speed-up w/ start-up",
                    "speed-up steady",
                    "prepare CPU s",
                    "actor CPU s",
                ],
                rows,
            ),
            f"(target: {TARGET_SPEEDUP}x for 2 actors, steady; prepare = read + decode + resize, sharing the cores)",
            "",
            "CPU seconds by process during each run (Ray start-up included; capacity = wall x cores):",
            cpu_table(result),
        ]
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=200, help="images")
    parser.add_argument("--model", default="demo", help="demo | random-demo | micro | a checkpoint path or URI")
    parser.add_argument("--actors", dest="actor_counts", default="1,2", type=ints, help="comma-separated actor counts")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch threads = CPUs per actor")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--ray-cpus", type=int, default=(os.cpu_count() or 1) + 1, help="Ray's logical CPUs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="scaleout", help="results file name")
    run_and_publish(parser.parse_args(argv), bench, tables)


if __name__ == "__main__":
    main()
