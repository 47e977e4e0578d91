"""What each command was asked to do, as frozen dataclasses: `SegmentConfig` and `TrainConfig`.

cli.py fills them, and takes its options' defaults from them (one place for each default). This module
imports nothing heavy (no torch, no Ray), so `m2f --help` stays fast.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import asdict, dataclass
from typing import Any

from m2f.pipeline.secrets import redact
from m2f.pipeline.storage import Storage

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "bf16", "fp16")  # autocast dtypes: pipeline.predictor maps each to torch's
FLUSH_SECONDS = 30.0  # the longest a finished row waits in the driver before it is committed
GRACE_SECONDS = 20.0  # after SIGTERM/SIGINT: time to commit finished rows before exiting
STALL_TIMEOUT = 900.0  # end a run in which no image finished for this long

# --- limits: each bound of an option in one place (validate() checks them; README lists them) -------
WEEK = 7 * 24 * 3600.0  # the longest wait any option may ask for: longer is a typo, not a plan
# (lowest, highest), inclusive. The highest are far beyond any run we know, and far below what breaks.
LIMITS: dict[str, tuple[float, float]] = {
    "actors": (1, 10_000),  # a 10 000-GPU cluster: beyond it, a typo
    "batch_size": (1, 1024),  # images per forward pass: 256 times the default of 4
    "gpus_per_actor": (0, 1024),
    "cpus_per_actor": (0, 1024),
    "max_pixels": (1, 2**31),  # a decoded RGB image of 2**31 pixels is 6 GiB
    "max_file_bytes": (1, 64 * 1024**3),
    "preview": (0, 10_000),  # overlay PNGs written by the driver: a sample, not a second output
    "flush_seconds": (0.001, WEEK),
    "grace_seconds": (0, WEEK),
    "stall_timeout": (0.001, WEEK),
    "max_error_rate": (0, 1),
    "score_threshold": (0, 1),
}
MAX_STRING_CHARS = 4096  # a URI, path or name (PATH_MAX on Linux); longer values are refused, not echoed
MAX_STORAGE_OPTIONS_CHARS = 64 * 1024  # the --storage-options JSON
MAX_CONFIG_FILE_BYTES = 1024**2  # a --config file; it is read whole, and only this much of it


@dataclass(frozen=True)
class SegmentConfig:
    """Everything `m2f segment` was asked to do (cli.py fills it; see `m2f segment --help`)."""

    input: str
    output: str
    model: str = "demo"
    preset: str | None = None
    model_sha256: str | None = None  # the expected digest of a checkpoint fetched by name or URL
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
    max_file_bytes: int = 512 * 1024**2  # larger files are error rows unread: no real image needs more
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
        """Raise ValueError naming the first bad option, without echoing a long value or a secret.

        The options alone first (lengths, credentials in URIs, choices, LIMITS), then what they name:
        OUTPUT is no filesystem root and not INPUT, a local Ray can hold the actors (when no --ray-address
        is given), and a local OUTPUT can be written (probed; nothing is left behind).
        """
        from m2f.jobs.common import arguments  # here, not at the top: common/arguments.py imports this module
        from m2f.model.config import TASKS  # here, not at the top: m2f.model imports torch

        arguments.check_text(self.texts(), self.storage_options_json)
        uris = {"INPUT": self.input, "OUTPUT": self.output, "--model": self.model, "--endpoint-url": self.endpoint_url}
        arguments.check_no_userinfo(uris)
        if self.task is not None and self.task not in TASKS:
            raise ValueError(f"--task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.device not in DEVICES:
            raise ValueError(f"--device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.model_sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", self.model_sha256):
            raise ValueError(f"--model-sha256 must be 64 hex digits, got {len(self.model_sha256)} characters")
        from m2f.pipeline.predictor import check_precision  # here: it imports torch

        check_precision(self.precision, None if self.device == "auto" else self.device)  # the one fp16 rule
        for name, (low, high) in LIMITS.items():
            value = getattr(self, name)
            if value is not None and not low <= value <= high:  # NaN too
                raise ValueError(f"--{name.replace('_', '-')} must lie in {limit_text(name)}, got {number(value)}")
        if self.storage_options_json:  # checked even when every path is local and would never parse it
            Storage.from_cli(None, self.storage_options_json)
        arguments.check_output_place(self.input, self.output)
        if not self.ray_address:
            cpus, gpus = arguments.local_resources(self.device, self.gpus_per_actor)
            arguments.check_local_capacity(
                actors=self.actors,
                cpus_per_actor=self.cpus_per_actor,
                gpus_per_actor=self.gpus_per_actor,
                device=self.device,
                cpus=cpus,
                gpus=gpus,
            )
        arguments.probe_local_output(self.output)

    def texts(self) -> dict[str, str | None]:
        """The string options by the names the user knows them by (INPUT, --model, ...)."""
        names = ("model", "model_sha256", "preset", "task", "device", "precision", "endpoint_url", "ray_address")
        names += ("config_file",)
        named = {f"--{name.replace('_', '-')}": getattr(self, name) for name in names}
        return {"INPUT": self.input, "OUTPUT": self.output, **named}

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


GT_FORMATS = ("coco-instances", "coco-panoptic", "semantic")


@dataclass(frozen=True)
class EvaluateConfig:
    """Everything `m2f evaluate` was asked to do (cli.py fills it; see `m2f evaluate --help`)."""

    predictions: str  # OUTPUT of `m2f segment`
    ground_truth: str  # a COCO JSON, or the folder of semantic label PNGs
    gt_format: str = "coco-panoptic"  # one of GT_FORMATS
    masks: str | None = None  # coco-panoptic only: the PNG folder; default: beside the JSON, named by its stem
    json_out: str | None = None  # where the metrics JSON goes; STDOUT: the last line of stdout
    endpoint_url: str | None = None  # S3-compatible endpoint for every URI above
    storage_options_json: str | None = None  # fsspec options, as JSON
    categories: str | None = None  # semantic only: class-list JSON; default: found beside GROUND_TRUTH

    @property
    def storage(self) -> Storage:
        """How to reach every URI above; ValueError (not echoing the JSON) for malformed options."""
        return Storage.from_cli(self.endpoint_url, self.storage_options_json)


def number(value: float) -> str:
    """A bound or a value for a message: 10000, 0.001, 604800, inf (no 1e+04; never hundreds of digits)."""
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() and abs(value) < 1e15 else f"{value:g}"
    text = str(value)
    return text if len(text) <= 24 else f"a number of {len(text)} digits"


def limit_text(name: str) -> str:
    """An option's bounds as the user reads them: "[1, 10000]"."""
    low, high = LIMITS[name]
    return f"[{number(low)}, {number(high)}]"


def _absolute(path: str | None) -> str | None:
    """A local path (no scheme) made absolute; URIs and None as they are."""
    if not path or "://" in path:
        return path
    return os.path.abspath(os.path.expanduser(path.removeprefix("file:")))
