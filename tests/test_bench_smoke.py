"""The benchmarks in a tiny configuration, so that they cannot rot.

Each bench's core function runs end to end on a handful of images with the micro model: the bare loop,
`m2f segment` on a local Ray from a folder and from a moto S3 server, the memory sampler, 1 vs 2 actors, and the
GPU bench's CPU path. The figures mean little at this size: what is checked is that every one of them exists,
lies within plausible bounds, and agrees with the figures it is derived from; nothing is written to bench/results.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
import torch

from bench import actor, budget, gpu, memory, scaleout
from bench import pipeline as pipeline_bench


@pytest.fixture(autouse=True)
def torch_threads() -> Iterator[None]:
    """The benchmarks pin torch to one thread, as they measure; the tests after them get theirs back."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ray_three_cpus() -> Iterator[None]:
    """One local Ray for the module, with 3 logical CPUs: two 1-CPU actors and a prepare task fit."""
    import ray

    from m2f.jobs.common.cluster import connect

    started = connect(None, num_cpus=3)
    yield
    if started:
        ray.shutdown()


def test_steady_rate_leaves_out_the_first_batch() -> None:
    rate, span = pipeline_bench.steady_rate([5.0, 0.0, 0.0, 2.0, 3.0], skip=2)  # order does not matter
    assert (rate, span) == (pytest.approx(0.6), 5.0)  # 3 rows after the first 2, over 5 s
    assert pipeline_bench.steady_rate([1.0], skip=4) == (None, None)


def test_pipeline_bench_compares_the_job_with_the_bare_loop(ray_three_cpus, tmp_path) -> None:
    result = pipeline_bench.bench(
        n=5, model="micro", batch_size=2, actors=1, threads=1, sources=["local", "s3"], repeats=1, workdir=tmp_path
    )
    modes = {s["mode"]: s for s in result["summary"]}
    assert set(modes) == {"bare loop", "pipeline local", "pipeline s3"}
    bare = modes["bare loop"]
    for s in modes.values():
        assert s["images"] == 5 and s["images_per_s_with_startup"] > 0 and s["images_per_s_steady"] > 0
        for rate in ("with_startup", "steady"):  # each mode's rate over the bare loop's (itself: 1)
            assert s[f"ratio_{rate}"] == pytest.approx(s[f"images_per_s_{rate}"] / bare[f"images_per_s_{rate}"])
    assert bare["ratio_with_startup"] == pytest.approx(1.0) and bare["ratio_steady"] == pytest.approx(1.0)
    assert len({s["segments"] for s in modes.values()}) == 1  # the same forward passes everywhere
    for run in result["runs"][1:]:
        assert {"ray_start", "model_probe", "list_and_plan", "processing", "ray_stop"} <= set(run["timings_s"])
        assert any("Segmenter" in op["name"] for op in run["operators"]) and "Segmenter" in run["ray_data_stats"]
    text = pipeline_bench.tables(result)
    assert "pipeline s3" in text and "MapBatches(prepare_images)" in text
    with pytest.raises(ValueError, match="sources"):
        pipeline_bench.bench(
            n=1, model="micro", batch_size=1, actors=1, threads=1, sources=["ftp"], repeats=1, workdir=tmp_path
        )


