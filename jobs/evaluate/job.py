"""`m2f evaluate` and `m2f export-coco`: score a batch run against ground truth, or export it as COCO results.

Predictions are the OUTPUT of `m2f segment`: the `*.parquet` files directly under that prefix
(local or object storage). Subfolders (`_runs/`, `_previews/`) and hidden names (`.`, `_`: half-written
temporaries) are not read. An image listed more than once (a retried or resumed run) counts once:
its latest `ok` row by `processed_at`, or, when it never succeeded, its latest error row, which
leaves the image without a prediction.

Predictions meet the ground truth by file name: the basename of `image_uri` equals the basename of
the GT image's `file_name` (for semantic masks: the file stems, `0001.jpg` <-> `0001.png`). Predicted
images with no GT are counted and left out; GT images with no usable prediction count as an empty
prediction (all false negatives for PQ, unlabelled pixels for mIoU, no detections for AP).

Ground-truth formats (`gt_format`):
- `coco-instances`: GROUND_TRUTH is a COCO instances JSON. Mask AP from pycocotools' COCOeval
  (`iouType="segm"`) on the segments as results, each with its own `category_id`; segments of
  categories the JSON does not list (stuff of a panoptic model) are dropped and counted.
- `coco-panoptic`: GROUND_TRUTH is a COCO panoptic JSON; its PNGs are in `masks`, default the folder
  beside the JSON named by its stem (`panoptic_val2017.json` -> `panoptic_val2017/`). PQ / SQ / RQ
  for All / Things / Stuff and per class. Predicted masks become an id map (segment `id`, category
  `category_id`; where masks overlap the earlier, higher-scoring segment keeps the pixel).
- `semantic`: GROUND_TRUTH is the folder of label PNGs, one per image, whose pixels are contiguous
  class indices (255 = unlabelled, not scored). The classes are the categories of a COCO-style
  JSON (an object with a "categories" list, or a bare list), **sorted by id**: index k is the k-th
  smallest id, as in `pipeline.training.datasets`. That JSON is `categories` when given, otherwise the first
  that exists of FOLDER/categories.json, FOLDER/../categories.json, FOLDER/../panoptic.json (the
  layout `m2f synth` writes). A predicted segment's `category_id` is looked up among those ids;
  pixels no segment covers count as wrong. mIoU comes from one confusion matrix over the set.

Runs and tasks: each row names its `task` and `run_id`; the run report `OUTPUT/_runs/<run_id>.json`
holds the run's `config.score_threshold`. A task that does not fit the GT format is warned about
(`TASK_MISMATCH`), except semantic predictions against COCO instances, which are refused: a semantic
segment is every pixel of a class, so "mask AP" of it is not instance AP, and detectron2's
COCOEvaluator, given a model without instance output, reports no AP at all rather than a number.
Mask AP ranks all detections (up to 100 per image), so a run with `score_threshold > 0` is warned
about too. Warnings are printed on stderr and listed under "warnings" in the JSON.

`json_out="-"` prints the metrics JSON as the last line of stdout, in one line, and everything meant
for people (table, warnings) on stderr, so a scheduler reads stdout without parsing prose.

Bad input (missing files, wrong format, predictions that do not fit the GT) prints one clear line
on stderr and returns exit code 2, never a traceback; anything else is a bug: exit 3, with the
traceback in a log file the line names (common/bad_input.py).

This module is the run; its parts: `predictions` (reading OUTPUT, matching by name), `scoring` (one
scorer per GT format), `task_fit` (runs that do not fit the metric), `export_coco` (the export),
`json_files` (what both commands share).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

from m2f.jobs.common.bad_input import EXIT_BAD_INPUT, EXIT_OK, USER_ERRORS, BadInput, report_bug, report_error
from m2f.jobs.common.configs import GT_FORMATS, EvaluateConfig
from m2f.jobs.common.console import Console
from m2f.jobs.evaluate.json_files import json_scalar, write_json
from m2f.jobs.evaluate.predictions import open_predictions
from m2f.jobs.evaluate.scoring import SCORERS
from m2f.jobs.evaluate.task_fit import task_findings
from m2f.pipeline.metrics.table import format_table

STDOUT = "-"  # json_out that means: the metrics JSON as the last line of stdout


def run(config: EvaluateConfig) -> int:
    """Evaluate, print a table (and write JSON with `json_out`); 0 on success, 2 on bad input, 3 on a bug.

    With `json_out="-"` the table and warnings go to stderr and stdout holds only the JSON, in one
    line; anything a library prints on stdout meanwhile is sent to stderr too.
    """
    to_stdout = config.json_out == STDOUT
    console = Console(json_mode=to_stdout)
    try:
        with contextlib.redirect_stdout(console.err if to_stdout else console.out):  # pycocotools prints
            report = evaluate(config)
        if config.json_out and not to_stdout:
            write_json(config.json_out, report, config.storage)
    except USER_ERRORS as e:
        report_error(e, console)
        return EXIT_BAD_INPUT
    except Exception as e:
        return report_bug("m2f evaluate", e, console)
    for warning in report["warnings"]:
        console.line(f"warning: {warning}", err=True)
    console.line(_report_text(report))
    if to_stdout:
        console.result(json.dumps(report, default=json_scalar))
    elif config.json_out:
        console.line(f"metrics written to {config.json_out}")
    return EXIT_OK


def evaluate(config: EvaluateConfig) -> dict[str, Any]:
    """The report `run` prints: {gt_format, predictions, ground_truth, images, runs, warnings, metrics}.

    `images` counts both sides of the match; `runs` lists the runs behind the chosen rows (`RunInfo`);
    `warnings` are one-line messages about unmatched images and runs that do not fit the metric.

    Raises:
        BadInput (a ValueError), ValueError (from pipeline/), OSError: on input that cannot be evaluated.
    """
    if config.gt_format not in SCORERS:
        raise BadInput(f"unknown ground-truth format {config.gt_format!r}; choose one of {list(GT_FORMATS)}")
    if config.masks and config.gt_format != "coco-panoptic":
        raise BadInput(f"--masks applies to coco-panoptic only, not to {config.gt_format}")
    if config.categories and config.gt_format != "semantic":
        raise BadInput(f"a categories JSON applies to semantic masks only, not to {config.gt_format}")
    storage = config.storage
    predictions = open_predictions(config.predictions, storage)
    runs = predictions.runs()
    warnings, refusal = task_findings(config.gt_format, runs)
    if refusal:
        raise BadInput(f"{refusal}; not scored against {config.gt_format} ground truth")
    metrics = SCORERS[config.gt_format](config, predictions, storage)
    counts = predictions.counts
    return {
        "gt_format": config.gt_format,
        "predictions": config.predictions,
        "ground_truth": config.ground_truth,
        "images": counts.as_dict(),
        "runs": [asdict(info) for info in runs],
        "warnings": counts.warnings() + warnings,
        "metrics": metrics,
    }


def _report_text(report: Mapping[str, Any]) -> str:
    counts = report["images"]
    return (
        f"{counts['matched']} of {counts['gt_images']} ground-truth images have a prediction "
        f"({counts['ok']} predicted ok, {counts['failed']} failed, {counts['superseded_rows']} superseded rows, "
        f"{counts['unmatched_predictions']} not in the ground truth)\n\n" + format_table(report["metrics"])
    )
