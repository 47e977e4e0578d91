"""Compact predictions: what the model actor copies from its device to the host, instead of full masks.

Post-processing leaves (N, H, W) boolean masks on the model's device: 100 instance masks of a 640x480
image are 31 MB, and copying them to the host, then scanning every one in full to encode it, bounded the
actor's rate. The compact form is built on the device, so that only it travels:

- panoptic and semantic segments never overlap: one id map (H, W) in the smallest integer dtype that holds
  N + 1 values (uint8 below 256 segments), 0 = no segment, i + 1 = segment i;
- instance masks may overlap: each mask cropped to its bounding box (found on the device), flattened row
  by row and bit-packed as `np.packbits` does (first pixel in the highest bit), crops one after another.

Segments below the score threshold (and instance masks that are empty at the output size, which are no
instance) are dropped on the device too: they would only be copied to be thrown away.
`pipeline.encode.rles_from_id_map` / `rles_from_crops` turn the compact form into the very RLEs that
encoding the full masks gives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from m2f.model.postprocess import Segments
from m2f.pipeline.encode import rles_from_crops, rles_from_id_map

ID_MAP_DTYPES = (torch.uint8, torch.int16, torch.int32)  # the smallest that holds N + 1 ids is used
_BIT_WEIGHTS = (128, 64, 32, 16, 8, 4, 2, 1)  # np.packbits' default ("big") bit order


@dataclass
class Prediction:
    """One image's kept segments at its output (original) size, compact, on the CPU.

    Exactly one of `id_map` (panoptic, semantic) and `boxes` + `bits` (instance) is set.
    """

    task: str
    labels: np.ndarray  # (N,) int64, contiguous class index
    scores: np.ndarray  # (N,) float32
    height: int
    width: int
    id_map: np.ndarray | None = None  # (H, W) uint8 / int16 / int32: 0 = none, i+1 = segment i
    boxes: np.ndarray | None = None  # (N, 4) int32 y0, x0, y1, x1 (end exclusive), instance
    bits: np.ndarray | None = None  # (sum_i ceil(h_i * w_i / 8),) uint8: each box's crop, packed, in turn

    @property
    def panoptic(self) -> np.ndarray | None:
        """The panoptic id map as int32 (what panoptic quality reads), None for other tasks."""
        return None if self.task != "panoptic" or self.id_map is None else self.id_map.astype(np.int32)

    def rles(self) -> list[dict[str, Any]]:
        """Each segment's COCO RLE (pycocotools' dicts, bytes counts), as encoding its full mask gives."""
        return compact_rles(
            self.height, self.width, len(self.scores), id_map=self.id_map, boxes=self.boxes, bits=self.bits
        )

    def masks(self) -> np.ndarray:
        """(N, H, W) bool: the full masks again, for callers that want them (slow: full size)."""
        n, (h, w) = len(self.labels), (self.height, self.width)
        if self.id_map is not None:
            return self.id_map[None] == np.arange(1, n + 1, dtype=self.id_map.dtype)[:, None, None]
        out = np.zeros((n, h, w), dtype=bool)
        for i, (crop, (y0, x0, y1, x1)) in enumerate(zip(unpack_crops(self.boxes, self.bits), self.boxes, strict=True)):
            out[i, y0:y1, x0:x1] = crop
        return out


def id_map_dtype(n: int) -> torch.dtype:
    """The smallest of uint8, int16 and int32 that holds the ids 0..n."""
    for dtype in ID_MAP_DTYPES:
        if n <= torch.iinfo(dtype).max:
            return dtype
    raise ValueError(f"{n} segments do not fit an int32 id map")


def compact(task: str, segments: Segments, score_threshold: float) -> Prediction:
    """One image's post-processed segments (on the model's device) -> the compact form, on the CPU.

    Only the compact tensors cross to the host: labels, scores, and an id map or packed crops.
    """
    masks = segments.masks  # (N, H, W) bool, on the device
    h, w = masks.shape[-2:]
    keep = segments.scores >= score_threshold  # compared in float32, as numpy compares a float32 array
    bytes_ = masks.view(torch.uint8)  # amax on uint8 is ~15x faster than `any` on bool on a CPU
    if task == "instance":
        rows = bytes_.amax(2)  # (N, H): 1 where a row of the mask is set
        keep &= rows.amax(1) > 0  # an empty mask at the output size is no instance
    kept = keep.nonzero().flatten()  # (n,)
    n = kept.numel()
    labels, scores = segments.labels[kept], segments.scores[kept]
    if task == "instance":
        if n < len(keep):
            bytes_, rows = bytes_.index_select(0, kept), rows.index_select(0, kept)  # (n, H, W), (n, H)
        boxes = _boxes(rows, bytes_.amax(1)).cpu()  # (n, 4): the crops' sizes decide the packed layout
        bits = pack_crops(bytes_.view(torch.bool), boxes)
        return Prediction(
            task, labels.cpu().numpy(), scores.cpu().numpy(), h, w, boxes=boxes.numpy(), bits=bits.cpu().numpy()
        )
    dtype = id_map_dtype(n)
    lookup = torch.zeros(len(keep) + 1, dtype=dtype, device=masks.device)  # old id -> new id, 0 stays 0
    lookup[kept + 1] = torch.arange(1, n + 1, device=masks.device).to(dtype)
    if segments.panoptic is not None:
        old = segments.panoptic  # (H, W): 0 = void, i+1 = segment i
    else:  # disjoint masks: the id of the one that covers a pixel, or 0 where none does
        old_dtype = id_map_dtype(len(keep))
        ids = torch.arange(1, len(keep) + 1, device=masks.device).to(old_dtype)
        old = (bytes_.to(old_dtype) * ids[:, None, None]).sum(0, dtype=old_dtype)  # (H, W)
    id_map = lookup[old.long()]  # (H, W) in `dtype`
    return Prediction(task, labels.cpu().numpy(), scores.cpu().numpy(), h, w, id_map=id_map.cpu().numpy())


def mask_boxes(masks: Tensor) -> Tensor:
    """masks (N, H, W) bool, none empty -> (N, 4) int32 boxes y0, x0, y1, x1 (end exclusive), on their device."""
    bytes_ = masks.view(torch.uint8)
    return _boxes(bytes_.amax(2), bytes_.amax(1))


def _boxes(rows: Tensor, cols: Tensor) -> Tensor:
    """rows (N, H), cols (N, W) uint8, 1 where a mask's row / column is set -> (N, 4) int32 boxes."""
    h, w = rows.shape[1], cols.shape[1]
    y0, x0 = rows.argmax(1), cols.argmax(1)  # the first set row / column
    y1, x1 = h - rows.flip(1).argmax(1), w - cols.flip(1).argmax(1)  # one past the last
    return torch.stack([y0, x0, y1, x1], dim=1).to(torch.int32)