def test_memory_bench_samples_the_driver_and_the_workers(ray_three_cpus, tmp_path) -> None:
    result = memory.bench(
        n1=2,
        n2=4,
        model="micro",
        batch_size=2,
        threads=1,
        distinct=2,
        interval=0.05,
        workdir=tmp_path,
        isolate=False,  # reuse the module's Ray; `python -m bench.memory` spawns a process per run
        repeats=2,
    )
    assert sorted((run["n"], run["repeat"]) for run in result["runs"]) == [(2, 0), (2, 1), (4, 0), (4, 1)]
    drivers = sorted(run["driver_peak_mb"] for run in result["runs"] if run["n"] == 4)
    assert result["medians"]["4"]["driver_peak_mb"] == pytest.approx(sum(drivers) / 2)
    for run in result["runs"]:
        assert run["run"]["images"] == run["n"]
        assert run["driver_peak_mb"] > 0 and run["workers_seen"] >= 1 and run["largest_worker_peak_mb"] > 0
        assert run["all_sum_peak_mb"] >= max(run["driver_peak_mb"], run["workers_sum_peak_mb"])
    rss = {name: ratio for name, ratio in result["ratios"].items() if name != "object_store_peak_mb"}
    assert all(ratio is not None and ratio > 0 for ratio in rss.values())
    # The object store was filled before this in-process run (the module's Ray): it may have grown by nothing
    # here, but the pages written into its file can never exceed the store's capacity.
    import ray

    capacity_mb = ray.cluster_resources()["object_store_memory"] / 2**20
    assert all(0 <= run["object_store_peak_mb"] <= capacity_mb * 1.05 for run in result["runs"])
    assert "ratio 4/2" in memory.tables(result)


def test_the_sampler_reads_the_object_store_of_its_own_ray(ray_three_cpus) -> None:
    """The object-store figure is the pages written into the store file of the Ray the sampled tree runs (here
    the module's, started by this process), not /dev/shm as a whole: an object 24 MB larger than every page
    written there before raises the mark by its size."""
    import numpy as np
    import ray

    sampler = memory.PeakSampler(os.getpid(), interval=1.0)
    sampler.sample()
    before = sampler.store_peak  # what earlier tests wrote; a new object may reuse those pages
    size = before + 24 * 2**20  # so only an object larger than all of them must raise the mark
    ref = ray.put(np.ones(size, dtype=np.uint8))
    sampler.sample()
    del ref
    assert sampler.store_peak >= size
    assert sampler.summary()["object_store_peak_mb"] >= size / 2**20


def test_the_sampler_follows_a_spawned_process_tree() -> None:
    """What `measure(isolate=True)` relies on: the peak of a child's child, 64 MB of it touched, and its CPU
    time (a busy second, after the sampler has seen it idle) for the scale-out bench's accounting."""
    code = (
        "import subprocess, sys; subprocess.run([sys.executable, '-c', "
        "'import time; b = bytes([1]) * 64 * 2**20; time.sleep(0.5); t = time.process_time()\\n"
        "while time.process_time() - t < 1.0: pass\\ntime.sleep(0.5)'])"
    )
    child = subprocess.Popen([sys.executable, "-c", code])
    sampler = memory.PeakSampler(child.pid, interval=0.05)
    sampler.start()
    child.wait()
    sampler.stop()
    summary = sampler.summary()
    assert summary["processes_seen"] >= 2 and summary["samples"] > 3
    assert max(p["peak_mb"] for p in summary["largest_processes"]) >= 64
    roles = sampler.cpu_by_role()
    assert "driver" in roles and sum(roles.values()) >= 0.9  # the grandchild's busy second


def test_scaleout_bench_runs_one_and_two_actors(ray_three_cpus, tmp_path) -> None:
    result = scaleout.bench(
        n=6,
        model="micro",
        actor_counts=[1, 2],
        batch_size=2,
        threads=1,
        repeats=1,
        workdir=tmp_path,
        ray_cpus=None,  # the module's Ray
    )
    first, second = result["summary"]
    assert (first["actors"], second["actors"]) == (1, 2)
    assert first["speedup_steady"] == pytest.approx(1.0) and second["speedup_steady"] > 0
    for entry in (first, second):  # both stages did work in both runs, and Ray Data's stats counted it
        assert entry["prepare_cpu_s"] > 0 and entry["segmenter_cpu_s"] > 0
    assert second["speedup_with_startup"] == pytest.approx(
        second["images_per_s_with_startup"] / first["images_per_s_with_startup"]
    )
    roles = result["runs"][0]["process_cpu_s"]
    assert "driver" in roles and any("Segmenter" in role for role in roles)
    text = scaleout.tables(result)
    assert "speed-up steady" in text and "capacity (wall x cores)" in text


