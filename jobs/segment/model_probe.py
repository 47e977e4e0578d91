"""The segment job's look at its model before any work starts: load the checkpoint once in the driver,
on the CPU, for its name, checksum, default task and preprocessing. A checkpoint that does not load stops
the job here (exit 2), before Ray starts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from m2f.model.config import PreprocessConfig
from m2f.pipeline.infer import model_label


@dataclass(frozen=True)
class ModelProbe:
    name: str
    sha256: str
    label: str  # name@sha prefix: the `model` column of every row
    task: str  # the checkpoint's own task
    preprocess: PreprocessConfig


def probe_model(model: str, preset: str | None, options: dict[str, Any]) -> ModelProbe:
    """Raises ValueError (or FileNotFoundError) with a message for the user when `model` does not load."""
    from m2f import model as m2f_model

    try:
        net = m2f_model.load(model, "cpu", preset=preset, storage_options=options)
    except FileNotFoundError:
        raise
    except Exception as e:
        raise ValueError(f"cannot load --model {model!r}: {e}") from None
    cfg, sha = net.config, net.checkpoint_sha256
    del net
    return ModelProbe(cfg.name, sha, model_label(cfg.name, sha), cfg.task, cfg.preprocess)


def local_gpu() -> bool:
    import torch

    return torch.cuda.is_available()
