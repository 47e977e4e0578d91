"""How a `m2f segment` run ends: tidy OUTPUT, write the final report and the log, and tell the user.

Every ending but a refusal (2, 75) goes through `finish`: a completed run prints its summary table on
stdout; any other ending prints one line on stderr saying what happened, what was kept and how to resume
(`ending_line`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np

from m2f.jobs.common.failure import Failure, one_line, storage_step
from m2f.jobs.segment.lease import Lease
from m2f.jobs.segment.plan import Ledger, Plan
from m2f.jobs.segment.process import Outcome, Running
from m2f.jobs.segment.report import build_report, summary_table
from m2f.jobs.segment.resume import supersede
from m2f.jobs.segment.setup import Model, Place, Start
from m2f.pipeline.output import preview_index, run_file
from m2f.pipeline.secrets import scrub
from m2f.pipeline.storage import qualify, with_retries, write_atomic

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Reached:
    """What the phases returned before the run ended; None: that phase did not finish."""

    start: Start
    place: Place | None = None
    lease: Lease | None = None
    model: Model | None = None
    ledger: Ledger | None = None
    plan: Plan | None = None
    running_report: dict[str, Any] | None = None  # the 'running' report, once written

    def timings(self, outcome: Outcome) -> dict[str, float]:
        """Seconds per phase, for the report."""
        named = (
            ("model_probe", self.model and self.model.probe_s),
            ("scan_output", self.ledger and self.ledger.scan_s),
            ("list_and_plan", self.plan and self.plan.plan_s),
        )
        return {name: seconds for name, seconds in named if seconds is not None} | outcome.timings


def finish(reached: Reached, outcome: Outcome, running: Running) -> tuple[int, dict[str, Any] | None]:
    """Tidy OUTPUT, write the report and the log, print the summary; returns the exit code and the report."""
    status, failure, counts, stop = outcome.status, outcome.failure, running.tally.counts, running.stop
    place = reached.place
    lost = reached.lease.lost if reached.lease is not None else None
    if lost:  # another run took OUTPUT over (segment/lease.py): whatever stopped us, this run failed
        failure, status = Failure(lost, 3), "failed"
    if failure is None and status == "completed" and counts.processed != counts.pending:
        failure = Failure(f"{counts.pending} images were to be processed but {counts.processed} rows came back", 3)
        status = "failed"
    if place is not None:
        with contextlib.suppress(Exception):
            place.fs.rm(place.work_dir, recursive=True)
    removed = 0 if lost else _supersede(reached, running)  # the part files are the new holder's to rewrite now
    completed = status == "completed" and failure is None
    previews = _previews(place, running) if completed and place is not None else 0
    if failure is not None:
        exit_code = failure.exit_code
        running.voice.note(str(failure))
    elif status in ("cancelled", "stalled"):
        exit_code = stop.exit_code or 130
        if status == "stalled":
            running.voice.note(stop.stalled or "")
    else:
        exit_code = 0 if place is None or counts.error_rate <= place.config.max_error_rate else 1
    ended = dataclasses.replace(outcome, status=status, failure=failure)
    report, report_uri = _final_report(reached, ended, running, exit_code, previews)
    if completed and place is not None:
        _summary(place, outcome, running, report_uri, removed, previews, exit_code)
    else:
        running.voice.say(ending_line(running, status, failure, report_uri), err=True)
    return exit_code, report


def _summary(
    place: Place, outcome: Outcome, running: Running, report_uri: str, removed: int, previews: int, exit_code: int
) -> None:
    """A completed run's lines: what was tidied, the summary table, the previews, an error rate over the limit."""
    voice, counts = running.voice, running.tally.counts
    if removed:
        voice.say(f"removed {removed} earlier row(s) of images this run redid")
    voice.say(
        summary_table(
            counts,
            skipped_files=place.listing.skipped_count,
            processing_s=outcome.processing_s,
            output=place.output,
            report=report_uri,
        )
    )
    if previews:
        voice.say(f"  previews: {qualify(place.fs, preview_index(place.root))} ({previews} PNGs)")
    if exit_code == 1:
        max_rate = place.config.max_error_rate
        voice.say(
            f"error rate {counts.error_rate:.4f} ({counts.error} errors, {counts.ok + counts.already_done} ok) "
            f"exceeds --max-error-rate {max_rate}",
            err=True,
        )


