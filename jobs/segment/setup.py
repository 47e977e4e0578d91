"""The first phases of `m2f segment`: everything checkable before Ray starts. The options and OUTPUT
(`open_place`), OUTPUT's lease (`take_lease`), the model (`check_model`); a mistake is exit 2, with nothing
written, and another run holding OUTPUT is exit 75."""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from fsspec import AbstractFileSystem

from m2f.jobs.common.configs import SegmentConfig
from m2f.jobs.common.failure import Failure, storage_step
from m2f.jobs.common.lifecycle import Stop
from m2f.jobs.segment.lease import Lease
from m2f.jobs.segment.model_probe import ModelProbe, local_gpu, probe_model
from m2f.model.fetch import Resolved, resolve
from m2f.pipeline.output import new_run_id, run_file
from m2f.pipeline.predictor import default_score_threshold
from m2f.pipeline.secrets import secret_values
from m2f.pipeline.sources import Listing, list_inputs
from m2f.pipeline.storage import Storage, open_fs, qualify


@dataclass(frozen=True)
class Start:
    """A run's name and start time, and the secrets none of its lines or files may show."""

    run_id: str
    started: datetime
    secrets: Sequence[str]

    @classmethod
    def new(cls, config: SegmentConfig) -> Start:
        started = datetime.now(UTC)
        return cls(new_run_id(), started, secret_values(_parsed_options(config.storage_options_json)))


@dataclass(frozen=True)
class Place:
    """Where a run reads and writes, checked: the options, OUTPUT opened, INPUT listed (lazily)."""

    run_id: str
    config: SegmentConfig
    storage: Storage
    options: Mapping[str, dict[str, Any]]  # "input", "output", "model" -> fsspec options
    fs: AbstractFileSystem
    root: str
    listing: Listing  # counts what it skips as it is read

    @property
    def output(self) -> str:
        return qualify(self.fs, self.root)

    @property
    def work_dir(self) -> str:
        return run_file(self.root, self.run_id, "-work")

    @property
    def report_path(self) -> str:
        return run_file(self.root, self.run_id, ".json")


@dataclass(frozen=True)
class Model:
    """The checked model: where its weights are (`weights`: what --model named, fetched into the cache once
    if it named a zoo entry, a URL or a hub id), what the probe found, the task the run uses, and the
    options with the task's --score-threshold filled in."""

    probe: ModelProbe
    task: str
    config: SegmentConfig
    probe_s: float
    weights: Resolved


def open_place(config: SegmentConfig, start: Start) -> Place:
    """Check the options, open OUTPUT and start listing INPUT. Exit 2 on a mistake."""
    try:
        config.validate()
        storage = config.storage
        uris = (("input", config.input), ("output", config.output), ("model", config.model))
        options = {name: storage.options(uri) for name, uri in uris}
    except ValueError as e:
        raise Failure(str(e), 2) from None
    step = functools.partial(storage_step, secrets=start.secrets)
    fs, root = step("open", config.output, lambda: open_fs(config.output, options["output"]))
    output = qualify(fs, root)
    listing = step(
        "list", config.input, lambda: list_inputs(config.input, options["input"], output=output), retry=False
    )
    if step("read", config.output, lambda: fs.isfile(root)):
        raise Failure(f"OUTPUT {config.output!r} is a file; give a folder or prefix", 2)
    return Place(start.run_id, config, storage, options, fs, root, listing)


def take_lease(place: Place, stop: Stop, secrets: Sequence[str]) -> Lease:
    """One run per OUTPUT (segment/lease.py): raises Busy (75) while another run holds it."""
    take = functools.partial(Lease.acquire, place.fs, place.root, place.run_id, on_lost=stop.stall)
    return storage_step("write to", place.config.output, take, secrets=secrets)


def check_model(place: Place) -> Model:
    """Load the model once, on the CPU, for its name, checksum, task and preprocessing. Exit 2 if it does not."""
    config = place.config
    clock = time.perf_counter()
    try:
        weights = resolve(config.model, sha256=config.model_sha256)  # a name or URL: fetched once, for every actor
        preset = config.preset or weights.preset
        options = place.options["model"] if weights.kind == "local" else {}
        probe = probe_model(weights.local, preset, options)
    except (ValueError, FileNotFoundError) as e:
        raise Failure(str(e), 2) from None
    config = dataclasses.replace(config, preset=preset)
    probe_s = time.perf_counter() - clock
    task = config.task or probe.task
    if config.score_threshold is None:
        config = dataclasses.replace(config, score_threshold=default_score_threshold(task))
    if config.device == "cuda" and not config.ray_address and not local_gpu():
        raise Failure("--device cuda, but this machine has no GPU that torch can use (Ray runs locally)", 2)
    return Model(probe, task, config, probe_s, weights)


def _parsed_options(options_json: str | None) -> dict[str, Any]:
    try:
        parsed = json.loads(options_json) if options_json else {}
    except json.JSONDecodeError:
        return {"secret": options_json}  # unparseable: treat the whole text as secret
    return parsed if isinstance(parsed, dict) else {}
