"""`m2f train`: fine-tune or train Mask2Former on Ray Train (TorchTrainer, DDP).

Each worker reads its shard of a COCO-panoptic / COCO-instances / semantic-mask dataset from any
fsspec URI, applies large-scale jitter and flips, and optimises the Mask2Former objective (Hungarian
matching, class CE + point-sampled BCE and dice, deep supervision) with AdamW (backbone lr x0.1, no
decay on norms and embeddings), full-model gradient clipping and a warm-up + poly schedule.

Checkpoints are ours, written by rank 0 straight to OUTPUT (local or object storage):
`checkpoints/step_NNNNNNN.safetensors` (the model, loadable by `model.load` and `m2f segment`) and
`.state.pt` beside it (optimizer, schedule, step), then `latest.json` pointing at both — written
last, so a run killed at any moment resumes from the last complete pair. The finished model is
also written to `OUTPUT/model.safetensors`, and the per-step loss and learning rate go to
`OUTPUT/metrics.jsonl`.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import time
from typing import Any

import numpy as np
import torch

from m2f.jobs.cluster import connect
from m2f.jobs.configs import TrainConfig
from m2f.pipeline.secrets import redact
from m2f.pipeline.storage import open_fs, write_atomic

KEEP_CHECKPOINTS = 3


# ---------------------------------------------------------------- data


def open_dataset(cfg: TrainConfig):
    """The dataset reader for `cfg.format`, with the synthetic/COCO default layout under DATA."""
    from m2f.pipeline.training import datasets

    root = cfg.data.rstrip("/")
    opts = cfg.options(root)
    images = cfg.images or f"{root}/images"
    if cfg.format == "coco-panoptic":
        ann = cfg.annotations or f"{root}/panoptic.json"
        masks = cfg.masks or f"{root}/panoptic"
        return datasets.CocoPanoptic(ann, masks, images, storage_options=opts)
    if cfg.format == "coco-instances":
        return datasets.CocoInstances(cfg.annotations or f"{root}/instances.json", images, storage_options=opts)
    if cfg.format == "semantic":
        cats_uri = cfg.annotations or f"{root}/panoptic.json"
        fs, path = open_fs(cats_uri, opts)
        categories = json.loads(fs.cat_file(path))["categories"]
        return datasets.SemanticMasks(images, cfg.masks or f"{root}/semantic", categories, storage_options=opts)
    raise ValueError(f"unknown data format {cfg.format!r} (coco-panoptic, coco-instances, semantic)")


def default_task(fmt: str) -> str:
    return {"coco-panoptic": "panoptic", "coco-instances": "instance", "semantic": "semantic"}[fmt]


# ---------------------------------------------------------------- model


def build_for_training(cfg: TrainConfig, categories: list[dict]) -> tuple[Any, list[str]]:
    """The model to train and the keys that start fresh (a re-initialised class head)."""
    from m2f import model as m2f
    from m2f.model.config import ModelConfig, PreprocessConfig
    from m2f.model.presets import ARCHITECTURES

    names = tuple(c["name"] for c in categories)
    is_thing = tuple(bool(c.get("isthing", 1)) for c in categories)
    ids = tuple(int(c["id"]) for c in categories)
    task = default_task(cfg.format)
    if cfg.init:
        base = m2f.load(cfg.init, storage_options=cfg.options(cfg.init))
        config = base.config.replace(
            name=f"{base.config.name}-ft",
            num_classes=len(names),
            class_names=names,
            is_thing=is_thing,
            category_ids=ids,
            task=task,
        )
        fresh = m2f.build_model(config)
        own = base.state_dict()
        target = fresh.state_dict()
        reset = [k for k in target if k not in own or own[k].shape != target[k].shape]
        fresh.load_state_dict({k: (target[k] if k in reset else own[k]) for k in target})
        return fresh, reset
    if cfg.arch not in ARCHITECTURES:
        raise ValueError(f"unknown --arch {cfg.arch!r}; choose from {sorted(ARCHITECTURES)}")
    arch = ARCHITECTURES[cfg.arch]
    config = ModelConfig(
        name=f"{cfg.arch}-{os.path.basename(cfg.data.rstrip('/'))}",
        backbone=arch.backbone,
        pixel_decoder=arch.pixel_decoder,
        decoder=arch.decoder,
        num_classes=len(names),
        class_names=names,
        is_thing=is_thing,
        category_ids=ids,
        task=task,
        # test-time resize: the longer side at the training crop size (large-scale jitter's scale 1)
        preprocess=PreprocessConfig(min_size=cfg.image_size, max_size=cfg.image_size),
    )
    return m2f.build_model(config), []


def param_groups(model: torch.nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """AdamW groups: backbone at lr x backbone_lr_mult; no weight decay on norms and embeddings."""
    no_decay_types = (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.BatchNorm2d, torch.nn.Embedding)
    no_decay: set[str] = set()
    for mod_name, mod in model.named_modules():
        if isinstance(mod, no_decay_types):
            no_decay.update(f"{mod_name}.{p}" if mod_name else p for p, _ in mod.named_parameters(recurse=False))
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        embed = name.endswith(("level_embed", "relative_position_bias_table"))
        key = (name.startswith("backbone."), name in no_decay or embed)
        groups.setdefault(key, []).append(p)
    return [
        {
            "params": params,
            "lr": cfg.lr * (cfg.backbone_lr_mult if backbone else 1.0),
            "weight_decay": 0.0 if nodecay else cfg.weight_decay,
        }
        for (backbone, nodecay), params in sorted(groups.items())
    ]


def lr_factor(step: int, total: int, warmup: int, power: float = 0.9) -> float:
    """Linear warm-up from 0.1% then poly decay to zero (detectron2's WarmupPolyLR)."""
    if warmup and step < warmup:
        alpha = step / warmup
        return 0.001 * (1 - alpha) + alpha
    return (1.0 - min(step, total) / max(total, 1)) ** power


# ---------------------------------------------------------------- checkpoints


def _ckpt_dir(cfg: TrainConfig) -> str:
    return f"{cfg.output.rstrip('/')}/checkpoints"


def read_latest(cfg: TrainConfig) -> dict[str, Any] | None:
    fs, path = open_fs(f"{cfg.output.rstrip('/')}/latest.json", cfg.options(cfg.output))
    if not fs.exists(path):
        return None
    return json.loads(fs.cat_file(path))


def write_checkpoint(
    cfg: TrainConfig, model: torch.nn.Module, state: dict[str, Any], step: int, metrics_lines: list[str]
) -> str:
    """Model + trainer state, then metrics, then latest.json (the commit point)."""
    from m2f.model.checkpoint import to_bytes

    opts = cfg.options(cfg.output)
    out = cfg.output.rstrip("/")
    name = f"step_{step:07d}"
    fs, _ = open_fs(out, opts)
    files = {
        f"{_ckpt_dir(cfg)}/{name}.safetensors": to_bytes(model),
        f"{_ckpt_dir(cfg)}/{name}.state.pt": _torch_bytes(state),
        f"{out}/metrics.jsonl": "".join(metrics_lines).encode(),
    }
    for uri, data in files.items():
        fs_, path = open_fs(uri, opts)
        fs_.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        write_atomic(fs_, path, data)
    latest = {"step": step, "model": f"checkpoints/{name}.safetensors", "state": f"checkpoints/{name}.state.pt"}
    fs_, path = open_fs(f"{out}/latest.json", opts)
    write_atomic(fs_, path, json.dumps(latest).encode())
    _prune(cfg, keep=KEEP_CHECKPOINTS)
    return f"{out}/{latest['model']}"


def _prune(cfg: TrainConfig, keep: int) -> None:
    fs, path = open_fs(_ckpt_dir(cfg), cfg.options(cfg.output))
    try:
        names = sorted(p for p in fs.ls(path, detail=False) if p.endswith(".safetensors"))
    except FileNotFoundError:
        return
    for old in names[:-keep]:
        for p in (old, old.replace(".safetensors", ".state.pt")):
            if fs.exists(p):
                fs.rm(p)


def _torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


# ---------------------------------------------------------------- the worker loop


def train_loop(loop_config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker."""
    import ray.train
    import ray.train.torch
    from tqdm import tqdm

    from m2f.model.criterion import LossConfig, SetCriterion
    from m2f.model.safe_pickle import load_torch
    from m2f.pipeline.training.augment import collate, large_scale_jitter, random_flip

    cfg = TrainConfig(**loop_config)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.threads_per_worker)
    torch.manual_seed(cfg.seed)
    device = ray.train.torch.get_device() if cfg.use_gpu else torch.device("cpu")

    dataset = open_dataset(cfg)
    categories = list(dataset.categories)
    net, reset = build_for_training(cfg, categories)
    if reset and rank == 0:
        print(f"re-initialised (class count differs from --init): {', '.join(reset)}")
    mean, std = net.config.preprocess.pixel_mean, net.config.preprocess.pixel_std

    steps_per_epoch = max(1, len(dataset) // (cfg.batch_size * world))
    total = cfg.max_steps or max(1, math.ceil((cfg.epochs or 1.0) * steps_per_epoch))

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
        if rank == 0:
            print(f"resuming from step {start} ({latest['model']})")

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
    bar = tqdm(total=total, initial=start, desc="train", disable=rank != 0, mininterval=5)
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
        bar.update(1)
        done = step + 1
        if done % cfg.log_every == 0 or done == total:
            n = (done - start) % cfg.log_every or cfg.log_every
            last = {
                "step": done,
                "loss": loss_sum / n,
                "loss_ce": losses["loss_ce"].detach().item(),
                "loss_mask": losses["loss_mask"].detach().item(),
                "loss_dice": losses["loss_dice"].detach().item(),
                "lr": optimizer.param_groups[-1]["lr"],
                "elapsed_s": round(time.time() - t0, 1),
            }
            loss_sum = 0.0
            metrics_lines.append(json.dumps(last) + "\n")
            bar.set_postfix(loss=f"{last['loss']:.3f}", lr=f"{last['lr']:.2e}")
        checkpoint = done % cfg.checkpoint_every == 0 or done == total
        if checkpoint and rank == 0:
            state = {"optimizer": optimizer.state_dict(), "step": done}
            write_checkpoint(cfg, inner, state, done, metrics_lines)
            if done == total:
                from m2f.model.checkpoint import to_bytes

                fs, path = open_fs(f"{cfg.output.rstrip('/')}/model.safetensors", cfg.options(cfg.output))
                write_atomic(fs, path, to_bytes(inner))
        if checkpoint:  # per-step figures go to metrics.jsonl and the bar; Ray gets one per checkpoint
            ray.train.report(dict(last or {"step": done}))
    bar.close()
    pool.shutdown()


# ---------------------------------------------------------------- driver


def run(cfg: TrainConfig) -> int:
    """Launch the TorchTrainer; returns the process exit code."""
    import tempfile

    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if cfg.max_steps is not None and cfg.max_steps < 1:
        raise ValueError("--max-steps must be >= 1")
    open_dataset(cfg)  # fail fast, in the driver, on a bad path or format
    started = connect(cfg.ray_address)
    try:
        print(f"training with {json.dumps(redact(dataclasses.asdict(cfg)))}")
        trainer = TorchTrainer(
            train_loop,
            train_loop_config=dataclasses.asdict(cfg),
            scaling_config=ScalingConfig(
                num_workers=cfg.workers,
                use_gpu=cfg.use_gpu,
                resources_per_worker={"CPU": cfg.threads_per_worker, **({"GPU": 1} if cfg.use_gpu else {})},
            ),
            run_config=RunConfig(storage_path=tempfile.mkdtemp(prefix="m2f-train-"), name="m2f-train"),
        )
        trainer.fit()
    finally:
        if started:
            import ray

            ray.shutdown()
    latest = read_latest(cfg)
    if latest:
        print(f"done: step {latest['step']}; model at {cfg.output.rstrip('/')}/model.safetensors")
    return 0
