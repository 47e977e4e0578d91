"""The planning phases of `m2f segment`: read what OUTPUT holds and tidy it (`read_ledger`), then write
this run's work manifest from the listing (`plan_run`). segment/resume.py keeps the ledger's rules."""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

from m2f.jobs.common.console import Voice
from m2f.jobs.common.failure import Failure, storage_step
from m2f.jobs.segment.resume import (
    Existing,
    WorkPlan,
    drop_superseded_errors,
    interrupted_overwrites,
    plan_work,
    remove_stale_work,
    scan_output,
)
from m2f.jobs.segment.setup import Model, Place


@dataclass(frozen=True)
class Ledger:
    """What OUTPUT held before the run, tidied; `resumed`: the interrupted --overwrite runs this run goes on
    with (their ok rows count as done)."""

    existing: Existing
    resumed: frozenset[str]
    scan_s: float


@dataclass(frozen=True)
class Plan:
    """The images this run processes, in work-manifest files under the run's work folder."""

    work: WorkPlan
    plan_s: float


def read_ledger(place: Place, model: Model, voice: Voice) -> Ledger:
    """Read what OUTPUT holds, tidy it (temporaries, unreadable files, superseded error rows, dead runs'
    manifests), and say what was found."""
    config, fs, root, secrets = place.config, place.fs, place.root, voice.secrets
    label, task = model.probe.label, model.task
    clock = time.perf_counter()
    resumed: frozenset[str] = frozenset()
    if config.overwrite:
        find = functools.partial(interrupted_overwrites, fs, root, model=label, task=task)
        resumed = storage_step("read", config.output, find, secrets=secrets)
    scan = functools.partial(scan_output, fs, root, model=label, task=task, resumed=resumed)
    existing = storage_step("read", config.output, scan, secrets=secrets)
    scan_s = time.perf_counter() - clock
    if existing.temporaries_removed:
        voice.say(f"removed {existing.temporaries_removed} temporary file(s) left by an interrupted run")
    for path in existing.quarantined:
        voice.warn(f"unreadable part file moved to {path}")
    if existing.other_model_rows and not config.overwrite:
        voice.warn(
            f"{existing.other_model_rows} existing ok rows were made with another model or task; they are kept "
            "(use --overwrite to redo them, or another OUTPUT)"
        )
    if existing.duplicate_ok_rows:
        voice.warn(f"{existing.duplicate_ok_rows} images have more than one ok row in {place.output}")
    # Error rows of images that have an ok row are superseded already: safe to remove now.
    drop = functools.partial(drop_superseded_errors, fs, existing.with_errors, existing.ok_keys)
    storage_step("write to", config.output, drop, secrets=secrets)
    storage_step("write to", config.output, functools.partial(remove_stale_work, fs, root), secrets=secrets)
    if resumed:
        voice.say(f"resuming {len(resumed)} interrupted --overwrite run(s): {', '.join(sorted(resumed))}")
    return Ledger(existing, resumed, scan_s)


def plan_run(place: Place, model: Model, ledger: Ledger, voice: Voice) -> Plan:
    """Stream the listing into the work manifest, leaving out what is done; say how much is left."""
    config, listing = place.config, place.listing
    clock = time.perf_counter()
    done = ledger.existing.resumed_keys if config.overwrite else ledger.existing.ok_keys
    write = functools.partial(plan_work, listing, done, fs=place.fs, folder=place.work_dir)
    work = storage_step("list", config.input, write, retry=False, secrets=voice.secrets)
    plan_s = time.perf_counter() - clock
    voice.say(
        f"m2f segment {place.run_id}: {work.listed} images listed ({listing.skipped_count} other files "
        f"skipped), {work.already_done} already done, {len(work.pending)} to process with {model.probe.label} "
        f"({model.task})"
    )
    return Plan(work, plan_s)


def require_images(place: Place, plan: Plan, voice: Voice) -> None:
    """An INPUT that lists no image is exit 1, unless --allow-empty (then a warning)."""
    config = place.config
    if plan.work.listed:
        return
    message = (
        f"no images found under {config.input} ({place.listing.skipped_count} other files skipped; image "
        "extensions: jpg, jpeg, png, webp, bmp, gif, tif, tiff)"
    )
    if not config.allow_empty:
        raise Failure(message, 1)
    voice.warn(message + "; --allow-empty accepts it")