def test_gpu_bench_cpu_smoke_path(ray_three_cpus, tmp_path) -> None:
    result = gpu.bench(
        device="cpu",
        smoke=True,
        presets=["r50_coco_panoptic", "swin_l_coco_panoptic"],
        sizes=[(64, 64)],
        precisions=["fp32", "bf16"],
        batches=[1, 2],
        warmup=1,
        iters=1,
        workdir=tmp_path,
        pipeline_n=3,
        pipeline_presets=["r50_coco_panoptic"],
        pipeline_precisions=["bf16"],
        pipeline_batch_size=2,
    )
    assert len(result["forward"]) == 2 * 2 * 2
    for row in result["forward"]:
        assert not row["oom"] and row["images_per_s"] > 0 and row["gflops_per_image"] > 0
        assert row["tflops"] == pytest.approx(row["gflops_per_image"] * row["images_per_s"] / 1000)
        assert row["ms_per_pass"] == pytest.approx(1000 * row["batch"] / row["images_per_s"])
    combos = {(row["preset"], row["precision"], row["batch"]) for row in result["forward"]}
    assert combos == {
        (f"{m}-smoke", p, b)
        for m in ("r50_coco_panoptic", "swin_l_coco_panoptic")
        for p in ("fp32", "bf16")
        for b in (1, 2)
    }
    flops = {(row["preset"], row["gflops_per_image"]) for row in result["forward"]}
    assert len(flops) == 2  # one count per net (one size): precision and batch do not change it
    (run,) = result["pipeline"]
    assert run["images"] == 3 and run["images_per_s_with_startup"] > 0
    assert "swin_l_coco_panoptic-smoke" in gpu.tables(result)


def test_gpu_bench_without_cuda_says_so_and_exits_0(monkeypatch, capsys) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu.main([]) == 0
    assert "CUDA is not available" in capsys.readouterr().out


def test_budget_bench_sums_its_stages_for_every_task(tmp_path) -> None:
    result = budget.bench(images=1, repeats=1, instance_kept=5, seed=0, workdir=tmp_path)
    assert set(result["tasks"]) == set(budget.TASKS)
    for figures in result["tasks"].values():
        stages = figures["stages_core_ms"]
        assert stages["read + decode"] > 0 and stages["resize"] > 0 and stages["encode + statistics + row"] > 0
        assert figures["total_core_ms_cpu_only"] == pytest.approx(sum(stages.values()))
        on_device = stages["normalise + pad"] + stages["compact (device)"]
        assert figures["total_core_ms"] == pytest.approx(sum(stages.values()) - on_device)
        sent = figures["device_to_host_bytes"]
        assert 0 < sent["compact"] < sent["full_masks"] and figures["encode_full_masks_core_ms"] > 0
        assert figures["images_per_s_16_cores"] == pytest.approx(16_000 / figures["total_core_ms"])
    assert "instance" in budget.tables(result)


def test_actor_bench_times_the_three_designs_and_the_gil(tmp_path) -> None:
    result = actor.bench(images=1, repeats=1, queries=8, batch=1, seed=0, workdir=tmp_path)
    for figures in result["tasks"].values():
        assert (
            figures["actor now (compact on the device)"] > 0 and figures["encode stage from compact (a CPU task)"] > 0
        )
    assert all(g["serial_ms"] > 0 and g["two_threads_ms"] > 0 for g in result["gil"].values())
    assert "thread pool" in actor.tables(result)


def test_big_images_bench_measures_every_stage_of_an_ordinary_image(tmp_path) -> None:
    from bench import big_images

    result = big_images.bench("demo", "ordinary", "panoptic", "smoke", limit_gb=12.0, workdir=tmp_path)
    (run,) = result["runs"]
    assert "failed" not in run and run["segments"] > 0
    assert set(run["stages"]) == {"decode", "resize", "predict", "row", "encode", "preview"}
    assert set(run["roles_mb"]) == {"prepare", "actor", "encode", "driver"}
    assert run["tree_mb"] == pytest.approx(sum(run["roles_mb"].values())) and run["process_peak_mb"] > run["idle_mb"]
    assert "ordinary" in big_images.tables(result)
