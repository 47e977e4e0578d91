"""Memory: peak RSS of the driver and of the Ray workers for N1 = 200 vs N2 = 2000 images.

    python -m bench.memory [--n1 200] [--n2 2000] [--model micro] [--batch-size 4] [--threads 1]
                           [--distinct 100] [--interval 0.2] [--repeats 1] [--in-process]

Each run is `jobs.segment.job.run` from a local folder to local Parquet (`bench.job.run_pipeline`), in a fresh
process (spawned; it starts its own Ray), so neither run inherits the other's heap. A thread in this process
samples, every `--interval` seconds, the RSS of that process (the driver) and of all its descendants (Ray's
raylet, GCS and agents, and its workers: the prepare tasks, the model actor, the writers), and keeps the peak
of each process and the peak of each sum over time. A streaming job should need the same memory for 2 000
images as for 200 (target: within 10 %).

The images are small synthetic scenes (`--distinct` of them drawn with `pipeline.training.synthetic.generate`, repeated
to make up N files) and the default model is `micro` (64-128 px inputs), so 2 000 images stay quick; the
memory question is about the pipeline, not the model. `--model demo` measures with the bundled model.

With `--repeats K` each size runs K times and the ratios compare the medians: the object store's figure
is the high-water mark of the pages written into the run's own store file (found through the raylet's
mappings), which depends on the order in which blocks were freed and so varies from run to run; one run
per size cannot tell that apart from growth. Every run's figures are kept in the results.

RSS counts shared pages in every process that maps them (Ray's object store is shared memory that workers
map to read blocks without copying), so sums over processes overstate the machine's use; they are compared
between the two runs, where the overstatement is the same kind.
"""

from __future__ import annotations

import argparse
import importlib
import json
import multiprocessing
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import median, run_and_publish, table
from bench.job import run_pipeline, run_pipeline_to_file
from bench.workload import listed_uris, resolve_model, write_images

TARGET_RATIO = 1.10  # peak memory at N2 images within 10 % of N1 images (issue 9: 20 000 vs 2 000)
KINDS = ("driver", "worker", "ray")  # ray: raylet, GCS, dashboard and runtime-env agents, log monitor
MB = 1024**2


def _psutil() -> Any:
    """psutil: installed, or the copy Ray ships (importing ray puts ray/thirdparty_files on sys.path)."""
    try:
        return importlib.import_module("psutil")
    except ImportError:
        importlib.import_module("ray")
        return importlib.import_module("psutil")


class PeakSampler(threading.Thread):
    """Samples the RSS and CPU time of process `root` and its descendants every `interval` s until `stop()`.

    `peaks`: pid -> {"kind", "title", "peak_rss", "cpu_start", "cpu_s"}; `sum_peaks`: kind (and "all") -> the
    largest sum of the RSS of that kind's processes seen in one sample. `cpu_s` is the process's user + system time
    between the first sample that saw it (the sampler's start, for processes already running then, such
    as the driver) and its last sample (a process that exits loses at most one interval).
    """

    def __init__(self, root: int, interval: float) -> None:
        super().__init__(daemon=True)
        self.psutil = _psutil()
        self.root, self.interval = root, interval
        self.peaks: dict[int, dict[str, Any]] = {}
        self.sum_peaks: dict[str, int] = {kind: 0 for kind in (*KINDS, "all")}
        self.samples = 0
        self.store_peak = 0  # bytes of this Ray's object store (plasma) file the store has touched
        self._stop_event = threading.Event()

    def run(self) -> None:
        while True:
            self.sample()
            if self._stop_event.wait(self.interval):
                break

    def stop(self) -> None:
        self._stop_event.set()
        self.join()
        self.sample()  # the end state too

    def sample(self) -> None:
        psutil = self.psutil
        try:
            root = psutil.Process(self.root)
            processes = [root, *root.children(recursive=True)]
        except psutil.Error:
            return
        sums = dict.fromkeys(self.sum_peaks, 0)
        stores: dict[int, int] = {}  # inode -> allocated bytes of a plasma file the tree maps
        for process in processes:
            try:
                rss = process.memory_info().rss
                title = " ".join(process.cmdline())
                times = process.cpu_times()
            except psutil.Error:  # gone between listing and reading, or a zombie
                continue
            kind = "driver" if process.pid == self.root else _kind(title)
            cpu = times.user + times.system
            # a process already running at the first sample (the driver) is counted from then on
            first = {"kind": kind, "title": "", "peak_rss": 0, "cpu_start": cpu if self.samples == 0 else 0.0}
            entry = self.peaks.setdefault(process.pid, first)
            if rss >= entry["peak_rss"]:
                entry["peak_rss"] = rss
            entry["cpu_s"] = cpu - entry["cpu_start"]
            if not title.startswith("ray::IDLE") or not entry["title"]:  # what it did, not that it idled after
                entry["title"] = title[:100]
            sums[kind] += rss
            sums["all"] += rss
            if _program(title) == "raylet":
                stores.update(_plasma_files(process.pid))
        for kind, value in sums.items():
            self.sum_peaks[kind] = max(self.sum_peaks[kind], value)
        self.store_peak = max(self.store_peak, sum(stores.values()))
        self.samples += 1

    def summary(self, top: int = 8) -> dict[str, Any]:
        workers = [p for p in self.peaks.values() if p["kind"] == "worker"]
        driver = [p for p in self.peaks.values() if p["kind"] == "driver"]
        largest = sorted(self.peaks.values(), key=lambda p: p["peak_rss"], reverse=True)[:top]
        return {
            "driver_peak_mb": driver[0]["peak_rss"] / MB if driver else None,
            "largest_worker_peak_mb": max((p["peak_rss"] for p in workers), default=0) / MB,
            "workers_sum_peak_mb": self.sum_peaks["worker"] / MB,
            "ray_processes_sum_peak_mb": self.sum_peaks["ray"] / MB,
            "all_sum_peak_mb": self.sum_peaks["all"] / MB,
            "object_store_peak_mb": self.store_peak / MB,
            "processes_seen": len(self.peaks),
            "workers_seen": len(workers),
            "samples": self.samples,
            "largest_processes": [
                {"kind": p["kind"], "peak_mb": p["peak_rss"] / MB, "title": p["title"]} for p in largest
            ],
        }

    def cpu_by_role(self) -> dict[str, float]:
        """CPU seconds per role: "driver", a Ray worker's task or actor ("ray::MapBatches(prepare_images)",
        "ray::MapWorker(MapBatches(Segmenter))", from the last title it had before idling), or a Ray
        daemon by program name (raylet, gcs_server, ...)."""
        roles: dict[str, float] = {}
        for entry in self.peaks.values():
            role = _role(entry["kind"], entry["title"])
            roles[role] = roles.get(role, 0.0) + entry["cpu_s"]
        return dict(sorted(roles.items(), key=lambda kv: -kv[1]))


