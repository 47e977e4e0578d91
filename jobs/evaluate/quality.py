"""Scoring a checkpoint in-process on a COCO-panoptic dataset: PQ and mask AP, no Ray.

This is how the demo model's figures are measured (`python -m m2f.jobs.evaluate.quality MODEL DATA`) and how
the test suite checks that the shipped model still meets a floor. The batch path (`m2f segment`
then `m2f evaluate`) gives the same numbers over Parquet; this one needs no cluster.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import numpy as np
import torch

from m2f import model as m2f
from m2f.pipeline.metrics.coco_ap import coco_mask_ap
from m2f.pipeline.metrics.panoptic_quality import PQAccumulator
from m2f.pipeline.predictor import Predictor
from m2f.pipeline.training.datasets import CocoPanoptic


def score(net: m2f.Mask2Former, data: str, *, limit: int | None = None) -> dict[str, Any]:
    """PQ (panoptic output vs panoptic.json) and mask AP (instance output vs instances.json) on `data`."""
    root = data.rstrip("/")
    dataset = CocoPanoptic(f"{root}/panoptic.json", f"{root}/panoptic", f"{root}/images")
    with open(f"{root}/instances.json") as f:
        instances_gt = json.load(f)
    ids = {img["file_name"]: img["id"] for img in instances_gt["images"]}
    predictor = Predictor(net, task="instance")  # panoptic for PQ comes from the same forward pass
    pq = PQAccumulator()
    results: list[dict[str, Any]] = []
    n = len(dataset) if limit is None else min(limit, len(dataset))
    started = time.time()
    for i in range(n):
        sample = dataset.load(i)
        h, w = sample.image.shape[:2]
        (by_task,) = predictor.predict_tasks([predictor.resize(sample.image)], [(h, w)], ("panoptic", "instance"))
        pan = by_task["panoptic"]
        pred_segments = [
            {"id": j + 1, "category_id": net.config.category_id(int(label))}
            for j, label in enumerate(pan.labels.tolist())
        ]
        gt_map = np.zeros((h, w), np.int32)
        for j, mask in enumerate(sample.masks):
            gt_map[mask] = j + 1
        gt_segments = [
            {"id": j + 1, "category_id": dataset.categories[int(label)]["id"], "iscrowd": 0}
            for j, label in enumerate(sample.labels.tolist())
        ]
        pq.add(pan.panoptic, pred_segments, gt_map, gt_segments)
        image_id = ids[sample.file_name]
        results += [
            {"image_id": image_id, "category_id": r["category_id"], "segmentation": r["rle"], "score": r["score"]}
            for r in predictor.encode(by_task["instance"])
        ]
    pan_summary = pq.summary(dataset.categories)
    ap = coco_mask_ap(instances_gt, results)
    return {
        "images": n,
        "PQ": pan_summary["All"]["pq"],
        "SQ": pan_summary["All"]["sq"],
        "RQ": pan_summary["All"]["rq"],
        "PQ_things": pan_summary["Things"]["pq"],
        "PQ_stuff": pan_summary["Stuff"]["pq"],
        "AP": ap["AP"],
        "AP50": ap["AP50"],
        "AP75": ap["AP75"],
        "seconds": round(time.time() - started, 1),
    }


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        raise SystemExit("usage: python -m m2f.jobs.evaluate.quality MODEL DATA [LIMIT]")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    net = m2f.load(argv[0])
    print(json.dumps(score(net, argv[1], limit=int(argv[2]) if len(argv) > 2 else None), indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
