"""The segment job's look at its model before any work starts: load the checkpoint once in the driver,
on the CPU, for its name, checksum, default task and preprocessing. A checkpoint that does not load stops
the job here (exit 2), before Ray starts."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

from m2f.model.config import PreprocessConfig
from m2f.pipeline.infer import model_label

HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # organisation/model, as on the Hugging Face hub


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
        if HUB_NAME.match(model) and not os.path.exists(model):
            raise ValueError(
                f"--model {model!r} looks like a Hugging Face hub name: m2f never downloads models. On a "
                f"machine with internet access run `huggingface-cli download {model} --local-dir DIR` "
                "(or save_pretrained), then pass --model DIR (a local folder or a URI every node can read)"
            ) from None
        raise
    except Exception as e:
        raise ValueError(f"cannot load --model {model!r}: {e}") from None
    cfg, sha = net.config, net.checkpoint_sha256
    del net
    return ModelProbe(cfg.name, sha, model_label(cfg.name, sha), cfg.task, cfg.preprocess)


def local_gpu() -> bool:
    import torch

    return torch.cuda.is_available()
