"""How a `m2f segment` run ends: tidy OUTPUT, write the final report and the log, and tell the user.

Every ending goes through `finish`: a completed run prints its summary table on stdout; any other ending
prints one line on stderr saying what happened, what was kept and how to resume (`ending_line`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import numpy as np

from m2f.jobs.failure import Failure, one_line
from m2f.jobs.report import build_report, summary_table
from m2f.jobs.resume import supersede
from m2f.pipeline.output import preview_index, run_file
from m2f.pipeline.secrets import scrub
from m2f.pipeline.storage import qualify, with_retries, write_atomic

if TYPE_CHECKING:
    from m2f.jobs.segment import SegmentRun

log = logging.getLogger(__name__)


def finish(run: SegmentRun, status: str, failure: Failure | None) -> int:
    """Tidy OUTPUT, write the report and the log, print the summary; returns the exit code."""
    config, counts = run.config, run.counts
    lost = run.lease.lost if run.lease is not None else None
    if lost:  # another run took OUTPUT over (jobs/lease.py): whatever stopped us, this run failed
        failure, status = Failure(lost, 3), "failed"
    if failure is None and status == "completed" and counts.processed != counts.pending:
        failure = Failure(f"{counts.pending} images were to be processed but {counts.processed} rows came back", 3)
        status = "failed"
    if run.fs is not None:
        with contextlib.suppress(Exception):
            run.fs.rm(run.work_dir, recursive=True)
    removed = 0 if lost else _supersede(run)  # the part files are the new holder's to rewrite now
    previews = _previews(run) if status == "completed" and failure is None else 0
    if failure is not None:
        exit_code = failure.exit_code
        run.warnings.append(scrub(str(failure), run.secrets))
    elif status in ("cancelled", "stalled"):
        exit_code = run.stop.exit_code or 130
        if status == "stalled":
            run.warnings.append(scrub(run.stop.stalled or "", run.secrets))
    else:
        exit_code = 0 if counts.error_rate <= config.max_error_rate else 1
    report_uri = _final_report(run, status, exit_code, previews)

    if status == "completed" and failure is None:
        if removed:
            run.say(f"removed {removed} earlier row(s) of images this run redid")
        run.say(
            summary_table(
                counts,
                skipped_files=run.listing.skipped_count,
                processing_s=run.processing_s,
                output=run.output,
                report=report_uri,
            )
        )
        if previews:
            index = qualify(run.fs, preview_index(run.root))
            run.say(f"  previews: {index} ({previews} PNGs)")
        if exit_code == 1:
            run.say(
                f"error rate {counts.error_rate:.4f} ({counts.error} errors, {counts.ok + counts.already_done} ok) "
                f"exceeds --max-error-rate {config.max_error_rate}",
                err=True,
            )
    else:
        run.say(ending_line(run, status, failure, report_uri), err=True)
    return exit_code


def ending_line(run: SegmentRun, status: str, failure: Failure | None, report_uri: str) -> str:
    """The one line that says how a run that did not complete ended, what it kept, and what next."""
    where = f"; report: {report_uri}" if report_uri else f"; log: {run.log.path}"
    if failure is not None and not run.counts.pending:  # nothing was started: nothing to keep or resume
        return f"m2f segment: error: {failure}{where}"
    kept = f"{run.counts.processed:,} rows committed in {run.counts.files_written} part file(s)"
    left = max(0, run.counts.pending - run.counts.processed)
    if status == "cancelled":
        what = f"cancelled by {run.stop.signal_name() or 'a signal'}"
    elif status == "stalled":
        what = f"stopped: {run.stop.stalled}"
    else:
        what = f"error: {failure}"
    return f"m2f segment: {what}; kept {kept}, {left:,} image(s) left; a re-run resumes{where}"


def _supersede(run: SegmentRun) -> int:
    """Remove the earlier rows of images whose new row this run committed (see jobs.resume)."""
    if run.existing is None or not (run.committed or len(run.existing.resumed_keys)):
        return 0
    keys = np.union1d(run.committed_keys(), run.existing.resumed_keys)
    try:
        return with_retries(lambda: supersede(run.fs, run.existing.parts, keys, run.resumed))
    except Exception as e:  # the next run finishes the tidying; nothing is lost meanwhile
        log.exception("removing superseded rows failed")
        run.warn(f"could not remove earlier rows of redone images yet ({one_line(e)}); the next run will")
        return 0


def _previews(run: SegmentRun) -> int:
    if not run.config.preview:
        return 0
    from m2f.pipeline.preview import write_previews

    try:
        return write_previews(
            run.fs,
            run.root,
            run.config.preview,
            uris=dataclasses.replace(run.listing).uris(),  # the first N listed; a copy keeps the counts
            storage=run.storage,
            max_pixels=run.config.max_pixels,
        )
    except Exception as e:  # previews are a convenience: they never fail a run
        run.warn(f"previews failed: {type(e).__name__}: {e}")
        return 0


def _final_report(run: SegmentRun, status: str, exit_code: int, previews: int) -> str:
    """Write the report and the log beside it; returns the report's URI ('' when OUTPUT is unreachable)."""
    if run.fs is None or not run.probe:
        run.log.close(keep=True)
        return ""
    try:
        write_report(run, status, exit_code=exit_code, previews=previews)
        log_path = run_file(run.root, run.run_id, ".log")
        write_atomic(run.fs, log_path, scrub(run.log.text(), run.secrets))
    except Exception:
        log.exception("writing the run report failed")
        run.log.close(keep=True)
        return ""
    run.log.close()
    return qualify(run.fs, run.report_path)


def write_report(run: SegmentRun, status: str, *, exit_code: int | None = None, previews: int = 0) -> None:
    """The run report (`_runs/<run_id>.json`): "running" once planned, then how it ended."""
    config, probe = run.config, run.probe
    assert probe is not None  # a report is written only once the model has been probed
    report = build_report(
        run_id=run.run_id,
        config=config.redacted(),
        counts=run.counts,
        listing=run.listing.summary(),
        model={"name": probe.name, "sha256": probe.sha256, "label": probe.label, "task": run.task},
        output=run.output,
        started=run.started,
        finished=datetime.now(UTC),
        processing_s=run.processing_s,
        exit_code=exit_code,
        max_error_rate=config.max_error_rate,
        previews=previews,
        warnings=run.warnings,
    )
    report["status"] = status
    report["resumed_runs"] = sorted(run.resumed)
    report["log"] = qualify(run.fs, run_file(run.root, run.run_id, ".log"))
    report["timings_s"] = {name: round(seconds, 3) for name, seconds in run.timings.items()}
    report["ray_data_stats"] = run.stats
    run.report = report
    write_atomic(run.fs, run.report_path, scrub(json.dumps(report, indent=2, default=str), run.secrets) + "\n")
