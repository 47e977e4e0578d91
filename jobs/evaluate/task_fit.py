"""Does a run fit the metric? Findings about runs whose task or score threshold biases a ground-truth format.

Each row of a `m2f segment` OUTPUT names its `task`, and the run report its `score_threshold`. A
metric computed on predictions of another task is a number that looks right and means something
else, so `m2f evaluate` and `m2f export-coco` warn about such runs, and refuse the one pair that
leaves no meaningful number (semantic predictions scored as instance AP).
"""

from __future__ import annotations

from collections.abc import Sequence

from m2f.jobs.evaluate.predictions import EXAMPLES, RunInfo

# (GT format, run task) -> what the metric means for such predictions. Pairs not listed fit:
# each format's own task, and panoptic segments for mIoU (they partition the image like semantic).
TASK_MISMATCH = {
    ("coco-instances", "semantic"): "a semantic segment is every pixel of one class, not an instance, so mask AP of "
    "semantic segments is not instance AP (segment with --task instance, or score them with --gt-format "
    "semantic or coco-panoptic)",
    ("coco-instances", "panoptic"): "panoptic segments do not overlap and passed the panoptic score filter, so their "
    "mask AP is lower than that of instance output; segment with --task instance for the AP detectron2 and COCO "
    "report",
    ("coco-panoptic", "instance"): "instance masks overlap (the higher score keeps each pixel) and hold no stuff, "
    "so PQ Stuff counts every stuff segment as missed",
    ("coco-panoptic", "semantic"): "a semantic segment merges every instance of its class, so PQ Things is not "
    "panoptic PQ (PQ Stuff is)",
    ("semantic", "instance"): "instance masks hold no stuff and overlap (the higher score keeps each pixel), so "
    "mIoU counts stuff pixels as unlabelled",
}
REFUSED = {("coco-instances", "semantic")}  # no meaningful number remains: exit 2 in `m2f evaluate`
TASKS = ("semantic", "instance", "panoptic")


def task_findings(gt_format: str, runs: Sequence[RunInfo]) -> tuple[list[str], str | None]:
    """Warnings about runs whose task or score threshold biases `gt_format`'s metric, and a refusal.

    Returns (warnings, refusal): `refusal` is the message of a pair in REFUSED, else None.
    """
    by_task: dict[str, list[RunInfo]] = {}
    for info in runs:
        by_task.setdefault(info.task, []).append(info)
    warnings, refusal = [], None
    for task, infos in sorted(by_task.items()):
        images = sum(i.images for i in infos)
        names = ", ".join(i.run_id or "?" for i in infos[:EXAMPLES])
        source = f"{images} predicted images come from {task or 'no'} run(s) {names}"
        if task not in TASKS:
            warnings.append(f"{source}, a task this evaluation does not know; the metric may not fit them")
        elif (gt_format, task) in TASK_MISMATCH:
            message = f"{source}: {TASK_MISMATCH[gt_format, task]}"
            if (gt_format, task) in REFUSED:
                refusal = refusal or message
            else:
                warnings.append(message)
    if gt_format == "coco-instances":
        for info in runs:
            if info.score_threshold and info.score_threshold > 0:
                warnings.append(
                    f"run {info.run_id} ({info.images} images) kept only segments scoring >= {info.score_threshold:g} "
                    "(--score-threshold): mask AP ranks all detections, up to 100 per image, so the threshold "
                    "lowers AP; segment with --score-threshold 0 for an AP comparable with COCO's"
                )
    return warnings, refusal
