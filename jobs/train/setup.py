"""What a training run is made of, built the same way in the driver and on every worker: the dataset
reader for `--format`, the model (fresh, or from `--init` with a new class head), AdamW's parameter
groups, the learning-rate schedule and the number of steps."""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator
from typing import Any

import torch

from m2f.jobs.common.bad_input import BadInput
from m2f.jobs.common.configs import TrainConfig


def total_steps(cfg: TrainConfig, num_images: int, world: int) -> tuple[int, int]:
    """(steps per epoch, total steps): --max-steps, or --epochs passes (default 1) over the data."""
    per_epoch = max(1, num_images // (cfg.batch_size * world))
    return per_epoch, cfg.max_steps or max(1, math.ceil((cfg.epochs or 1.0) * per_epoch))


def open_dataset(cfg: TrainConfig):
    """The dataset reader for `cfg.format`, with the synthetic/COCO default layout under DATA."""
    from m2f.pipeline.training import datasets

    root = cfg.data.rstrip("/")
    images = cfg.images or f"{root}/images"
    if cfg.format == "coco-panoptic":
        ann = cfg.annotations or f"{root}/panoptic.json"
        masks = cfg.masks or f"{root}/panoptic"
        with _malformed(ann):
            return datasets.CocoPanoptic(ann, masks, images, storage=cfg.storage)
    if cfg.format == "coco-instances":
        ann = cfg.annotations or f"{root}/instances.json"
        with _malformed(ann):
            return datasets.CocoInstances(ann, images, storage=cfg.storage)
    if cfg.format == "semantic":
        cats_uri = cfg.annotations or f"{root}/panoptic.json"
        fs, path = cfg.storage.open(cats_uri)
        data = json.loads(fs.cat_file(path))
        if not isinstance(data, dict) or not isinstance(data.get("categories"), list):
            raise BadInput(f"{cats_uri} has no 'categories' list for the semantic classes")
        masks = cfg.masks or f"{root}/semantic"
        with _malformed(cats_uri):
            return datasets.SemanticMasks(images, masks, data["categories"], storage=cfg.storage)
    raise ValueError(f"unknown data format {cfg.format!r} (coco-panoptic, coco-instances, semantic)")


@contextlib.contextmanager
def _malformed(uri: str) -> Iterator[None]:
    """The dataset readers (pipeline/training/datasets.py) index the annotations' records as they parse them:
    a field missing there is the file's fault, and BadInput says which."""
    try:
        yield
    except KeyError as e:
        raise BadInput(f"{uri} is not usable annotations: a record lacks the field {e}") from None


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