def pack_crops(masks: Tensor, boxes: Tensor, *, use_numpy: bool | None = None) -> Tensor:
    """masks (N, H, W) bool, boxes (N, 4) int32 on the CPU -> (sum_i ceil(h_i * w_i / 8),) uint8, on the
    masks' device: each box's crop flattened row by row, padded with zeros to whole bytes, packed as
    `np.packbits` packs (the first pixel in the highest bit).

    On a CPU (`use_numpy` None) this is `np.packbits` on views of the masks, 25x faster than the torch ops
    a GPU runs (0.6 vs 16 ms for 100 masks of 309x282); the bytes are the same.
    """
    device = masks.device
    if use_numpy or (use_numpy is None and device.type == "cpu"):
        arrays = masks.cpu().numpy()  # a view on a CPU
        packed = [np.packbits(arrays[i, y0:y1, x0:x1]) for i, (y0, x0, y1, x1) in enumerate(boxes.tolist())]
        return torch.from_numpy(np.concatenate(packed) if packed else np.zeros(0, np.uint8)).to(device)
    pieces = []
    for mask, (y0, x0, y1, x1) in zip(masks, boxes.tolist(), strict=True):
        crop = mask[y0:y1, x0:x1].flatten()  # (h * w,)
        pieces.append(crop)
        pad = -crop.numel() % 8
        if pad:
            pieces.append(torch.zeros(pad, dtype=torch.bool, device=device))
    if not pieces:
        return torch.zeros(0, dtype=torch.uint8, device=device)
    bits = torch.cat(pieces).view(-1, 8).view(torch.uint8)  # (bytes, 8), 0 or 1
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=device)
    return (bits * weights).sum(1, dtype=torch.uint8)  # at most 255: no overflow


def crop_sizes(boxes: np.ndarray) -> np.ndarray:
    """boxes (N, 4) y0, x0, y1, x1 -> (N,) pixels in each crop."""
    boxes = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def unpack_crops(boxes: np.ndarray, bits: np.ndarray) -> list[np.ndarray]:
    """The inverse of `pack_crops` on the CPU: boxes (N, 4), bits -> N (h_i, w_i) bool crops.

    ValueError when `bits` does not have the bytes the boxes call for (a corrupt row).
    """
    boxes = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
    sizes = crop_sizes(boxes)
    if (sizes <= 0).any():
        raise ValueError(f"empty or inverted boxes: {boxes[sizes <= 0].tolist()}")
    nbytes = (sizes + 7) // 8
    if int(nbytes.sum()) != len(bits):
        raise ValueError(f"{len(bits)} packed bytes for boxes that need {int(nbytes.sum())}")
    crops, offset = [], 0
    for (y0, x0, y1, x1), size, count in zip(boxes.tolist(), sizes.tolist(), nbytes.tolist(), strict=True):
        flat = np.unpackbits(bits[offset : offset + count], count=size).view(bool)  # (h * w,)
        crops.append(flat.reshape(y1 - y0, x1 - x0))
        offset += count
    return crops


def compact_rles(
    height: int,
    width: int,
    n: int,
    *,
    id_map: np.ndarray | None = None,
    boxes: np.ndarray | None = None,
    bits: np.ndarray | None = None,
) -> list[dict[str, Any]]:
    """The n segments' RLEs from either compact layout (an id map, or boxes and their packed crops)."""
    if id_map is not None:
        if id_map.shape != (height, width):
            raise ValueError(f"id map of shape {id_map.shape} for a {height}x{width} image")
        return rles_from_id_map(id_map, n)
    if boxes is None or bits is None:
        raise ValueError("a compact prediction needs an id map, or boxes and packed crops")
    boxes = np.asarray(boxes).reshape(-1, 4)
    if len(boxes) != n:
        raise ValueError(f"{len(boxes)} boxes for {n} segments")
    return rles_from_crops(unpack_crops(boxes, bits), boxes, height, width)
