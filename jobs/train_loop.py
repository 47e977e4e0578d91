"""The loop every Ray Train worker runs: its shard of the data, large-scale jitter and flips, the
Mask2Former objective, AdamW with clipping and the poly schedule; rank 0 writes checkpoints and tells
the driver how far it is (a small progress actor), so that the driver, not Ray's log forwarding, draws
the progress a person or a scheduler's log sees."""

from __future__ import annotations

import json
import math
import time
from typing import Any

import numpy as np
import torch

from m2f.jobs.checkpoints import read_latest, write_checkpoint
from m2f.jobs.configs import TrainConfig
from m2f.jobs.train_setup import build_for_training, lr_factor, open_dataset, param_groups, total_steps
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


def train_loop(loop_config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker. `loop_config`: the TrainConfig's fields, and "progress", the
    driver's TrainProgress actor."""
    import ray.train
    import ray.train.torch

    from m2f.model.criterion import LossConfig, SetCriterion
    from m2f.model.safe_pickle import load_torch
    from m2f.pipeline.training.augment import collate, large_scale_jitter, random_flip

    loop_config = dict(loop_config)
    progress = loop_config.pop("progress", None)
    cfg = TrainConfig(**loop_config)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.threads_per_worker)
    torch.manual_seed(cfg.seed)
    device = ray.train.torch.get_device() if cfg.use_gpu else torch.device("cpu")

    dataset = open_dataset(cfg)
    categories = list(dataset.categories)
    net, reset = build_for_training(cfg, categories)
    if reset and rank == 0 and progress is not None:
        progress.note.remote(f"re-initialised (the class count differs from --init): {', '.join(reset)}")
    mean, std = net.config.preprocess.pixel_mean, net.config.preprocess.pixel_std

    steps_per_epoch, total = total_steps(cfg, len(dataset), world)

    start, state, metrics_lines = 0, None, []
    latest = read_latest(cfg)
    if latest:
        from m2f import model as m2f

        out = cfg.output.rstrip("/")
        restored = m2f.load(f"{out}/{latest['model']}", storage_options=cfg.options(cfg.output))
        net.load_state_dict(restored.state_dict())
        fs, path = open_fs(f"{out}/{latest['state']}", cfg.options(cfg.output))
        state = load_torch(fs.cat_file(path))
        start = int(latest["step"])
        fs, path = open_fs(f"{out}/metrics.jsonl", cfg.options(cfg.output))
        if fs.exists(path):
            metrics_lines = [line + "\n" for line in fs.cat_file(path).decode().splitlines() if line]

    net.train()
    net = ray.train.torch.prepare_model(net) if world > 1 else net.to(device)  # DDP (gloo on CPU)
    inner = net.module if hasattr(net, "module") else net
    optimizer = torch.optim.AdamW(param_groups(inner, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    if state:
        optimizer.load_state_dict(state["optimizer"])
    criterion = SetCriterion(inner.config.num_classes, LossConfig(num_points=cfg.num_points))
    amp_dtype = torch.bfloat16 if (cfg.use_gpu and torch.cuda.is_bf16_supported()) else None

    def batch_at(step: int):
        """The batch of `step` on this worker: a function of (seed, step, rank) only, so resumes match."""
        epoch, pos = divmod(step, steps_per_epoch)
        order = np.random.default_rng((cfg.seed, epoch)).permutation(len(dataset))
        idx = order[(pos * world + rank) * cfg.batch_size : (pos * world + rank + 1) * cfg.batch_size]
        rng = np.random.default_rng((cfg.seed, step, rank))
        samples = []
        for i in idx:
            s = dataset.load(int(i))
            s = large_scale_jitter(
                s, output_size=cfg.image_size, min_scale=cfg.min_scale, max_scale=cfg.max_scale, rng=rng
            )
            samples.append(random_flip(s, rng))
        return collate(samples, mean, std)

    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(1)  # prepares the next batch while this one trains
    upcoming = pool.submit(batch_at, start) if start < total else None
    loss_sum, t0, last = 0.0, time.time(), {}
    for step in range(start, total):
        pixel_values, targets = upcoming.result()
        upcoming = pool.submit(batch_at, step + 1) if step + 1 < total else None
        pixel_values = pixel_values.to(device)
        targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
        factor = lr_factor(step, total, cfg.warmup_steps)
        for g, base in zip(optimizer.param_groups, base_lrs, strict=True):
            g["lr"] = base * factor
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
        loss_sum += loss
        done = step + 1
        if done % cfg.log_every == 0 or done == total:
            n = (done - start) % cfg.log_every or cfg.log_every
            last = {
                "step": done,
                "loss": loss_sum / n,
                "loss_ce": losses["loss_ce"].detach().item(),
                "loss_mask": losses["loss_mask"].detach().item(),
                "loss_dice": losses["loss_dice"].detach().item(),
                "lr": cfg.lr * factor,  # the head's: backbone groups run at --backbone-lr-mult of it
                "elapsed_s": round(time.time() - t0, 1),
            }
            loss_sum = 0.0
            metrics_lines.append(json.dumps(last) + "\n")
        checkpoint = done % cfg.checkpoint_every == 0 or done == total
        if checkpoint and rank == 0:
            state = {"optimizer": optimizer.state_dict(), "step": done}
            write_checkpoint(cfg, inner, state, done, metrics_lines)
            if done == total:
                from m2f.model.checkpoint import to_bytes

                fs, path = open_fs(f"{cfg.output.rstrip('/')}/model.safetensors", cfg.options(cfg.output))
                write_atomic(fs, path, to_bytes(inner))
        if rank == 0 and progress is not None:
            progress.update.remote({"step": done, "loss": loss, "lr": cfg.lr * factor})
        if checkpoint:  # per-step figures go to metrics.jsonl and the driver; Ray gets one per checkpoint
            ray.train.report(dict(last or {"step": done}))
    pool.shutdown()
