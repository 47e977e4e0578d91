"""Official Mask2Former inference (semantic, instance, panoptic) on batched raw outputs, CPU or GPU.

Every task follows the official `MaskFormer.forward` at test time (facebookresearch/Mask2Former,
`mask2former/maskformer_model.py`): mask logits are upsampled bilinearly to the padded network input, and then
- with `sem_seg_postprocess_before_inference` (true whenever panoptic or instance inference is on), cropped to
  the resized image and resized bilinearly to the original image, and the per-image algorithm runs at that size;
- otherwise (a semantic-only model) `semantic_inference` runs at the padded size and its K-class score map is
  cropped and resized to the original image (detectron2's `sem_seg_postprocess`).
`semantic_inference(resize_first=...)` offers both orders; `postprocess` resizes first only for a panoptic or
instance model. Resizing is done a chunk of queries (or classes) and, for panoptic and instance output of a
big image, a band of columns at a time, only for the queries that can change the result; the outcome equals
resizing all at once (model/resize.py). Segments stay an id map or one mask per query (model/segments.py).

Where this deliberately differs from the official code:
- instance segments are returned sorted by score (the official order is `topk(sorted=False)`'s);
- panoptic segments carry a score (their query's class probability; a merged stuff segment keeps the max);
- semantic output is one segment per present class (the argmax map) with a score: the mean over the segment's
  pixels of the normalised per-pixel class probability semseg[k] / sum_k' semseg[k'].

Where it differs from Hugging Face's `Mask2FormerImageProcessor.post_process_*` (read in transformers 5.23):
- HF first resizes mask logits to a fixed 384x384, whatever the network input was, then straight to the
  target size: there is no padded-size/crop step, so padding ends up stretched into the image;
- HF semantic always resizes the K-class score map after the einsum (from its 384x384 map), also for
  panoptic models, whose official semantic output resizes the mask logits before it;
- HF panoptic defaults to `threshold=0.5` (official object_mask_threshold 0.8); it resizes sigmoid
  probabilities instead of logits; its "original area" counts score-weighted probabilities >= 0.5 (official:
  unweighted); a segment is every pixel whose argmax is the query, without requiring probability >= 0.5;
  it drops a segment when area ratio <= threshold (official: < threshold); it merges classes listed in
  `label_ids_to_fuse` (empty by default, so nothing merges) instead of every stuff class; an empty result
  is a map of -1 rather than 0;
- HF instance keeps the top `num_queries` (not 100) over Q x K, never filters out stuff classes, drops
  results scoring below `threshold=0.5` and empty masks, binarises at 384x384 and resizes the binary masks
  with nearest interpolation, and paints all masks into one id map (later ones overwrite earlier ones)
  unless `return_binary_maps`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from m2f.model.config import ModelConfig
from m2f.model.resize import (
    Geometry,
    Size,
    column_bands,
    geometries,
    query_chunks,
    query_tiles,
    resized_argmax,
    tile_chunk,
    upsample_mask_logits,
)
from m2f.model.segments import Segments, empty, id_map_dtype, remap

__all__ = [
    "Segments",
    "id_map_dtype",
    "instance_inference",
    "panoptic_inference",
    "postprocess",
    "semantic_inference",
    "upsample_mask_logits",
]


def _is_thing_tensor(is_thing: Sequence[bool], num_classes: int, device: torch.device) -> Tensor:
    if len(is_thing) != num_classes:
        raise ValueError(f"is_thing has {len(is_thing)} entries for {num_classes} classes")
    return torch.tensor(list(is_thing), dtype=torch.bool, device=device)


def _semantic_one(
    mask_cls: Tensor, mask_logits: Tensor, geom: Geometry, chunk_size: int | None, resize_first: bool
) -> Segments:
    """mask_cls (Q, K+1), mask_logits (Q, h, w) -> one segment per class present in argmax_K semseg."""
    probs = mask_cls.float().softmax(-1)[:, :-1]  # (Q, K)
    k = probs.shape[1]
    h, w = geom.output_size
    # resize first: semseg at the output size; else at the image size (the padded map, cropped), resized below
    at = geom if resize_first else replace(geom, output_size=geom.image_size)
    semseg = torch.zeros(k, at.output_size[0] * at.output_size[1], dtype=torch.float32, device=mask_cls.device)
    queries = torch.arange(probs.shape[0], device=mask_cls.device)
    for start, logits in query_chunks(mask_logits.float(), queries, at, chunk_size):
        c = logits.shape[0]
        semseg.addmm_(probs[start : start + c].T, logits.sigmoid().view(c, -1))  # (K, c) @ (c, h*w)

    if resize_first:
        label_map = semseg.argmax(0)  # (H*W,), ties -> lowest class
        best = semseg.gather(0, label_map[None])[0]
        total = semseg.sum(0)
    else:
        label_map, best, total = resized_argmax(semseg.view(k, *geom.image_size), geom.output_size, chunk_size)
    del semseg
    ratio = best / total.clamp_min(torch.finfo(torch.float32).tiny)  # per-pixel class probability
    counts = torch.bincount(label_map, minlength=k)
    labels = counts.nonzero().flatten()  # present classes, ascending
    sums = torch.zeros(k, dtype=torch.float32, device=mask_cls.device).index_add_(0, label_map, ratio)
    dtype = id_map_dtype(labels.numel())
    lookup = torch.zeros(k, dtype=dtype, device=mask_cls.device)  # class -> its segment's id
    lookup[labels] = torch.arange(1, labels.numel() + 1, device=mask_cls.device).to(dtype)
    id_map = lookup[label_map].view(h, w)
    return Segments(labels=labels, scores=sums[labels] / counts[labels], size=geom.output_size, id_map=id_map)


def _panoptic_one(
    mask_cls: Tensor,
    mask_logits: Tensor,
    geom: Geometry,
    is_thing: Tensor,
    object_mask_threshold: float,
    overlap_threshold: float,
    chunk_size: int | None,
    band_width: int | None,
) -> Segments:
    """mask_cls (Q, K+1), mask_logits (Q, h, w) -> non-overlapping segments and their id map.

    Made a band of columns at a time (`model.resize.query_tiles`); only the won pixels' id map is whole.
    """
    device = mask_cls.device
    probs = mask_cls.float().softmax(-1)  # (Q, K+1)
    scores, labels = probs.max(-1)  # (Q,), (Q,); the label may be the no-object class K
    keep = (labels != probs.shape[-1] - 1) & (scores > object_mask_threshold)
    kept = keep.nonzero().flatten()  # (n,)
    n = kept.numel()
    if n == 0:
        return empty(geom.output_size, device, panoptic=True)
    kept_scores, kept_labels = scores[kept], labels[kept]

    # Per band, the argmax of score * sigmoid over kept queries, streamed over chunks (ties -> first query),
    # and whether the winner's own mask (sigmoid >= 0.5) covers the pixel.
    h, w = geom.output_size
    won = torch.empty(h, w, dtype=id_map_dtype(n), device=device)  # q+1 where q wins inside its own mask, else 0
    mask_area = torch.zeros(n, dtype=torch.int64, device=device)
    original_area = torch.zeros(n, dtype=torch.int64, device=device)
    final_area = torch.zeros(n, dtype=torch.int64, device=device)
    bands = column_bands(geom.output_size, band_width)
    step = tile_chunk(geom, bands, chunk_size)
    logits_all = mask_logits.float()
    for x0, x1 in bands:
        best = torch.full((h, x1 - x0), -1.0, dtype=torch.float32, device=device)  # every probability beats it
        owner = torch.zeros(h, x1 - x0, dtype=torch.int32, device=device)  # index into kept
        owned = torch.zeros(h, x1 - x0, dtype=torch.bool, device=device)
        for _, start, tile in query_tiles(logits_all, kept, geom, step, [(x0, x1)] if len(bands) > 1 else bands):
            c = tile.shape[0]
            sig = tile.sigmoid_() if tile.is_contiguous() else tile.sigmoid()  # (c, H, band)
            above = sig >= 0.5
            original_area[start : start + c] += above.flatten(1).sum(1)
            prob = sig.mul_(kept_scores[start : start + c, None, None])
            if c == 1:  # one query a step (a big image's bands): in place, no index maps
                better = prob[0] > best
                torch.where(better, prob[0], best, out=best)
                owner.masked_fill_(better, start)
                torch.where(better, above[0], owned, out=owned)
            else:
                arg = prob.argmax(0)  # (H, band)
                top = prob.gather(0, arg[None])[0]
                better = top > best
                best = torch.where(better, top, best)
                owner = torch.where(better, (arg + start).to(torch.int32), owner)
                owned = torch.where(better, above.gather(0, arg[None])[0], owned)
            del sig, above, prob, better
        flat = owner.flatten().long()
        mask_area += torch.bincount(flat, minlength=n)
        final_area += torch.bincount(flat[owned.flatten()], minlength=n)
        won[:, x0:x1] = torch.where(owned, owner + 1, 0).to(won.dtype)
        del best, owner, owned, flat
    mask_area, original_area, final_area = mask_area.tolist(), original_area.tolist(), final_area.tolist()

    # Accept, merge or drop each kept query in order; ids start at 1.
    segment_of = [0] * n
    seg_labels, seg_scores = [], []  # per segment: its label and score
    stuff_segment: dict[int, int] = {}
    for q, (label, score) in enumerate(zip(kept_labels.tolist(), kept_scores.tolist(), strict=True)):
        thing = bool(is_thing[label])
        if not (mask_area[q] > 0 and original_area[q] > 0 and final_area[q] > 0):
            continue
        if mask_area[q] / original_area[q] < overlap_threshold:
            continue
        if not thing and label in stuff_segment:
            sid = stuff_segment[label]
            seg_scores[sid - 1] = max(seg_scores[sid - 1], score)
        else:
            seg_labels.append(label)
            seg_scores.append(score)
            sid = len(seg_labels)
            if not thing:
                stuff_segment[label] = sid
        segment_of[q] = sid

    dtype = id_map_dtype(len(seg_labels))
    lookup = torch.tensor([0, *segment_of], dtype=dtype, device=device)  # won (0 or q+1) -> segment id
    id_map = remap(won, lookup)
    labels_out = torch.tensor(seg_labels, dtype=torch.int64, device=device)
    scores_out = torch.tensor(seg_scores, dtype=torch.float32, device=device)
    return Segments(labels=labels_out, scores=scores_out, size=geom.output_size, id_map=id_map, is_panoptic=True)


def _instance_one(
    mask_cls: Tensor,
    mask_logits: Tensor,
    geom: Geometry,
    top_k: int,
    is_thing: Tensor | None,
    chunk_size: int | None,
    band_width: int | None,
    keep_mask: Callable[[Tensor], Any] | None,
) -> Segments:
    """mask_cls (Q, K+1), mask_logits (Q, h, w) -> top-k (query, class) pairs as scored masks.

    Each distinct selected query's mask is made once, a chunk of queries at a time and a band of columns at
    a time into it, and handed to `keep_mask` (None: kept as it is) before the next chunk is made.
    """
    device = mask_cls.device
    class_probs = mask_cls.float().softmax(-1)[:, :-1]  # (Q, K)
    k = class_probs.shape[1]
    flat = class_probs.flatten()  # (Q*K,), index q*K + c
    picked = torch.sort(flat, descending=True, stable=True).indices[:top_k]  # ties -> lower flat index
    class_scores, labels, queries = flat[picked], picked % k, picked // k
    if is_thing is not None:
        things = is_thing[labels]
        class_scores, labels, queries = class_scores[things], labels[things], queries[things]
    if queries.numel() == 0:
        return empty(geom.output_size, device, panoptic=False)

    # Resize each distinct selected query once.
    distinct, which = torch.unique(queries, return_inverse=True)
    h, w = geom.output_size
    d = distinct.numel()
    bands = column_bands(geom.output_size, band_width)
    step = tile_chunk(geom, bands, chunk_size)
    kept: Tensor | list[Any] = torch.empty(d, h, w, dtype=torch.bool, device=device) if keep_mask is None else []
    mask_scores = torch.empty(d, dtype=torch.float32, device=device)
    logits_all = mask_logits.float()
    for start in range(0, d, step):
        chunk = distinct[start : start + step]
        c = chunk.numel()
        masks = kept[start : start + c] if keep_mask is None else torch.empty(c, h, w, dtype=torch.bool, device=device)
        inside = torch.zeros(c, dtype=torch.float32, device=device)
        area = torch.zeros(c, dtype=torch.float32, device=device)
        for b, _, logits in query_tiles(logits_all, chunk, geom, c, bands):
            binary = (logits > 0).float().flatten(1)  # (c, H*band)
            inside += (logits.sigmoid().flatten(1) * binary).sum(1)
            area += binary.sum(1)
            x0, x1 = bands[b]
            masks[:, :, x0:x1] = logits > 0
            del binary, logits
        mask_scores[start : start + c] = inside / (area + 1e-6)
        if keep_mask is not None:
            kept.extend(keep_mask(mask) for mask in masks)
        del masks

    scores = class_scores * mask_scores[which]
    order = torch.sort(scores, descending=True, stable=True).indices  # ties -> selection order
    which = which[order]
    return Segments(labels=labels[order], scores=scores[order], size=geom.output_size, parts=kept, which=which)


def semantic_inference(
    class_logits: Tensor,
    mask_logits: Tensor,
    *,
    image_sizes: Sequence[Size],
    output_sizes: Sequence[Size],
    padded_size: Size | None = None,
    chunk_size: int | None = None,
    resize_first: bool = False,
) -> list[Segments]:
    """class_logits (B, Q, K+1), mask_logits (B, Q, h, w) -> per image, one segment per predicted class.

    semseg (K, H, W) = sum_q softmax(class)[q, :K] * sigmoid(mask[q]); each pixel takes its argmax class
    (ties -> lowest index). Masks partition the image, labels ascend, and a score is the segment's mean
    per-pixel class probability semseg[k] / sum_k' semseg[k'].

    The two orders of the official `MaskFormer.forward` (Mask2Former's `mask2former/maskformer_model.py`):
    by default, as its semantic-only models do, semseg is computed on the mask logits upsampled to the padded
    input, then cropped to `image_size` and resized bilinearly to `output_size` (detectron2's
    `sem_seg_postprocess`), a chunk of classes at a time; with `resize_first`, as its panoptic and instance
    models do (`sem_seg_postprocess_before_inference`), the mask logits are resized to `output_size` first.
    """
    geoms = geometries(class_logits, mask_logits, image_sizes, output_sizes, padded_size, chunk_size)
    return [_semantic_one(class_logits[i], mask_logits[i], g, chunk_size, resize_first) for i, g in enumerate(geoms)]


def panoptic_inference(
    class_logits: Tensor,
    mask_logits: Tensor,
    *,
    image_sizes: Sequence[Size],
    output_sizes: Sequence[Size],
    is_thing: Sequence[bool],
    padded_size: Size | None = None,
    object_mask_threshold: float = 0.8,
    overlap_threshold: float = 0.8,
    chunk_size: int | None = None,
    band_width: int | None = None,
) -> list[Segments]:
    """class_logits (B, Q, K+1), mask_logits (B, Q, h, w) -> per image, non-overlapping segments + id map.

    Queries whose best class is an object with probability > object_mask_threshold compete for pixels by
    score * sigmoid(mask); a query keeps its won pixels inside its own mask (sigmoid >= 0.5) unless it won
    less than overlap_threshold of that mask. Stuff queries of one class merge into one segment.

    `chunk_size` queries, `band_width` columns of the output at a time (None: model.resize's budgets): no change.
    """
    geoms = geometries(class_logits, mask_logits, image_sizes, output_sizes, padded_size, chunk_size)
    things = _is_thing_tensor(is_thing, class_logits.shape[-1] - 1, class_logits.device)
    return [
        _panoptic_one(
            class_logits[i], mask_logits[i], g, things, object_mask_threshold, overlap_threshold, chunk_size, band_width
        )
        for i, g in enumerate(geoms)
    ]


def instance_inference(
    class_logits: Tensor,
    mask_logits: Tensor,
    *,
    image_sizes: Sequence[Size],
    output_sizes: Sequence[Size],
    padded_size: Size | None = None,
    top_k: int = 100,
    is_thing: Sequence[bool] | None = None,
    chunk_size: int | None = None,
    band_width: int | None = None,
    keep_mask: Callable[[Tensor], Any] | None = None,
) -> list[Segments]:
    """class_logits (B, Q, K+1), mask_logits (B, Q, h, w) -> per image, scored (possibly overlapping) masks.

    The top_k (query, class) pairs by class probability become instances with mask = logit > 0 and
    score = class probability * mean sigmoid inside the mask, sorted by score. With `is_thing` (a panoptic
    model) pairs of stuff classes are dropped after the top-k, as in the official code.

    `keep_mask`, given each distinct selected query's (H, W) bool mask as it is made, returns what the result
    keeps of it (`Segments.parts`; the compact form packs it); None keeps the masks. `chunk_size` and
    `band_width` as for `panoptic_inference`; a mask score sums its bands' sums, so with several bands it
    may differ from the whole image's sum in the last bits.
    """
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    geoms = geometries(class_logits, mask_logits, image_sizes, output_sizes, padded_size, chunk_size)
    things = None if is_thing is None else _is_thing_tensor(is_thing, class_logits.shape[-1] - 1, class_logits.device)
    return [
        _instance_one(class_logits[i], mask_logits[i], g, top_k, things, chunk_size, band_width, keep_mask)
        for i, g in enumerate(geoms)
    ]


_OVERRIDES = {
    "semantic": {"chunk_size", "resize_first"},
    "instance": {"top_k", "is_thing", "chunk_size", "band_width", "keep_mask"},
    "panoptic": {"object_mask_threshold", "overlap_threshold", "is_thing", "chunk_size", "band_width"},
}


def postprocess(
    task: str,
    class_logits: Tensor,
    mask_logits: Tensor,
    *,
    config: ModelConfig,
    image_sizes: Sequence[Size],
    output_sizes: Sequence[Size],
    padded_size: Size | None = None,
    **overrides: Any,
) -> list[Segments]:
    """Run `task`'s inference with the thresholds of `config.postprocess`; `overrides` replace them.

    Instance output of a panoptic model keeps thing classes only when `instance_things_only` is set, as the
    official code does when panoptic inference is on. Semantic output of a panoptic or instance model resizes
    the mask logits before inference, of a semantic model the class scores after it (the official orders).
    """
    if task not in _OVERRIDES:
        raise ValueError(f"task must be one of {sorted(_OVERRIDES)}, got {task!r}")
    unknown = set(overrides) - _OVERRIDES[task]
    if unknown:
        raise ValueError(f"unknown {task} options {sorted(unknown)}; allowed: {sorted(_OVERRIDES[task])}")
    if class_logits.ndim == 3 and class_logits.shape[-1] != config.num_classes + 1:
        expected = config.num_classes + 1
        raise ValueError(f"class_logits has {class_logits.shape[-1]} entries, {config.name!r} expects {expected}")
    pp = config.postprocess
    sizes: dict[str, Any] = {"image_sizes": image_sizes, "output_sizes": output_sizes, "padded_size": padded_size}
    if task == "semantic":
        options = {"resize_first": config.task in ("panoptic", "instance")}
        return semantic_inference(class_logits, mask_logits, **sizes, **{**options, **overrides})
    if task == "instance":
        things_only = pp.instance_things_only and config.task == "panoptic"
        options: dict[str, Any] = {"top_k": pp.instance_top_k, "is_thing": config.is_thing if things_only else None}
        return instance_inference(class_logits, mask_logits, **sizes, **{**options, **overrides})
    options = {
        "is_thing": config.is_thing,
        "object_mask_threshold": pp.object_mask_threshold,
        "overlap_threshold": pp.overlap_threshold,
    }
    return panoptic_inference(class_logits, mask_logits, **sizes, **{**options, **overrides})
