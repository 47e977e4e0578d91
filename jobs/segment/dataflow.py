"""The Ray Data side of `m2f segment`: the pipeline up to the model's rows, and the driver's loop that pulls
those rows into the part-file writer (segment/commit.py), watching for signals and stalls.

    work manifest (Parquet, URIs)  --read_work_files, small blocks-->
    prepare_images (CPU tasks: read, decode, resize)  -->
    Segmenter (actor pool: the model, post-processing, the compact form on its device)  -->
    encode_rows (CPU tasks: RLE, statistics, output rows)  --blocks of rows-->  the driver

Also what the cluster's resources mean for that pipeline: which device the actors get, what it cannot
run, and why a run that stopped making progress stopped.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import pyarrow.compute as pc

from m2f.jobs.common.configs import SegmentConfig
from m2f.jobs.common.lifecycle import Stop
from m2f.jobs.common.progress import Progress
from m2f.jobs.segment.commit import PartWriter
from m2f.jobs.segment.resume import WORK_FILE_ROWS, WorkPlan, read_work_files
from m2f.model.config import PreprocessConfig
from m2f.model.fetch import Resolved, pack
from m2f.pipeline.budget import actor_memory, node_memory, prepare_memory
from m2f.pipeline.handover import encode_rows
from m2f.pipeline.infer import Segmenter, prepare_images
from m2f.pipeline.predictor import check_precision
from m2f.pipeline.reading import READ_BUDGET_BYTES, ReadLimits
from m2f.pipeline.schema import STATUS_OK

PREPARE_ROWS = 16  # images per prepare task: enough to overlap reads, small enough to spread over CPUs
ACTOR_BATCHES = 4  # the model actor sees this many forward batches at once, to group equal padded sizes
# Memory requests (pipeline.budget): a prepare task's is one decode at --max-pixels plus its reads ahead, and it
# also keeps Ray from fusing the task into the actors; the actor's, its batch post-processed plus the model.
READ_AHEAD_BYTES = READ_BUDGET_BYTES  # a prepare task's bytes read and not yet decoded (pipeline.reading)
MODEL_BYTES = 2 * 1024**3  # a model and one forward pass's activations (R50 at 800x1333: ~1.6 GB measured)
ENCODE_CPUS = 0  # per encode task: none (with one CPU each they waited for the prepare stage; see encode_concurrency)
ENCODE_SHARE = 0.5  # encode tasks at once, per CPU the actors leave (see encode_concurrency)
# Ray Data's object-store budget for the run, in units of the largest block one task makes: Ray Data shares
# its budget among the operators (half reserved, a quarter of that for each operator's tasks), and an
# operator whose next task's output would not fit its share never starts it: below ~16 blocks a run
# can stall before its first result (measured: a budget of 2 blocks did).
BUDGET_BLOCKS = 32
URI_BYTES = 256  # an upper bound on a work-manifest row (its URI) in a Ray block
STREAMING_BLOCKS_AHEAD = 64
REPLAN_IDLE_S = 30.0  # no image finished for this long: ask whether the cluster still holds the actor pool
REPLAN_POLL_S = 5.0  # and ask again this often while nothing finishes
HALT_WAIT_S = 30.0  # how long a re-plan waits for the results thread to leave Ray Data

log = logging.getLogger(__name__)


# --- Ray ------------------------------------------------------------------------------------------


def resolve_device(requested: str, cluster_gpus: float, gpus_per_actor: float, precision: str = "fp32") -> str:
    """auto -> cuda when the Ray cluster has GPUs (and actors may take one), else cpu. Raises ValueError for
    cuda without a GPU, and for fp16 on CPU."""
    device = requested
    if requested == "auto":
        device = "cuda" if cluster_gpus > 0 and gpus_per_actor > 0 else "cpu"
    elif requested == "cuda":
        if cluster_gpus <= 0:
            raise ValueError("--device cuda, but the Ray cluster has no GPU")
        if gpus_per_actor <= 0:
            raise ValueError("--device cuda needs --gpus-per-actor > 0")
    check_precision(precision, device)
    return device


def capacity_warnings(resources: dict[str, float], config: SegmentConfig, device: str) -> list[str]:
    """What the cluster (as it is now; an autoscaler may add more) cannot give the actor pool."""
    cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    out = []
    if config.actors * config.cpus_per_actor > cpus - 1:
        out.append(
            f"{config.actors} actors x {config.cpus_per_actor:g} CPUs leave less than one of the cluster's {cpus:g} "
            "CPUs for reading, decoding and writing: the job may stall (lower --actors or --cpus-per-actor)"
        )
    if device == "cuda" and config.actors * config.gpus_per_actor > gpus:
        out.append(f"{config.actors} actors x {config.gpus_per_actor:g} GPUs exceed the cluster's {gpus:g} GPUs")
    return out


def actors_that_fit(resources: dict[str, float], config: SegmentConfig, device: str) -> int:
    """How many model actors (at most --actors) the cluster's resources hold beside one prepare task."""
    fit = config.actors
    if config.cpus_per_actor > 0:
        fit = min(fit, int((resources.get("CPU", 0.0) - 1) // config.cpus_per_actor))
    if device == "cuda" and config.gpus_per_actor > 0:
        fit = min(fit, int(resources.get("GPU", 0.0) // config.gpus_per_actor))
    return max(0, fit)


class Shrink(NamedTuple):
    """A smaller actor pool for a cluster that lost resources: how many actors, its CPUs, and why."""

    actors: int
    cluster_cpus: float
    reason: str


def fewer_actors(config: SegmentConfig, device: str) -> Shrink | None:
    """The smaller actor pool a shrunken cluster can run; None while the pool fits (or nothing does).

    Called when no image has finished for a while. A node lost for good takes its share of the cluster:
    Ray restarts the lost model actors wherever resources are left, and a restarted actor can take the CPU
    the prepare stage needs (nothing feeds the actors) or wait for a GPU that is gone (the tasks it held
    never finish). Neither resolves itself; a pipeline with fewer actors runs.
    """
    import ray

    try:
        resources = ray.cluster_resources()
    except Exception:  # the cluster does not answer: the stall timeout decides
        return None
    fit = actors_that_fit(resources, config, device)
    if not 0 < fit < config.actors:
        return None
    cpus = resources.get("CPU", 0.0)
    cluster = f"{cpus:g} CPUs" + (f", {resources.get('GPU', 0.0):g} GPUs" if device == "cuda" else "")
    reason = (
        f"the cluster ({cluster}) no longer holds {config.actors} model actor(s) beside the prepare stage and no "
        f"image finished: a node may have been lost; going on with {fit} actor(s)"
    )
    return Shrink(fit, cpus, reason)


def explain_stall(seconds: float, config: SegmentConfig, device: str) -> str:
    """Why nothing has finished for `seconds`, as far as the cluster's resources tell."""
    import ray

    text = f"no image finished for {seconds:.0f} s"
    try:
        total, free = ray.cluster_resources(), ray.available_resources()
        nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
    except Exception:
        return text + " (the Ray cluster does not answer)"
    cpus, free_cpus = total.get("CPU", 0.0), free.get("CPU", 0.0)
    if free_cpus < 1:
        return text + (
            f": the cluster ({nodes} node(s)) has {free_cpus:g} of {cpus:g} CPUs free, too few for the prepare "
            f"stage (1 CPU a task) beside {config.actors} model actor(s) x {config.cpus_per_actor:g} CPUs; "
            "a node may have been lost: add one, or lower --actors"
        )
    if device == "cuda" and total.get("GPU", 0.0) < config.gpus_per_actor:
        return text + f": the cluster ({nodes} node(s)) has {total.get('GPU', 0.0):g} GPUs, too few for a model actor"
    return text + f" ({nodes} node(s), {free_cpus:g} of {cpus:g} CPUs free)"


def object_store_budget(config: SegmentConfig, preprocess: PreprocessConfig) -> int | None:
    """Bytes of Ray's object store the run's pipeline may hold at once; None: Ray Data's own default.

    Ray Data's default budget is a share of the whole object store (30 % of RAM), and the prepare stage,
    faster than the model, fills it: what the run holds then grows with its length, up to gigabytes. A
    budget of BUDGET_BLOCKS of the largest block any stage makes (the prepare tasks' resized images, the
    model actor's input, a work-manifest file's URIs) keeps the model fed and is the same for a thousand
    images as for a hundred million. `M2F_OBJECT_STORE_BUDGET_MB` overrides it; 0 gives Ray Data's default.
    """
    override = os.environ.get("M2F_OBJECT_STORE_BUDGET_MB")
    if override is not None:
        megabytes = float(override)
        return int(megabytes * 1024**2) if megabytes > 0 else None
    image = preprocess.min_size * preprocess.max_size * 3  # a resized uint8 RGB image at most
    blocks = (PREPARE_ROWS * image, config.batch_size * ACTOR_BATCHES * image, WORK_FILE_ROWS * URI_BYTES)
    return BUDGET_BLOCKS * max(blocks) * max(1, config.actors)


def _quiet_ray_data() -> None:
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # ours (common/progress.py) work in logs and on terminals alike
    # A task may run this many blocks ahead of the executor taking them (Ray Data's default: 2). The
    # repartition cuts each work file into hundreds of small blocks; two at a time it delivered about 10
    # blocks (160 images) a second while holding a CPU, which capped the whole run and kept the first
    # result back for a minute on 2 CPUs (10 000 images: 24 -> 52 images/s, first result 65 -> 12 s).
    # A private field (Ray 2.60): where it is gone, the default applies.
    if hasattr(ctx, "_max_num_blocks_in_streaming_gen_buffer"):
        ctx._max_num_blocks_in_streaming_gen_buffer = STREAMING_BLOCKS_AHEAD
    ctx.print_on_execution_start = False
    ctx.enable_auto_log_stats = False
    ctx.verbose_stats_logs = False
    # Ray Data sets its loggers up when first imported, after common/cluster.py quietened them: again here.
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)


def prepare_concurrency(cluster_cpus: float, config: SegmentConfig) -> int:
    """How many prepare tasks may run at once: the CPUs the model actors leave (at least one).

    Without a cap the prepare stage, upstream and so first in Ray Data's resource reservation, takes every
    CPU as the run starts, and the model actors wait for it to run out of input or of object-store
    budget: the first result then comes after a time that grows with the input (65 s for 10 000 images
    on 2 CPUs, 2 minutes for 20 000) and the decoded images pile up meanwhile. Measured on the cluster as
    it is at the start; an autoscaler's later nodes serve the actors, not more prepare tasks.
    """
    return max(1, int(cluster_cpus - config.actors * config.cpus_per_actor))


def model_actor_pool(actors: int) -> Any:
    """A fixed pool of `actors` model actors.

    Not Ray Data's autoscaling pool (min 1, max `actors`), although it can release an actor that a lost
    node's restart made too many for the CPUs left: its rule (shrink when at most half the actors have a
    task, grow when they have a backlog) churned in ordinary runs, and deadlocked after a node loss.
    Measured (2 actors on 3 CPUs, a 1-CPU node lost, under load, Ray 2.60's autoscaler log): the pool
    shrank to one actor 15 s into the run and grew again 4 s later, constructing the model anew each time;
    in 1 of 3 runs the actor it had added took the last CPU while the lost actor, holding tasks in flight,
    waited to restart, so utilisation stayed within bounds, nothing shrank, and the run stalled. A model
    load per swing is seconds of GPU time, so a fixed pool it is. A cluster left too small for the pool
    and one prepare task is met by the driver instead: it ends that execution and starts the pipeline
    again, over the images left, with the actors the cluster holds (`fewer_actors`, segment/process.py).
    """
    import ray.data

    return ray.data.ActorPoolStrategy(size=max(1, actors))


def encode_concurrency(cluster_cpus: float, config: SegmentConfig) -> int:
    """How many encode tasks may run at once: half the CPUs the model actors leave (at least one).

    The encode tasks ask for no CPU (ENCODE_CPUS): with one CPU each they got none while the prepare stage
    had images left to read (Ray Data ranked it first, and its tasks took every free CPU), so no row reached
    the driver until every image had been prepared (measured, 200 images on 2 CPUs: the first encode task
    started as the prepare stage ended, 12 s in; with 0 CPUs, with the actor's first output). This cap is
    then what bounds their CPU use. Per COCO-size image, read + decode + resize cost ~10.5 core-ms, RLE +
    statistics + row from the compact form ~1.1 (panoptic, semantic) to ~7.7 (instance, 100 masks)
    (`python -m bench.budget`, bench/NOTES.md). Half is what instance output needs at 500 images/s on a
    16-core node with one GPU actor (7 tasks encode ~900 images/s; a quarter, 3 tasks, would bound the run
    at ~390), and panoptic output leaves most of those slots idle.
    """
    return max(1, int(prepare_concurrency(cluster_cpus, config) * ENCODE_SHARE))


def read_limits(max_file_bytes: int) -> ReadLimits:
    """What a prepare task may read: `--max-file-bytes` per file; `M2F_READ_TIMEOUT_S` overrides the seconds
    one read may take (pipeline.reading's default) where a slow store needs more, or a test less."""
    timeout = os.environ.get("M2F_READ_TIMEOUT_S")
    if timeout:
        return ReadLimits(max_file_bytes=max_file_bytes, timeout_s=float(timeout))
    return ReadLimits(max_file_bytes=max_file_bytes)


def actor_weights(weights: Resolved, *, joined: bool) -> str | list[Any]:
    """What the model actors load: the checkpoint's local path, or, where the driver fetched it (a zoo name,
    a URL, a hub id) and the cluster was joined (its workers cannot see the driver's disk), a one-item list
    holding its bytes in Ray's object store (`fetch.pack`): put once per run, never one download per actor.
    The list keeps Ray from resolving the reference before the actor asks for it."""
    if weights.kind == "local" or not joined:
        return weights.local
    import ray

    return [ray.put(pack(weights.local))]


def build_dataset(
    config: SegmentConfig,
    plan: WorkPlan,
    *,
    weights: str | list[Any],
    preprocess: PreprocessConfig,
    task: str,
    device: str,
    run_id: str,
    cluster_cpus: float,
) -> Any:
    """The Ray Data pipeline over the work manifest, up to the output rows (not executed).

    The prepare tasks and the model actors reserve memory for an image at --max-pixels (`pipeline.budget`),
    each request capped to a quarter of the smallest node's memory: Ray cannot place a request larger than a
    node, and the job would wait for ever.
    """
    import ray.data

    _quiet_ray_data()
    options = ray.data.DataContext.get_current().execution_options
    budget = object_store_budget(config, preprocess)
    node = node_memory()
    options.resource_limits = options.resource_limits.copy(object_store_memory=budget or float("inf"))
    storage = config.storage
    # The work files are read by a plain task, not read_parquet: in Ray 2.60 that datasource starts 32
    # footer-reading actors for a handful of tiny files, which cost tens of seconds of every run's start.
    ds = ray.data.from_items([{"path": p} for p in plan.files])
    # No CPU for this task: it streams a work file out as small blocks for as long as the prepare stage
    # takes them, and with a CPU of its own it kept one from prepare that whole time (on 2 CPUs with one
    # model actor, no image was prepared until every block had been cut: a minute for 10 000 images).
    ds = ds.map_batches(
        read_work_files,
        batch_size=1,
        batch_format="pyarrow",
        fn_kwargs={"output": config.output, "storage": storage},
        num_cpus=0,
        compute=ray.data.TaskPoolStrategy(size=1),  # one work file at a time is plenty: it takes milliseconds
    )
    # Small blocks spread decoding over every CPU (a work file is one block of up to WORK_FILE_ROWS URIs).
    ds = ds.repartition(target_num_rows_per_block=PREPARE_ROWS)
    ds = ds.map_batches(
        prepare_images,
        batch_size=PREPARE_ROWS,
        batch_format="numpy",
        fn_kwargs={
            "preprocess": preprocess,
            "max_pixels": config.max_pixels,
            "storage": storage,
            "limits": read_limits(config.max_file_bytes),
        },
        memory=prepare_memory(config.max_pixels, READ_AHEAD_BYTES, node),
        compute=ray.data.TaskPoolStrategy(size=prepare_concurrency(cluster_cpus, config)),
    )
    ds = _model_stage(ds, config, weights, task=task, device=device, run_id=run_id, node=node)
    # The actors hand over compact rows (an id map or packed crops per image); encoding them is CPU work
    # that would otherwise hold the accelerator back. One actor output block (a few forward batches) per
    # task: no re-batching, and an actor pool is never fused with the task stage after it.
    return ds.map_batches(
        encode_rows,
        batch_size=None,
        batch_format="pyarrow",
        num_cpus=ENCODE_CPUS,
        compute=ray.data.TaskPoolStrategy(size=encode_concurrency(cluster_cpus, config)),
    )


def _model_stage(
    ds: Any, config: SegmentConfig, weights: str | list[Any], *, task: str, device: str, run_id: str, node: int | None
) -> Any:
    """`ds` through the model actors (`Segmenter`) loading `weights` (`actor_weights`), each with its memory
    request at --max-pixels."""
    gpu = {"num_gpus": config.gpus_per_actor} if device == "cuda" else {}
    return ds.map_batches(
        Segmenter,
        batch_size=config.batch_size * ACTOR_BATCHES,
        batch_format="numpy",
        compute=model_actor_pool(config.actors),
        num_cpus=config.cpus_per_actor,
        memory=actor_memory(config.max_pixels, config.batch_size, MODEL_BYTES, node),
        fn_constructor_args=(weights,),
        fn_constructor_kwargs={
            "run_id": run_id,
            "device": device,
            "task": task,
            "precision": config.precision,
            "batch_size": config.batch_size,
            "score_threshold": config.score_threshold,
            "preset": config.preset,
            "storage": config.storage,
            "num_threads": max(1, int(config.cpus_per_actor)),
        },
        **gpu,
    )


def stream_results(
    ds: Any,
    writer: PartWriter,
    progress: Progress,
    stop: Stop,
    *,
    stall_timeout: float,
    explain: Callable[[float], str],
    shrink: Callable[[], Shrink | None] = lambda: None,
) -> Shrink | None:
    """Pull the model's rows into `writer` until the dataset is exhausted or `stop` is requested (by a
    signal, or here, when no image finished for `stall_timeout` seconds). Raises what failed the pulling.

    A thread pulls (Ray Data's iterator blocks); this thread wakes every second to commit rows that have
    waited long enough, print progress, and notice a stop, so neither a signal nor a stall waits on Ray.
    When no image has finished for REPLAN_IDLE_S (or half the stall timeout, if less), `shrink()` is
    asked every few seconds whether a smaller actor pool should take over (see `fewer_actors`); if it
    names one, the execution ends here and that `Shrink` is returned, for the caller to start the
    pipeline again over the images left. None: the dataset is exhausted, or a stop ended it.
    """
    state: dict[str, Any] = {"last": time.monotonic(), "error": None, "halt": False}
    replan_after = min(REPLAN_IDLE_S, stall_timeout / 2)
    asked = 0.0  # when shrink() was last asked

    def pull() -> None:
        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                if stop.requested or state["halt"]:
                    return
                writer.add(batch)
                errors = batch.num_rows - int(pc.sum(pc.equal(batch["status"], STATUS_OK)).as_py() or 0)
                progress.update(batch.num_rows, errors)
                state["last"] = time.monotonic()
        except BaseException as e:  # raised in the caller's thread below
            state["error"] = e

    puller = threading.Thread(target=pull, name="m2f-results", daemon=True)
    puller.start()
    while puller.is_alive():
        puller.join(1.0)
        writer.flush_if_due()
        progress.tick()
        now = time.monotonic()
        if not stop.requested and now - state["last"] > stall_timeout:
            stop.stall(explain(now - state["last"]))
        if stop.requested:
            stop_execution(ds, puller)
            return None
        if now - state["last"] > replan_after and now - asked >= REPLAN_POLL_S:
            asked = now
            smaller = shrink()
            if smaller is not None:
                state["halt"] = True
                stop_execution(ds, puller, wait=HALT_WAIT_S)
                if not puller.is_alive():
                    return smaller
                # Still inside Ray Data: it might yet hand the writer rows that the re-plan counts as left
                # (a second row for an image), so no re-plan; end as a stall, keeping what is committed.
                stop.stall(explain(now - state["last"]) + "; the pipeline did not stop for a re-plan")
                return None
    if state["error"] is not None and not stop.requested:
        raise state["error"]
    return None


def stop_execution(ds: Any, puller: threading.Thread, wait: float = 5.0) -> None:
    """End a dataset's streaming execution that is still running (a stop or a stall), before Ray is shut
    down: left alone, its executor thread goes on calling Ray after the shutdown and starts or joins a
    second Ray. Ray Data offers no public way to stop an `iter_batches` another thread is blocked in;
    `_current_executor` is where Ray 2.x keeps it (checked on 2.60), so this degrades to nothing if it moves.
    """
    executor = getattr(ds, "_current_executor", None)
    if executor is not None:
        try:
            executor.shutdown(force=True)
        except Exception:
            log.debug("stopping Ray Data's executor failed", exc_info=True)
    puller.join(wait)
