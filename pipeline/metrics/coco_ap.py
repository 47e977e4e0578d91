"""COCO mask AP: batch-output rows as COCO results, scored by pycocotools' COCOeval.

COCOeval runs untouched with ``iouType="segm"``, so the numbers equal those of any other tool that
runs COCOeval on the same results; this module only builds its inputs and names its outputs.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from m2f.pipeline.groundtruth import basename

COCO_STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def image_ids_by_file_name(gt: Mapping[str, Any]) -> dict[str, int]:
    """Basename of each image's file_name -> image id, from a COCO json.

    Basenames, because the batch output names images by full URI (s3://bucket/val/0001.jpg)
    while COCO jsons name them relative to an image folder (0001.jpg or val/0001.jpg).
    """
    return _basename_index({img["file_name"]: img["id"] for img in gt.get("images", [])})


def _basename_index(file_name_to_image_id: Mapping[str, int]) -> dict[str, int]:
    index: dict[str, int] = {}
    for file_name, image_id in file_name_to_image_id.items():
        key = basename(file_name)
        if key in index and index[key] != image_id:
            raise ValueError(f"file name {key!r} names two images ({index[key]} and {image_id}); cannot match by name")
        index[key] = int(image_id)
    return index


class CocoResults(NamedTuple):
    """COCO results for the matched rows, and the image_uri of every row with no match in the GT."""

    results: list[dict[str, Any]]
    unmatched: list[str]


def to_coco_results(
    rows: Iterable[Mapping[str, Any]],
    file_name_to_image_id: Mapping[str, int],
    category_map: Mapping[int, int] | None = None,
) -> CocoResults:
    """Batch-output rows -> COCO detection results ({image_id, category_id, segmentation, score}).

    Args:
        rows: [{image_uri, segments: [{category_id, score, rle: {size, counts}}]}], as read from
            the batch job's Parquet.
        file_name_to_image_id: GT file name -> image id (see `image_ids_by_file_name`). Rows match
            by basename, so directories on either side do not matter.
        category_map: model category id -> GT category id, when they differ. It also filters:
            segments of categories it does not name are dropped (stuff classes of a panoptic
            model, when scoring instance AP).

    Rows with no matching image are skipped and listed in `unmatched`, so the caller can warn
    rather than fail when it evaluates on a subset. RLE counts come out as str, ready for JSON.
    """
    index = _basename_index(file_name_to_image_id)
    results: list[dict[str, Any]] = []
    unmatched: list[str] = []
    for row in rows:
        uri = row.get("image_uri")
        if not uri:
            raise ValueError(f"a batch-output row has no image_uri (keys {sorted(row)})")
        image_id = index.get(basename(uri))
        if image_id is None:
            unmatched.append(str(uri))
            continue
        for seg in row.get("segments") or []:
            category_id = int(seg["category_id"])
            if category_map is not None:
                if category_id not in category_map:
                    continue
                category_id = int(category_map[category_id])
            if seg.get("score") is None:
                raise ValueError(f"a segment of {uri} has no score, which COCO AP needs to rank detections")
            rle = seg["rle"]
            counts = rle["counts"]
            counts = counts.decode("ascii") if isinstance(counts, bytes) else counts
            segmentation = {"size": [int(v) for v in rle["size"]], "counts": counts}
            results.append(
                {
                    "image_id": image_id,
                    "category_id": category_id,
                    "segmentation": segmentation,
                    "score": float(seg["score"]),
                }
            )
    return CocoResults(results, unmatched)


def _coco_gt(gt: Mapping[str, Any]) -> COCO:
    """A COCO object over a shallow copy of `gt`: COCOeval writes into annotation dicts.

    Missing `iscrowd` defaults to 0 and missing `area` is computed from the mask, since
    COCOeval needs both and hand-made jsons often leave them out.
    """
    for key in ("images", "annotations", "categories"):
        if key not in gt:
            raise ValueError(f"ground truth is not a COCO instances json: it has no {key!r}")
    images = {img["id"]: img for img in gt["images"]}
    annotations = []
    for ann in gt["annotations"]:
        ann = dict(ann)
        ann.setdefault("iscrowd", 0)
        if "area" not in ann:
            img = images.get(ann["image_id"])
            if img is None:
                raise ValueError(f"annotation {ann.get('id')} refers to image {ann['image_id']}, which is not listed")
            segm = ann["segmentation"]
            if isinstance(segm, list):  # polygons
                rle = mask_utils.merge(mask_utils.frPyObjects(segm, img["height"], img["width"]))
            elif isinstance(segm["counts"], list):  # uncompressed RLE
                rle = mask_utils.frPyObjects(segm, *segm["size"])
            else:
                rle = segm
            ann["area"] = float(mask_utils.area(rle))
        annotations.append(ann)
    coco = COCO()
    coco.dataset = dict(gt) | {"annotations": annotations}
    coco.createIndex()
    return coco


def _coco_dt(coco_gt: COCO, results: Sequence[Mapping[str, Any]]) -> COCO:
    """Results as a COCO object; `loadRes` is used whenever it can be, so numbers equal COCOeval's."""
    image_ids = set(coco_gt.getImgIds())
    strays = sorted({r["image_id"] for r in results} - image_ids)
    if strays:
        raise ValueError(f"results refer to image ids {strays[:10]} that the ground truth does not have")
    if results:
        return coco_gt.loadRes([dict(r) for r in results])
    # loadRes cannot take an empty list; no detections is still a valid (all-zero) evaluation
    coco_dt = COCO()
    coco_dt.dataset = {"images": list(coco_gt.dataset["images"]), "categories": coco_gt.dataset["categories"]}
    coco_dt.dataset["annotations"] = []
    coco_dt.createIndex()
    return coco_dt


def coco_mask_ap(gt: Mapping[str, Any], results: Sequence[Mapping[str, Any]], *, quiet: bool = True) -> dict[str, Any]:
    """COCO mask AP/AR of `results` against a COCO instances json, via pycocotools' COCOeval.

    Args:
        gt: a COCO instances json as a dict (images, annotations, categories); not modified.
        results: COCO results [{image_id, category_id, segmentation: RLE, score}].
        quiet: silence the progress and summary lines COCO and COCOeval print.

    Returns:
        The 12 COCOeval stats by name (AP, AP50, ..., ARl; -1 where COCOeval has nothing to
        measure, e.g. no small objects), and `per_class`: AP at IoU .50:.95 per category
        (None for a category with no GT).
    """
    for i, res in enumerate(results):
        missing = {"image_id", "category_id", "segmentation", "score"} - set(res)
        if missing:
            raise ValueError(f"result {i} lacks {sorted(missing)}")
    sink = contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext()
    with sink:
        coco_gt = _coco_gt(gt)
        coco_dt = _coco_dt(coco_gt, results)
        evaluator = COCOeval(coco_gt, coco_dt, iouType="segm")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    summary: dict[str, Any] = {name: float(v) for name, v in zip(COCO_STAT_NAMES, evaluator.stats, strict=True)}
    precision = evaluator.eval["precision"]  # (T, R, K, A, M): IoU thr, recall thr, class, area, max dets
    per_class = []
    for k, cat_id in enumerate(evaluator.params.catIds):
        p = precision[:, :, k, 0, -1]  # area "all", 100 detections
        p = p[p > -1]
        name = coco_gt.cats[cat_id].get("name", str(cat_id))
        per_class.append({"id": int(cat_id), "name": name, "AP": float(p.mean()) if p.size else None})
    summary["per_class"] = per_class
    return summary
