"""`Segments`: one image's post-processed segments at its output size, without a full mask per segment where
none is needed (an id map for segments that never overlap, one mask per distinct instance query)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from m2f.model.resize import Size

ID_MAP_DTYPES = (torch.uint8, torch.int16, torch.int32)  # the smallest that holds N + 1 ids is used


class Segments:
    """The segments of one image at its output (original) size, held without a full mask per segment where
    none is needed: panoptic and semantic segments never overlap and are one id map; instance masks are
    kept one per distinct selected query, as `keep_mask` made them (default: the (H, W) bool mask itself),
    and `which` says whose mask each segment has. `masks` builds the (N, H, W) stack for callers that want
    it (N full-size masks: costly at large sizes; `pipeline.compact` asks for it only for small ones).

    `Segments(masks, labels, scores, panoptic)` builds one from full masks (and a panoptic int32 id map), as
    tests and benchmarks do.
    """

    def __init__(
        self,
        masks: Tensor | None = None,  # (N, H, W) bool: the full masks, when given whole
        labels: Tensor | None = None,  # (N,) int64, contiguous class index in [0, K)
        scores: Tensor | None = None,  # (N,) float32
        panoptic: Tensor | None = None,  # (H, W) int32 panoptic id map, when given whole
        *,
        size: Size | None = None,  # (H, W)
        id_map: Tensor | None = None,  # (H, W) smallest integer dtype (`id_map_dtype`): 0 = none, i+1 = segment i
        parts: Tensor | list[Any] | None = None,  # instance: per distinct query its mask (D, H, W), or keep_mask's
        which: Tensor | None = None,  # (N,) int64 index into `parts` (instance)
        is_panoptic: bool = False,
    ) -> None:
        if labels is None or scores is None:
            raise ValueError("Segments need labels and scores")
        if masks is not None:
            size = (int(masks.shape[-2]), int(masks.shape[-1]))
            parts, which = masks, torch.arange(masks.shape[0], device=masks.device)
        if panoptic is not None:
            id_map, is_panoptic, size = panoptic, True, (int(panoptic.shape[0]), int(panoptic.shape[1]))
        if size is None:
            raise ValueError("Segments need their size, masks or an id map")
        self.labels, self.scores, self.size = labels, scores, size
        self.id_map, self.parts, self.which, self.is_panoptic = id_map, parts, which, is_panoptic

    @property
    def masks(self) -> Tensor:
        """(N, H, W) bool."""
        n, device = self.labels.numel(), self.labels.device
        if self.id_map is not None and self.parts is None:
            ids = torch.arange(1, n + 1, device=device).to(self.id_map.dtype)
            return self.id_map[None] == ids[:, None, None]
        if n == 0:
            return torch.zeros(0, *self.size, dtype=torch.bool, device=device)
        parts = self.parts if isinstance(self.parts, Tensor) else torch.stack(list(self.parts))
        return parts[self.which]

    @property
    def panoptic(self) -> Tensor | None:
        """The (H, W) int32 id map of panoptic segments (0 = void, i+1 = segment i), None for other tasks."""
        return self.id_map.to(torch.int32) if self.is_panoptic and self.id_map is not None else None


def id_map_dtype(n: int) -> torch.dtype:
    """The smallest of uint8, int16 and int32 that holds the ids 0..n."""
    for dtype in ID_MAP_DTYPES:
        if n <= torch.iinfo(dtype).max:
            return dtype
    raise ValueError(f"{n} segments do not fit an int32 id map")


def empty(output_size: Size, device: torch.device, panoptic: bool) -> Segments:
    labels = torch.zeros(0, dtype=torch.int64, device=device)
    scores = torch.zeros(0, dtype=torch.float32, device=device)
    if panoptic:
        id_map = torch.zeros(output_size, dtype=torch.uint8, device=device)
        return Segments(labels=labels, scores=scores, size=output_size, id_map=id_map, is_panoptic=True)
    parts = torch.zeros(0, *output_size, dtype=torch.bool, device=device)
    return Segments(labels=labels, scores=scores, size=output_size, parts=parts, which=labels)


def remap(ids: Tensor, lookup: Tensor, rows: int = 1024) -> Tensor:
    """lookup[ids] for an (H, W) map, a band of rows at a time (indexing makes int64 indices: 8 bytes a pixel)."""
    out = torch.empty(ids.shape, dtype=lookup.dtype, device=ids.device)
    for y in range(0, ids.shape[0], rows):
        out[y : y + rows] = lookup[ids[y : y + rows].long()]
    return out
