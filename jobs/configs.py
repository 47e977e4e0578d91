"""What each command was asked to do, as frozen dataclasses: `SegmentConfig` and `TrainConfig`.

cli.py fills them, and takes its options' defaults from them (one place for each default). This module
imports nothing heavy (no torch, no Ray), so `m2f --help` stays fast.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import asdict, dataclass
from typing import Any

from m2f.pipeline.secrets import redact
from m2f.pipeline.storage import Storage

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "bf16", "fp16")  # autocast dtypes: pipeline.predictor maps each to torch's
FLUSH_SECONDS = 30.0  # the longest a finished row waits in the driver before it is committed
GRACE_SECONDS = 20.0  # after SIGTERM/SIGINT: time to commit finished rows before exiting
STALL_TIMEOUT = 900.0  # end a run in which no image finished for this long


@dataclass(frozen=True)
class SegmentConfig:
    """Everything `m2f segment` was asked to do (cli.py fills it; see `m2f segment --help`)."""

    input: str
    output: str
    model: str = "demo"
    preset: str | None = None
    task: str | None = None  # None: the checkpoint's own task
    endpoint_url: str | None = None
    storage_options_json: str | None = None  # may hold credentials: never printed or stored as is
    actors: int = 1
    batch_size: int = 4
    device: str = "auto"
    gpus_per_actor: float = 1.0
    cpus_per_actor: float = 1.0
    precision: str = "fp32"
    score_threshold: float | None = None  # None: 0.5 for instance output (as detectron2's demo), else 0
    max_pixels: int = 100_000_000
    max_error_rate: float = 0.0
    overwrite: bool = False
    preview: int = 0
    progress: bool | None = None  # None: a bar on a terminal, periodic lines in logs
    allow_empty: bool = False  # an INPUT that lists no image is then not an error
    json: bool = False  # the run report as stdout's last line; everything else on stderr
    flush_seconds: float = FLUSH_SECONDS
    grace_seconds: float = GRACE_SECONDS
    stall_timeout: float = STALL_TIMEOUT
    ray_address: str | None = None
    config_file: str | None = None  # the --config file the values came from, for the report

    def validate(self) -> None:
        """Raise ValueError naming the first bad option."""
        from m2f.model.config import TASKS  # here, not at the top: m2f.model imports torch

        if self.task is not None and self.task not in TASKS:
            raise ValueError(f"--task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.device not in DEVICES:
            raise ValueError(f"--device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.precision == "fp16" and self.device == "cpu":
            raise ValueError("--precision fp16 needs a GPU; use bf16 or fp32 on CPU")
        for name in ("actors", "batch_size", "max_pixels"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("gpus_per_actor", "cpus_per_actor", "preview", "grace_seconds"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        for name in ("flush_seconds", "stall_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        if self.score_threshold is not None and not 0.0 <= self.score_threshold <= 1.0:
            raise ValueError(f"--score-threshold must lie in [0, 1], got {self.score_threshold}")
        if not 0.0 <= self.max_error_rate <= 1.0:
            raise ValueError(f"--max-error-rate must lie in [0, 1], got {self.max_error_rate}")
        if self.storage_options_json:  # checked even when every path is local and would never parse it
            Storage.from_cli(None, self.storage_options_json)

    @property
    def storage(self) -> Storage:
        """How to reach INPUT, OUTPUT and the model (validate() has checked the options' JSON)."""
        return Storage.from_cli(self.endpoint_url, self.storage_options_json)

    def redacted(self) -> dict[str, Any]:
        """The configuration for the report: storage options parsed and redacted, URLs stripped of passwords."""
        out = asdict(self)
        raw = out.pop("storage_options_json")
        try:
            out["storage_options"] = redact(json.loads(raw)) if raw else None
        except (json.JSONDecodeError, TypeError):
            out["storage_options"] = "***"
        return redact(out)


@dataclass(frozen=True)
class TrainConfig:
    data: str
    output: str
    format: str = "coco-panoptic"
    annotations: str | None = None
    images: str | None = None
    masks: str | None = None
    init: str | None = None
    arch: str = "tiny"
    workers: int = 1
    use_gpu: bool = False
    max_steps: int | None = None
    epochs: float | None = None
    batch_size: int = 8
    lr: float = 1e-4
    weight_decay: float = 0.05
    backbone_lr_mult: float = 0.1
    clip_grad: float = 0.01  # official: full-model L2 norm clipped to 0.01
    warmup_steps: int = 0
    image_size: int = 512
    min_scale: float = 0.1
    max_scale: float = 2.0
    num_points: int = 12544
    checkpoint_every: int = 500
    threads_per_worker: int = 1
    seed: int = 0
    endpoint_url: str | None = None
    storage_options_json: str | None = None
    ray_address: str | None = None
    log_every: int = 1

    @property
    def storage(self) -> Storage:
        return Storage.from_cli(self.endpoint_url, self.storage_options_json)

    def resolved(self) -> TrainConfig:
        """Local paths made absolute: Ray Train runs the workers in a folder of its own, where a relative
        DATA or OUTPUT would name nothing (or somewhere else)."""
        paths = ("data", "output", "annotations", "images", "masks", "init")
        return dataclasses.replace(self, **{name: _absolute(getattr(self, name)) for name in paths})

    def options(self, uri: str) -> dict[str, Any]:
        return self.storage.options(uri)


def _absolute(path: str | None) -> str | None:
    """A local path (no scheme) made absolute; URIs and None as they are."""
    if not path or "://" in path:
        return path
    return os.path.abspath(os.path.expanduser(path.removeprefix("file:")))
