"""`m2f export-coco`: a batch run in the COCO predictions formats any COCO evaluation tool reads.

The rows are those `m2f evaluate` would score (`predictions.BatchOutput`: each image's chosen ok
row), so an export scored by COCO's own tools gives `m2f evaluate`'s numbers.
"""

from __future__ import annotations

import io
import posixpath
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from m2f.jobs.common.bad_input import EXIT_BAD_INPUT, EXIT_OK, USER_ERRORS, BadInput, report_bug, report_error
from m2f.jobs.common.console import Console
from m2f.jobs.evaluate.json_files import read_json, require, write_json
from m2f.jobs.evaluate.predictions import BatchOutput, MatchCounts, check_size, match_by_name, open_predictions
from m2f.jobs.evaluate.task_fit import task_findings
from m2f.pipeline.groundtruth import basename, panoptic_rgb, stem
from m2f.pipeline.metrics.coco_ap import image_ids_by_file_name, to_coco_results
from m2f.pipeline.metrics.id_map import segments_to_id_map
from m2f.pipeline.storage import Storage, write_atomic

EXPORT_FORMATS = ("instances", "panoptic")
STABLE_ID_HEX = 13  # hex digits of image_id kept for a COCO image id: 52 bits, exact in any JSON reader
PANOPTIC_MAX_ID = 256**3 - 1  # the largest segment id an RGB PNG can hold (R + 256 G + 256^2 B)


class ExportRow(NamedTuple):
    """One image to export: its COCO image id, the file name to list it under, its batch-output row."""

    image_id: int
    file_name: str
    row: dict[str, Any]


def export_coco(
    predictions: str,
    results: str,
    ground_truth: str | None = None,
    *,
    storage: Storage | None = None,
    result_format: str = "instances",
) -> int:
    """Write every image's chosen ok row in a COCO predictions format; 0 on success, 2 on bad input, 3 on a bug.

    `result_format`:
    - "instances": COCO results JSON [{image_id, category_id, segmentation: {size, counts: str},
      score}], one per thing segment; stuff segments (`is_thing` false) are left out, since
      instance results and COCOeval know things only.
    - "panoptic": COCO panoptic predictions, as panopticapi's `pq_compute` reads them: `results`
      (it must end in .json) holds {"images", "annotations": [{image_id, file_name, segments_info:
      [{id, category_id, iscrowd, isthing, area, bbox, score}]}], "categories"}, and the folder
      beside it named by its stem holds one RGB PNG per image, segment id = R + 256 G + 256^2 B
      (0 = no segment). Overlapping masks are resolved as `m2f evaluate` does (the earlier,
      higher-scoring segment keeps the pixel); segments left with no pixel are not listed.

    With `ground_truth` (a COCO JSON) image ids are that JSON's, matched by file name; rows of
    images it does not list are skipped and counted. In panoptic format, GT images without an ok
    prediction get an empty annotation (an all-zero PNG), since `pq_compute` needs one per GT image.
    Without it, image_id = `stable_image_id` (52 bits, so any JSON reader keeps it exactly).
    `storage` reaches every URI (None: local files only).
    """
    storage, console = storage or Storage(), Console()
    try:
        if result_format not in EXPORT_FORMATS:
            raise BadInput(f"--format must be one of {list(EXPORT_FORMATS)}, got {result_format!r}")
        if result_format == "panoptic" and not results.endswith(".json"):
            raise BadInput(
                f"--format panoptic writes its PNGs beside the JSON: RESULTS must end in .json, got {results}"
            )
        batch = open_predictions(predictions, storage)
        gt = None
        if ground_truth:
            gt = read_json(ground_truth, storage, "--gt")
            require(gt, ("images",), ground_truth, "COCO", {"images": ("id", "file_name")})
        warnings, refusal = task_findings(f"coco-{result_format}", batch.runs())
        for warning in warnings + ([refusal] if refusal else []):
            console.line(f"warning: {warning}", err=True)
        rows = _export_rows(batch, gt, ground_truth)
        if result_format == "instances":
            out, stuff = _instance_results(rows)
            write_json(results, out, storage)
            lines = [f"wrote {len(out)} results from {_exported(batch, gt)} images to {results}"]
            if stuff:
                lines.append(f"{stuff} stuff segments (is_thing false) left out: instance results hold things only")
        else:
            folder = results[: -len(".json")]
            document, empty = _write_panoptic(rows, batch.counts, gt, ground_truth, folder, storage)
            write_json(results, document, storage)
            segments = sum(len(a["segments_info"]) for a in document["annotations"])
            lines = [
                f"wrote {len(document['annotations'])} panoptic annotations ({segments} segments) to {results}, "
                f"their PNGs to {folder}/"
            ]
            if empty:
                lines.append(f"{empty} ground-truth images have no ok prediction: written as empty (all void)")
    except USER_ERRORS as e:
        report_error(e, console)
        return EXIT_BAD_INPUT
    except Exception as e:
        return report_bug("m2f export-coco", e, console)
    counts = batch.counts
    if counts.failed:
        lines.append(f"{counts.failed} images failed in the batch run (error rows only) and have no results")
    if ground_truth:
        lines.append(f"{len(counts.unmatched_predictions)} images skipped: their file name is not in {ground_truth}")
    else:
        lines.append(
            f"image_id = int(first {STABLE_ID_HEX} hex digits of the batch output's image_id), below 2**52 so "
            "JSON readers keep it exact; pass --gt to use a COCO JSON's"
        )
    console.line("\n".join(lines))
    return EXIT_OK


