"""The loop every Ray Train worker runs: its shard of the data, large-scale jitter and flips, the
Mask2Former objective, AdamW with clipping and the poly schedule; rank 0 writes checkpoints and tells
the driver how far it is (a small progress actor), so that the driver, not Ray's log forwarding, draws
the progress a person or a scheduler's log sees."""

from __future__ import annotations

import functools
import json
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from m2f.jobs.common.configs import TrainConfig
from m2f.jobs.train.checkpoints import read_latest, write_checkpoint
from m2f.jobs.train.setup import build_for_training, lr_factor, open_dataset, param_groups, total_steps
from m2f.pipeline.storage import open_fs, write_atomic


class TrainProgress:
    """Rank 0's last report, held for the driver (a Ray actor, no CPU): {"step", "loss", "lr", "notes"}."""

    def __init__(self) -> None:
        self.state: dict[str, Any] = {"step": None, "notes": []}

    def update(self, state: dict[str, Any]) -> None:
        self.state = {**state, "notes": self.state["notes"]}

    def note(self, text: str) -> None:
        self.state["notes"].append(text)

    def take(self) -> dict[str, Any]:
        """The state, and the notes since the last call."""
        state = dict(self.state)
        self.state["notes"] = []
        return state


@dataclass(frozen=True)
class Worker:
    """Where this worker stands: its rank among `world`, its device, and the run's length in steps."""

    rank: int
    world: int
    device: torch.device
    amp_dtype: torch.dtype | None  # autocast to this (bf16 on a GPU that has it), or none
    steps_per_epoch: int
    total: int


@dataclass(frozen=True)
class Resumed:
    """What the latest checkpoint restores: its step, the optimiser's state, metrics.jsonl's lines."""

    step: int = 0
    state: dict[str, Any] | None = None
    metrics_lines: list[str] = field(default_factory=list)