def _plasma_files(pid: int) -> dict[int, int]:
    """inode -> bytes allocated, of the object-store files process `pid` maps (Ray's raylet holds the store).

    The store is a file on /dev/shm that Ray unlinks once mapped, so only its mapping finds it; its
    allocated blocks are the pages written into it, by any process, whatever it holds now: the store's
    high-water mark. Counting /dev/shm as a whole would count every other Ray on the machine too (a test
    suite running beside the benchmark). Needs read access to /proc/<pid>/map_files (root or the owner).
    """
    found: dict[int, int] = {}
    try:
        with open(f"/proc/{pid}/maps") as maps:
            lines = [line.split() for line in maps if "/dev/shm/plasma" in line]
        for fields in lines:
            info = os.stat(f"/proc/{pid}/map_files/{fields[0]}")
            found[info.st_ino] = info.st_blocks * 512
    except OSError:  # gone, or not ours to read
        pass
    return found


def _role(kind: str, title: str) -> str:
    if kind == "driver":
        return "driver"
    if title.startswith("ray::"):
        return title.split()[0]
    program = title.split()[0] if title else "?"
    return os.path.basename(program) if kind == "ray" else f"worker {os.path.basename(program)}"


def _kind(title: str) -> str:
    """Ray sets its workers' process titles to `ray::<task or actor>`; before that they run default_worker.py
    (which the raylet's own command line names too, as the program to start workers with)."""
    if _program(title) == "raylet":
        return "ray"
    return "worker" if title.startswith("ray::") or "default_worker.py" in title else "ray"


def _program(title: str) -> str:
    return os.path.basename(title.split()[0]) if title else ""


def measure(
    n: int,
    *,
    repeat: int = 0,
    model_uri: str,
    images: Path,
    output: Path,
    batch_size: int,
    threads: int,
    interval: float,
    isolate: bool = True,
) -> dict[str, Any]:
    """One run over the first `n` files of `images`, sampled; returns the peaks and the run's rates.

    `isolate`: run the job in a fresh spawned process (the driver) that starts its own Ray. Otherwise run it
    here, reusing this process's Ray if it has one (the smoke test): the driver is then this process.
    """
    manifest = output.parent / f"manifest-{n}-{repeat}.txt"
    manifest.write_text("\n".join(listed_uris(str(images))[:n]) + "\n")
    kwargs = {
        "input": str(manifest),
        "output": str(output),
        "model_uri": model_uri,
        "batch_size": batch_size,
        "threads": threads,
    }
    if isolate:
        result_path = output.parent / f"result-{n}-{repeat}.json"
        process = multiprocessing.get_context("spawn").Process(
            target=run_pipeline_to_file, args=(kwargs, str(result_path))
        )
        process.start()
        sampler = PeakSampler(process.pid, interval)
        sampler.start()
        process.join()
        sampler.stop()
        if process.exitcode != 0:
            raise RuntimeError(f"the job over {n} images failed in its process (exit code {process.exitcode})")
        run = json.loads(result_path.read_text())
    else:
        sampler = PeakSampler(os.getpid(), interval)
        sampler.start()
        try:
            run = run_pipeline(**kwargs)
        finally:
            sampler.stop()
    keep = ("images", "errors", "wall_s", "images_per_s_with_startup", "images_per_s_steady", "timings_s")
    return {"n": n, "repeat": repeat, **sampler.summary(), "run": {k: run[k] for k in keep}}