def ending_line(running: Running, status: str, failure: Failure | None, report_uri: str) -> str:
    """The one line that says how a run that did not complete ended, what it kept, and what next."""
    counts, stop = running.tally.counts, running.stop
    where = f"; report: {report_uri}" if report_uri else f"; log: {running.log.path}"
    if failure is not None and not counts.pending:  # nothing was started: nothing to keep or resume
        return f"m2f segment: error: {failure}{where}"
    kept = f"{counts.processed:,} rows committed in {counts.files_written} part file(s)"
    left = max(0, counts.pending - counts.processed)
    if status == "cancelled":
        what = f"cancelled by {stop.signal_name() or 'a signal'}"
    elif status == "stalled":
        what = f"stopped: {stop.stalled}"
    else:
        what = f"error: {failure}"
    return f"m2f segment: {what}; kept {kept}, {left:,} image(s) left; a re-run resumes{where}"


def _supersede(reached: Reached, running: Running) -> int:
    """Remove the earlier rows of images whose new row this run committed (see segment/resume.py)."""
    place, ledger, tally = reached.place, reached.ledger, running.tally
    if place is None or ledger is None or not (tally.committed or len(ledger.existing.resumed_keys)):
        return 0
    keys = np.union1d(tally.keys(), ledger.existing.resumed_keys)
    try:
        return with_retries(lambda: supersede(place.fs, ledger.existing.parts, keys, ledger.resumed))
    except Exception as e:  # the next run finishes the tidying; nothing is lost meanwhile
        log.exception("removing superseded rows failed")
        running.voice.warn(f"could not remove earlier rows of redone images yet ({one_line(e)}); the next run will")
        return 0


def _previews(place: Place, running: Running) -> int:
    config = place.config
    if not config.preview:
        return 0
    from m2f.pipeline.preview import write_previews

    try:
        return write_previews(
            place.fs,
            place.root,
            config.preview,
            uris=dataclasses.replace(place.listing).uris(),  # the first N listed; a copy keeps the counts
            storage=place.storage,
            max_pixels=config.max_pixels,
        )
    except Exception as e:  # previews are a convenience: they never fail a run
        running.voice.warn(f"previews failed: {type(e).__name__}: {e}")
        return 0


def _final_report(
    reached: Reached, outcome: Outcome, running: Running, exit_code: int, previews: int
) -> tuple[dict[str, Any] | None, str]:
    """Write the report and the log beside it; returns the report (None: not made) and its URI ('' when
    OUTPUT is unreachable)."""
    place, run_log = reached.place, running.log
    if place is None or reached.model is None:
        run_log.close(keep=True)
        return None, ""
    report = None
    try:
        report = run_report(reached, outcome, running, outcome.status, exit_code=exit_code, previews=previews)
        write_report(place, report, running)
        write_atomic(place.fs, run_file(place.root, place.run_id, ".log"), scrub(run_log.text(), running.voice.secrets))
    except Exception:
        log.exception("writing the run report failed")
        run_log.close(keep=True)
        return report, ""
    run_log.close()
    return report, qualify(place.fs, place.report_path)


def run_report(
    reached: Reached,
    outcome: Outcome,
    running: Running,
    status: str,
    *,
    exit_code: int | None = None,
    previews: int = 0,
) -> dict[str, Any]:
    """The run report (`_runs/<run_id>.json`): "running" once planned, then how it ended."""
    place, model, ledger = reached.place, reached.model, reached.ledger
    assert place is not None and model is not None  # a report is made only once the model has been probed
    probe = model.probe
    report = build_report(
        run_id=place.run_id,
        config=model.config.redacted(),
        counts=running.tally.counts,
        listing=place.listing.summary(),
        model={
            "name": probe.name,
            "sha256": probe.sha256,
            "label": probe.label,
            "task": model.task,
            "source": model.weights.source,  # what --model named; "kind": how it was resolved
            "kind": model.weights.kind,
            "revision": model.weights.revision,
            "preset": model.config.preset,
        },
        output=place.output,
        started=reached.start.started,
        finished=datetime.now(UTC),
        processing_s=outcome.processing_s,
        exit_code=exit_code,
        max_error_rate=model.config.max_error_rate,
        previews=previews,
        warnings=running.voice.warnings,
    )
    report["status"] = status
    report["resumed_runs"] = sorted(ledger.resumed) if ledger is not None else []
    report["log"] = qualify(place.fs, run_file(place.root, place.run_id, ".log"))
    report["timings_s"] = {name: round(seconds, 3) for name, seconds in reached.timings(outcome).items()}
    report["ray_data_stats"] = outcome.stats
    return report


def write_running_report(reached: Reached, running: Running) -> dict[str, Any]:
    """The 'running' report, written once the run is planned; returns it."""
    place = reached.place
    assert place is not None
    report = run_report(reached, Outcome(), running, "running")
    write = functools.partial(write_report, place, report, running)
    storage_step("write to", place.config.output, write, secrets=running.voice.secrets)
    return report


def write_report(place: Place, report: dict[str, Any], running: Running) -> None:
    text = scrub(json.dumps(report, indent=2, default=str), running.voice.secrets)
    write_atomic(place.fs, place.report_path, text + "\n")
