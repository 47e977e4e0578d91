"""Batch-output segments (COCO RLE) painted into one (H, W) id map, so RLE output can be scored.

PQ compares id maps, mIoU class maps and the panoptic export writes id PNGs: all three start from
the same painting, so overlaps are resolved one way everywhere.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

VOID = 0  # panoptic id of unlabelled pixels, in predictions and ground truth alike


def _decode_rle(rle: Mapping[str, Any]) -> np.ndarray:
    """(H, W) uint8 mask from a COCO RLE, compressed (str or bytes counts) or uncompressed (list)."""
    if "size" not in rle or "counts" not in rle:
        raise ValueError(f"an RLE needs 'size' and 'counts', got keys {sorted(rle)}")
    h, w = (int(v) for v in rle["size"])
    counts = rle["counts"]
    if isinstance(counts, list):
        encoded = mask_utils.frPyObjects({"size": [h, w], "counts": counts}, h, w)
    else:
        encoded = {"size": [h, w], "counts": counts.encode("ascii") if isinstance(counts, str) else bytes(counts)}
    return mask_utils.decode(encoded)


def segments_to_id_map(segments: Sequence[Mapping[str, Any]], height: int, width: int) -> np.ndarray:
    """(H, W) int32 panoptic id map painted from RLE segments, so RLE output can be scored for PQ.

    Args:
        segments: [{rle: {size, counts}, id (optional)}]; without an id a segment gets its
            1-based position in the list, the same numbering the caller should give its infos.
        height, width: image size; every RLE must have exactly this size.

    Where masks overlap, the earlier segment keeps the pixel: batch output lists segments by
    falling score, so the most confident one wins, as in Mask2Former's panoptic inference.
    Pixels that no segment covers stay 0 (void).
    """
    id_map = np.zeros((height, width), dtype=np.int32)
    taken = np.zeros((height, width), dtype=bool)
    for position, seg in enumerate(segments, start=1):
        if "rle" not in seg:
            raise ValueError(f"segment {position} has no 'rle'")
        seg_id = int(seg.get("id", position))
        if seg_id == VOID:
            raise ValueError(f"segment {position} has id {VOID}, which is reserved for void pixels")
        mask = _decode_rle(seg["rle"]).astype(bool)
        if mask.shape != (height, width):
            raise ValueError(f"segment {position} has an RLE of size {mask.shape}, expected {(height, width)}")
        paint = mask & ~taken
        id_map[paint] = seg_id
        taken |= paint
    return id_map


# ---------------------------------------------------------------------------------------------