def train_loop(loop_config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker. `loop_config`: the TrainConfig's fields, and "progress", the
    driver's TrainProgress actor."""
    import ray.train
    import ray.train.torch

    from m2f.model.criterion import LossConfig, SetCriterion

    loop_config = dict(loop_config)
    progress = loop_config.pop("progress", None)
    cfg = TrainConfig(**loop_config)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.threads_per_worker)
    torch.manual_seed(cfg.seed)
    device = ray.train.torch.get_device() if cfg.use_gpu else torch.device("cpu")

    dataset = open_dataset(cfg)
    net, reset = build_for_training(cfg, list(dataset.categories))
    if reset and rank == 0 and progress is not None:
        progress.note.remote(f"re-initialised (the class count differs from --init): {', '.join(reset)}")
    amp_dtype = torch.bfloat16 if (cfg.use_gpu and torch.cuda.is_bf16_supported()) else None
    worker = Worker(rank, world, device, amp_dtype, *total_steps(cfg, len(dataset), world))
    resumed = _resume(cfg, net)

    net.train()
    net = ray.train.torch.prepare_model(net) if world > 1 else net.to(device)  # DDP (gloo on CPU)
    inner = net.module if hasattr(net, "module") else net
    optimizer = torch.optim.AdamW(param_groups(inner, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if resumed.state:
        optimizer.load_state_dict(resumed.state["optimizer"])
    criterion = SetCriterion(inner.config.num_classes, LossConfig(num_points=cfg.num_points))
    preprocess = inner.config.preprocess
    batch_at = functools.partial(_batch_at, cfg, dataset, worker, preprocess.pixel_mean, preprocess.pixel_std)
    _run_steps(cfg, worker, net, inner, optimizer, criterion, batch_at, resumed, progress)


def _resume(cfg: TrainConfig, net: torch.nn.Module) -> Resumed:
    """Load the latest checkpoint into `net`, if OUTPUT holds one; its optimiser state and metrics lines."""
    from m2f import model as m2f
    from m2f.model.safe_pickle import load_torch

    latest = read_latest(cfg)
    if not latest:
        return Resumed()
    out = cfg.output.rstrip("/")
    restored = m2f.load(f"{out}/{latest['model']}", storage_options=cfg.options(cfg.output))
    net.load_state_dict(restored.state_dict())
    fs, path = open_fs(f"{out}/{latest['state']}", cfg.options(cfg.output))
    state = load_torch(fs.cat_file(path))
    fs, path = open_fs(f"{out}/metrics.jsonl", cfg.options(cfg.output))
    lines = [line + "\n" for line in fs.cat_file(path).decode().splitlines() if line] if fs.exists(path) else []
    return Resumed(int(latest["step"]), state, lines)


def _batch_at(
    cfg: TrainConfig, dataset: Any, worker: Worker, mean: Any, std: Any, step: int
) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    """The batch of `step` on this worker: a function of (seed, step, rank) only, so resumes match."""
    from m2f.pipeline.training.augment import collate, large_scale_jitter, random_flip

    epoch, pos = divmod(step, worker.steps_per_epoch)
    order = np.random.default_rng((cfg.seed, epoch)).permutation(len(dataset))
    first = (pos * worker.world + worker.rank) * cfg.batch_size
    idx = order[first : first + cfg.batch_size]
    rng = np.random.default_rng((cfg.seed, step, worker.rank))
    samples = []
    for i in idx:
        s = dataset.load(int(i))
        s = large_scale_jitter(s, output_size=cfg.image_size, min_scale=cfg.min_scale, max_scale=cfg.max_scale, rng=rng)
        samples.append(random_flip(s, rng))
    return collate(samples, mean, std)


def _run_steps(
    cfg: TrainConfig,
    worker: Worker,
    net: torch.nn.Module,
    inner: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    criterion: Any,
    batch_at: Callable[[int], Any],
    resumed: Resumed,
    progress: Any,
) -> None:
    """Steps from the resumed one to the last: one batch prepared ahead, checkpoints and reports on the way."""
    import ray.train

    start, total, rank = resumed.step, worker.total, worker.rank
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    metrics_lines = list(resumed.metrics_lines)
    pool = ThreadPoolExecutor(1)  # prepares the next batch while this one trains
    upcoming = pool.submit(batch_at, start) if start < total else None
    loss_sum, t0, last = 0.0, time.time(), {}
    for step in range(start, total):
        batch = upcoming.result()
        upcoming = pool.submit(batch_at, step + 1) if step + 1 < total else None
        factor = lr_factor(step, total, cfg.warmup_steps)
        for g, base in zip(optimizer.param_groups, base_lrs, strict=True):
            g["lr"] = base * factor
        losses, loss = _step(cfg, worker, net, optimizer, criterion, batch, step)
        loss_sum += loss
        done = step + 1
        if done % cfg.log_every == 0 or done == total:
            n = (done - start) % cfg.log_every or cfg.log_every
            last = _metrics(losses, done, loss_sum / n, cfg.lr * factor, time.time() - t0)
            loss_sum = 0.0
            metrics_lines.append(json.dumps(last) + "\n")
        checkpoint = done % cfg.checkpoint_every == 0 or done == total
        if checkpoint and rank == 0:
            _checkpoint(cfg, inner, optimizer, done, total, metrics_lines)
        if rank == 0 and progress is not None:
            progress.update.remote({"step": done, "loss": loss, "lr": cfg.lr * factor})
        if checkpoint:  # per-step figures go to metrics.jsonl and the driver; Ray gets one per checkpoint
            ray.train.report(dict(last or {"step": done}))
    pool.shutdown()


def _step(
    cfg: TrainConfig,
    worker: Worker,
    net: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    criterion: Any,
    batch: tuple[torch.Tensor, list[dict[str, torch.Tensor]]],
    step: int,
) -> tuple[dict[str, torch.Tensor], float]:
    """One optimiser step on `batch`; the losses and the total as a number (finite, or it raises)."""
    device, amp_dtype = worker.device, worker.amp_dtype
    pixel_values = batch[0].to(device)
    targets = [{k: v.to(device) for k, v in t.items()} for t in batch[1]]
    with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        output = net(pixel_values)
    losses = criterion(output, targets)
    optimizer.zero_grad(set_to_none=True)
    losses["loss"].backward()
    if cfg.clip_grad > 0:
        torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.clip_grad)
    optimizer.step()
    loss = float(losses["loss"].detach())
    if not math.isfinite(loss):
        raise FloatingPointError(f"loss is {loss} at step {step}: lower --lr or check the data")
    return losses, loss


def _metrics(losses: dict[str, torch.Tensor], step: int, loss: float, lr: float, elapsed: float) -> dict[str, Any]:
    """One line of metrics.jsonl."""
    return {
        "step": step,
        "loss": loss,
        "loss_ce": losses["loss_ce"].detach().item(),
        "loss_mask": losses["loss_mask"].detach().item(),
        "loss_dice": losses["loss_dice"].detach().item(),
        "lr": lr,  # the head's: backbone groups run at --backbone-lr-mult of it
        "elapsed_s": round(elapsed, 1),
    }


def _checkpoint(
    cfg: TrainConfig, inner: torch.nn.Module, optimizer: torch.optim.Optimizer, done: int, total: int, lines: list[str]
) -> None:
    """Rank 0's checkpoint after step `done`; after the last step, model.safetensors too."""
    write_checkpoint(cfg, inner, {"optimizer": optimizer.state_dict(), "step": done}, done, lines)
    if done == total:
        from m2f.model.checkpoint import to_bytes

        fs, path = open_fs(f"{cfg.output.rstrip('/')}/model.safetensors", cfg.options(cfg.output))
        write_atomic(fs, path, to_bytes(inner))