def bench(
    *,
    n1: int,
    n2: int,
    model: str,
    batch_size: int,
    threads: int,
    distinct: int,
    interval: float,
    workdir: Path,
    isolate: bool = True,
    seed: int = 0,
    repeats: int = 1,
) -> dict[str, Any]:
    """`repeats` runs of each size over the same image files (the first n1 and n2 of max(n1, n2)), the
    sizes alternating; the ratios of the N2 and N1 medians."""
    model_uri, model_note = resolve_model(model, workdir)
    images = workdir / "images"
    write_images(str(images), max(n1, n2), seed=seed, distinct=distinct)
    shared = {"model_uri": model_uri, "images": images, "batch_size": batch_size, "threads": threads}
    runs = [
        measure(n, repeat=k, output=workdir / f"out-{n}-{k}", interval=interval, isolate=isolate, **shared)
        for k in range(repeats)
        for n in (n1, n2)
    ]
    metrics = [
        "driver_peak_mb",
        "largest_worker_peak_mb",
        "workers_sum_peak_mb",
        "ray_processes_sum_peak_mb",
        "object_store_peak_mb",
    ]
    metrics.append("all_sum_peak_mb")
    medians = {n: {m: _median([r[m] for r in runs if r["n"] == n]) for m in metrics} for n in (n1, n2)}
    ratios = {m: medians[n2][m] / medians[n1][m] if medians[n1][m] else None for m in metrics}
    return {
        "n1": n1,
        "n2": n2,
        "model": model_note,
        "batch_size": batch_size,
        "threads": threads,
        "distinct_images": distinct,
        "interval_s": interval,
        "isolated": isolate,
        "repeats": repeats,
        "medians": {str(n): values for n, values in medians.items()},
        "ratios": ratios,
        "runs": runs,
    }


def _median(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return median(known) if known else None


def tables(result: dict[str, Any]) -> str:
    n1, n2 = result["n1"], result["n2"]
    labels = {
        "driver_peak_mb": "driver peak RSS, MB",
        "largest_worker_peak_mb": "largest worker peak RSS, MB",
        "workers_sum_peak_mb": "workers' summed RSS, peak, MB",
        "ray_processes_sum_peak_mb": "Ray's own processes, summed, peak, MB",
        "all_sum_peak_mb": "everything summed, peak, MB",
        "object_store_peak_mb": "object store (pages of its file written), peak, MB",
    }
    medians = {int(n): values for n, values in result["medians"].items()}
    repeats = result.get("repeats", 1)

    def f(value: float | None, digits: int = 1) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    def each(n: int, key: str, digits: int = 1) -> str:
        values = [r[key] if key in r else r["run"][key] for r in result["runs"] if r["n"] == n]
        return " / ".join(f(v, digits) for v in values)

    rows = [[label, f(medians[n1][k]), f(medians[n2][k]), f(result["ratios"][k], 3)] for k, label in labels.items()]
    header = ["", f"{n1} images", f"{n2} images", f"ratio {n2}/{n1}"]
    if repeats > 1:
        header = ["", f"{n1} images (median)", f"{n2} images (median)", f"ratio {n2}/{n1}"]
        rows.append(
            [
                f"object store, each of {repeats} runs",
                each(n1, "object_store_peak_mb"),
                each(n2, "object_store_peak_mb"),
                "",
            ]
        )
    rows.append(["workers seen", each(n1, "workers_seen", 0), each(n2, "workers_seen", 0), ""])
    rows.append(
        [
            "images/s with start-up",
            each(n1, "images_per_s_with_startup", 2),
            each(n2, "images_per_s_with_startup", 2),
            "",
        ]
    )
    lines = [
        f"model: {result['model']}, batch {result['batch_size']}, 1 actor x {result['threads']} thread(s), "
        f"{result['distinct_images']} distinct scenes, sampled every {result['interval_s']} s, {repeats} run(s) each",
        "",
        table(header, rows),
        f"(target: ratio <= {TARGET_RATIO:.2f})",
    ]
    for run in result["runs"]:
        if run.get("repeat", 0) > 0:
            continue
        lines += ["", f"largest processes, {run['n']} images:"]
        lines.append(
            table(
                ["kind", "peak MB", "process"],
                [[p["kind"], f(p["peak_mb"]), p["title"][:80]] for p in run["largest_processes"]],
            )
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n1", type=int, default=200)
    parser.add_argument("--n2", type=int, default=2000)
    parser.add_argument("--model", default="micro", help="micro | demo | random-demo | a checkpoint path or URI")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch threads = CPUs of the actor")
    parser.add_argument("--distinct", type=int, default=100, help="distinct synthetic scenes, repeated to N files")
    parser.add_argument("--interval", type=float, default=0.2, help="seconds between samples")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each size; the ratios compare medians")
    parser.add_argument(
        "--in-process", dest="isolate", action="store_false", help="run the jobs in this process (not isolated)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="memory", help="results file name")
    run_and_publish(parser.parse_args(argv), bench, tables)


if __name__ == "__main__":
    main()