def stable_image_id(image_id: str) -> int:
    """The integer COCO image id of a batch-output `image_id` (16 hex digits) without a GT JSON.

    The first 13 hex digits (52 bits) as an int: stable across runs, and below 2**53, the largest
    range in which a JSON reader that parses numbers as doubles (JavaScript, jq) keeps integers
    exact. Two images in one export whose ids share 52 bits are reported, not merged.
    """
    try:
        if len(image_id) < STABLE_ID_HEX:
            raise ValueError
        return int(image_id[:STABLE_ID_HEX], 16)
    except (TypeError, ValueError):
        raise BadInput(f"image_id {image_id!r} is not hexadecimal; not `m2f segment` output") from None


def _exported(batch: BatchOutput, gt: Mapping[str, Any] | None) -> int:
    return batch.counts.matched if gt is not None else batch.counts.ok


def _gt_images(gt: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Basename of file_name -> image entry of a COCO JSON."""
    return {basename(image["file_name"]): image for image in gt["images"]}


def _export_rows(batch: BatchOutput, gt: Mapping[str, Any] | None, ground_truth: str | None) -> Iterator[ExportRow]:
    """(COCO image id, image file name, row) of every row to export, GT's ids or `stable_image_id`.

    With a GT the file name is the GT's, and rows whose size differs from the GT image's are refused.
    """
    if gt is not None:
        images = _gt_images(gt)
        ids = image_ids_by_file_name(gt)
        for image_id, row in match_by_name(batch.ok_rows(), ids, basename, batch.counts, str(ground_truth)):
            image = images[basename(row["image_uri"])]
            if "height" in image and "width" in image:
                check_size(row, int(image["height"]), int(image["width"]), image["file_name"])
            yield ExportRow(image_id, image["file_name"], row)
        return
    seen: dict[int, str] = {}
    for row in batch.ok_rows():
        image_id = stable_image_id(row["image_id"])
        if image_id in seen:
            raise BadInput(
                f"{seen[image_id]} and {row['image_uri']} share the first {STABLE_ID_HEX} hex digits of their "
                "image_id, so they would share a COCO image id; pass --gt to use a COCO JSON's ids"
            )
        seen[image_id] = row["image_uri"]
        yield ExportRow(image_id, basename(row["image_uri"]), row)


def _instance_results(rows: Iterable[ExportRow]) -> tuple[list[dict[str, Any]], int]:
    """COCO results of the thing segments of `rows`, and how many stuff segments were left out."""
    out: list[dict[str, Any]] = []
    stuff = 0
    for image_id, _, row in rows:
        segments = row["segments"] or []
        things = [s for s in segments if s.get("is_thing") is not False]  # unknown (null) counts as a thing
        stuff += len(segments) - len(things)
        out += to_coco_results([row | {"segments": things}], {basename(row["image_uri"]): image_id}).results
    return out, stuff


def _write_panoptic(
    rows: Iterable[ExportRow],
    counts: MatchCounts,
    gt: Mapping[str, Any] | None,
    ground_truth: str | None,
    folder: str,
    storage: Storage,
) -> tuple[dict[str, Any], int]:
    """Write one panoptic PNG per row under `folder`; returns the panoptic JSON and the empty GT images.

    With a GT its categories are the JSON's (a segment of another category is refused, as
    `pq_compute` would refuse it) and every GT image without a row gets an empty annotation.
    Without one the categories are those the segments name, with their labels and is_thing.
    """
    fs, root = storage.open(folder)
    gt_categories = gt.get("categories") if gt is not None else None
    known = {int(c["id"]) for c in gt_categories} if isinstance(gt_categories, list) else None
    categories: dict[int, dict[str, Any]] = {}
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    pngs: dict[str, str] = {}  # PNG name -> image file name: two images must not share a PNG

    def add(image_id: int, file_name: str, id_map: np.ndarray, segments: Sequence[Mapping[str, Any]]) -> None:
        png = stem(file_name) + ".png"
        if png in pngs:
            raise BadInput(f"images {pngs[png]} and {file_name} would share the panoptic PNG {png}")
        pngs[png] = file_name
        write_atomic(fs, posixpath.join(root, png), _id_png(id_map))
        height, width = id_map.shape
        images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
        annotations.append({"image_id": image_id, "file_name": png, "segments_info": _segments_info(id_map, segments)})

    for image_id, file_name, row in rows:
        segments = [s | {"id": s["id"] or k} for k, s in enumerate(row["segments"] or [], start=1)]
        ids = [int(s["id"]) for s in segments]
        if len(set(ids)) != len(ids) or any(not 0 < i <= PANOPTIC_MAX_ID for i in ids):
            raise BadInput(f"{row['image_uri']}: segment ids {ids} are not distinct ids in 1..{PANOPTIC_MAX_ID}")
        unknown = sorted({int(s["category_id"]) for s in segments} - known) if known is not None else []
        if unknown:
            raise BadInput(f"{row['image_uri']}: category ids {unknown} are not among the categories of {ground_truth}")
        for s in segments:
            category_id = int(s["category_id"])
            name = s.get("label") or str(category_id)
            categories.setdefault(
                category_id, {"id": category_id, "name": name, "isthing": int(bool(s.get("is_thing")))}
            )
        add(image_id, file_name, segments_to_id_map(segments, int(row["height"]), int(row["width"])), segments)

    empty = 0
    if gt is not None:
        images_by_name = _gt_images(gt)
        for name in counts.gt_without_prediction:
            image = images_by_name[name]
            if "height" not in image or "width" not in image:
                raise BadInput(f"{ground_truth}: image {image['file_name']} has no height and width")
            add(
                int(image["id"]),
                image["file_name"],
                np.zeros((int(image["height"]), int(image["width"])), np.int32),
                [],
            )
            empty += 1
    listed = list(gt_categories) if known is not None else sorted(categories.values(), key=lambda c: c["id"])
    return {"images": images, "annotations": annotations, "categories": listed}, empty


def _segments_info(id_map: np.ndarray, segments: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """COCO panoptic segments_info of the segments visible in `id_map` (H, W), with their area and bbox."""
    infos = []
    for s in segments:
        ys, xs = np.nonzero(id_map == s["id"])
        if ys.size == 0:
            continue  # hidden by earlier segments: pq_compute refuses ids listed but not in the PNG
        x, y = int(xs.min()), int(ys.min())
        infos.append(
            {
                "id": int(s["id"]),
                "category_id": int(s["category_id"]),
                "iscrowd": 0,
                "isthing": bool(s.get("is_thing")),
                "area": int(ys.size),
                "bbox": [x, y, int(xs.max()) - x + 1, int(ys.max()) - y + 1],
                "score": None if s.get("score") is None else float(s["score"]),
            }
        )
    return infos


def _id_png(id_map: np.ndarray) -> bytes:
    """An (H, W) segment id map as RGB PNG bytes, id = R + 256 G + 256^2 B."""
    buffer = io.BytesIO()
    Image.fromarray(panoptic_rgb(id_map)).save(buffer, format="PNG")  # (H, W, 3)
    return buffer.getvalue()
