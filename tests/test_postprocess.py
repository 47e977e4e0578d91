"""Post-processing against slow loop references, hand-built cases, and the resize/batch/chunk invariances."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from m2f.model.config import ModelConfig, PostprocessConfig, ResNetConfig
from m2f.model.postprocess import (
    Segments,
    instance_inference,
    panoptic_inference,
    postprocess,
    semantic_inference,
    upsample_mask_logits,
)
from m2f.model.resize import downsample

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


# ---------------------------------------------------------------------------------------------------------------
# Slow references: one image, mask logits already at output size, Python loops over queries and pixels.


def first_max(values: list[float]) -> int:
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def ref_semseg(mask_cls: torch.Tensor, mask_pred: torch.Tensor) -> torch.Tensor:
    """(K, H, W) class scores: sum over queries of class probability times mask probability."""
    probs = mask_cls.softmax(-1)[:, :-1].tolist()  # (Q, K)
    sig = mask_pred.sigmoid().tolist()  # (Q, H, W)
    q_n, k_n = len(probs), len(probs[0])
    h, w = mask_pred.shape[1:]
    sem = [
        [[sum(probs[q][k] * sig[q][i][j] for q in range(q_n)) for j in range(w)] for i in range(h)] for k in range(k_n)
    ]
    return torch.tensor(sem, dtype=torch.float32)


def ref_semantic_map(semseg: torch.Tensor) -> tuple[list[list[int]], dict[int, float]]:
    """(K, H, W) scores -> (label map, {class: mean per-pixel probability})."""
    sem = semseg.tolist()
    k_n, h, w = semseg.shape
    label_map = [[0] * w for _ in range(h)]
    sums: dict[int, float] = {}
    counts: dict[int, int] = {}
    for i in range(h):
        for j in range(w):
            column = [sem[k][i][j] for k in range(k_n)]
            k = first_max(column)
            label_map[i][j] = k
            sums[k] = sums.get(k, 0.0) + column[k] / sum(column)
            counts[k] = counts.get(k, 0) + 1
    return label_map, {k: sums[k] / counts[k] for k in sums}


def ref_semantic(mask_cls: torch.Tensor, mask_pred: torch.Tensor) -> tuple[list[list[int]], dict[int, float]]:
    """Mask logits already at output size -> (label map, {class: mean per-pixel probability})."""
    return ref_semantic_map(ref_semseg(mask_cls, mask_pred))


def ref_panoptic(
    mask_cls: torch.Tensor, mask_pred: torch.Tensor, is_thing: list[bool], object_threshold: float, overlap: float
) -> tuple[list[list[int]], list[int], list[float]]:
    """-> (id map, segment labels, segment scores), the official algorithm written out."""
    probs = mask_cls.softmax(-1)
    k_n = probs.shape[-1] - 1
    kept = []
    for q in range(probs.shape[0]):
        row = probs[q].tolist()
        label = first_max(row)
        if label != k_n and row[label] > object_threshold:
            kept.append((q, label, probs[q, label]))
    h, w = mask_pred.shape[1:]
    panoptic = [[0] * w for _ in range(h)]
    if not kept:
        return panoptic, [], []
    sig = [mask_pred[q].sigmoid() for q, _, _ in kept]
    weighted = [(score * s).tolist() for (_, _, score), s in zip(kept, sig, strict=True)]
    above = [(s >= 0.5).tolist() for s in sig]
    owner = [[first_max([m[i][j] for m in weighted]) for j in range(w)] for i in range(h)]

    labels: list[int] = []
    scores: list[float] = []
    stuff: dict[int, int] = {}
    for k, (_, label, score) in enumerate(kept):
        won = [(i, j) for i in range(h) for j in range(w) if owner[i][j] == k]
        original = sum(above[k][i][j] for i in range(h) for j in range(w))
        mask = [(i, j) for i, j in won if above[k][i][j]]
        if not (won and original > 0 and mask):
            continue
        if len(won) / original < overlap:
            continue
        if not is_thing[label] and label in stuff:
            sid = stuff[label]
            scores[sid - 1] = max(scores[sid - 1], score.item())
        else:
            labels.append(label)
            scores.append(score.item())
            sid = len(labels)
            if not is_thing[label]:
                stuff[label] = sid
        for i, j in mask:
            panoptic[i][j] = sid
    return panoptic, labels, scores


def ref_instance(
    mask_cls: torch.Tensor, mask_pred: torch.Tensor, top_k: int, is_thing: list[bool] | None
) -> tuple[list[torch.Tensor], list[int], list[float]]:
    """-> (masks, labels, scores) sorted by score, the official algorithm written out."""
    scores = mask_cls.softmax(-1)[:, :-1]
    k_n = scores.shape[1]
    flat = scores.flatten().tolist()
    picked = sorted(range(len(flat)), key=lambda i: -flat[i])[:top_k]  # stable: ties keep lower index
    out = []
    for i in picked:
        q, label = divmod(i, k_n)
        if is_thing is not None and not is_thing[label]:
            continue
        mask = mask_pred[q] > 0
        sig = mask_pred[q].sigmoid().tolist()
        inside = sum(
            v for row, mrow in zip(sig, mask.tolist(), strict=True) for v, m in zip(row, mrow, strict=True) if m
        )
        mask_score = inside / (int(mask.sum()) + 1e-6)
        out.append((mask, label, flat[i] * mask_score))
    out.sort(key=lambda t: -t[2])  # stable: ties keep selection order
    return [m for m, _, _ in out], [lab for _, lab, _ in out], [s for _, _, s in out]


# ---------------------------------------------------------------------------------------------------------------
# Helpers


def identity(mask_logits: torch.Tensor) -> dict:
    """Sizes for which the resize chain is the identity, so the algorithms see the logits as given."""
    b, _, h, w = mask_logits.shape
    return {"image_sizes": [(h, w)] * b, "output_sizes": [(h, w)] * b, "padded_size": (h, w)}


def random_outputs(seed: int, b: int = 1, q: int = 7, k: int = 5, h: int = 9, w: int = 11, sharp: float = 4.0):
    g = torch.Generator().manual_seed(seed)
    class_logits = torch.randn(b, q, k + 1, generator=g) * sharp
    mask_logits = torch.randn(b, q, h, w, generator=g) * 3
    return class_logits, mask_logits


def check_semantic(seg: Segments, mask_cls: torch.Tensor, mask_pred: torch.Tensor) -> None:
    check_semantic_map(seg, ref_semantic(mask_cls.cpu(), mask_pred.cpu()))


def check_semantic_map(seg: Segments, reference: tuple[list[list[int]], dict[int, float]]) -> None:
    label_map, scores = reference
    label_map = torch.tensor(label_map)
    labels = sorted(scores)
    assert seg.labels.tolist() == labels
    for mask, label in zip(seg.masks.cpu(), labels, strict=True):
        assert torch.equal(mask, label_map == label)
    assert_close(seg.scores.cpu(), torch.tensor([scores[k] for k in labels]))
    assert seg.panoptic is None


def check_panoptic(seg: Segments, mask_cls, mask_pred, is_thing, object_threshold=0.8, overlap=0.8) -> None:
    panoptic, labels, scores = ref_panoptic(mask_cls.cpu(), mask_pred.cpu(), is_thing, object_threshold, overlap)
    assert torch.equal(seg.panoptic.cpu(), torch.tensor(panoptic, dtype=torch.int32))
    assert seg.labels.tolist() == labels
    assert_close(seg.scores.cpu(), torch.tensor(scores, dtype=torch.float32))
    check_panoptic_layout(seg)


def check_panoptic_layout(seg: Segments) -> None:
    """Masks never overlap and are exactly the id map's segments."""
    assert seg.panoptic.dtype == torch.int32
    n = seg.masks.shape[0]
    if n:
        assert seg.masks.sum(0).max() <= 1
    for i in range(n):
        assert torch.equal(seg.masks[i], seg.panoptic == i + 1)
    assert int(seg.panoptic.max()) <= n and int(seg.panoptic.min()) >= 0


def check_instance(seg: Segments, mask_cls, mask_pred, top_k, is_thing=None) -> None:
    masks, labels, scores = ref_instance(mask_cls.cpu(), mask_pred.cpu(), top_k, is_thing)
    assert seg.labels.tolist() == labels
    assert len(seg.masks) == len(masks)
    for got, want in zip(seg.masks.cpu(), masks, strict=True):
        assert torch.equal(got, want)
    assert_close(seg.scores.cpu(), torch.tensor(scores, dtype=torch.float32))


def assert_same(a: Segments, b: Segments) -> None:
    assert torch.equal(a.masks, b.masks)
    assert torch.equal(a.labels, b.labels)
    assert_close(a.scores, b.scores)
    assert (a.panoptic is None) == (b.panoptic is None)
    if a.panoptic is not None:
        assert torch.equal(a.panoptic, b.panoptic)


THINGS = [True, True, False, False, True]  # K = 5


# ---------------------------------------------------------------------------------------------------------------
# Per-image algorithms against the references


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_semantic_matches_reference(seed, device):
    class_logits, mask_logits = random_outputs(seed)
    (seg,) = semantic_inference(class_logits.to(device), mask_logits.to(device), **identity(mask_logits))
    check_semantic(seg, class_logits[0], mask_logits[0])
    assert seg.masks.dtype == torch.bool and seg.labels.dtype == torch.int64 and seg.scores.dtype == torch.float32
    assert torch.equal(seg.masks.sum(0), torch.ones(9, 11, dtype=torch.int64, device=device))  # a partition


def test_semantic_tie_goes_to_lowest_class():
    class_logits, mask_logits = random_outputs(3)
    class_logits[..., 1] += 5.0
    class_logits[..., 3] = class_logits[..., 1]  # classes 1 and 3 equal and dominant in every query
    (seg,) = semantic_inference(class_logits, mask_logits, **identity(mask_logits))
    check_semantic(seg, class_logits[0], mask_logits[0])
    assert 3 not in seg.labels.tolist() and 1 in seg.labels.tolist()


def test_semantic_without_any_class_probability_is_safe():
    class_logits, mask_logits = random_outputs(19)
    class_logits[..., -1] = 200.0  # softmax gives exactly 0 to every real class
    (seg,) = semantic_inference(class_logits, mask_logits, **identity(mask_logits))
    assert seg.labels.tolist() == [0] and seg.masks.all()
    assert seg.scores.tolist() == [0.0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize(("object_threshold", "overlap"), [(0.8, 0.8), (0.3, 0.5), (0.0, 0.0)])
def test_panoptic_matches_reference(seed, object_threshold, overlap, device):
    class_logits, mask_logits = random_outputs(seed)
    (seg,) = panoptic_inference(
        class_logits.to(device),
        mask_logits.to(device),
        **identity(mask_logits),
        is_thing=THINGS,
        object_mask_threshold=object_threshold,
        overlap_threshold=overlap,
    )
    check_panoptic(seg, class_logits[0], mask_logits[0], THINGS, object_threshold, overlap)


@pytest.mark.parametrize("chunk_size", [None, 1, 2])
def test_panoptic_duplicate_query_loses_ties(chunk_size):
    class_logits, mask_logits = random_outputs(4, sharp=8.0)
    class_logits[0, 5] = class_logits[0, 2]
    mask_logits[0, 5] = mask_logits[0, 2]
    sizes = identity(mask_logits)
    (seg,) = panoptic_inference(
        class_logits,
        mask_logits,
        **sizes,
        is_thing=[True] * 5,
        object_mask_threshold=0.3,
        overlap_threshold=0.3,
        chunk_size=chunk_size,
    )
    check_panoptic(seg, class_logits[0], mask_logits[0], [True] * 5, 0.3, 0.3)
    assert len(seg.labels) == 3


def test_panoptic_all_no_object_is_empty():
    class_logits, mask_logits = random_outputs(5)
    class_logits[..., -1] = 50.0
    (seg,) = panoptic_inference(class_logits, mask_logits, **identity(mask_logits), is_thing=THINGS)
    assert seg.masks.shape == (0, 9, 11) and seg.labels.numel() == 0 and seg.scores.numel() == 0
    assert torch.equal(seg.panoptic, torch.zeros(9, 11, dtype=torch.int32))


def test_panoptic_no_pixel_above_half_is_empty():
    class_logits, mask_logits = random_outputs(6)
    class_logits[..., 0] = 50.0  # every query confidently class 0 ...
    mask_logits = -mask_logits.abs() - 0.1  # ... with no pixel of its mask
    (seg,) = panoptic_inference(class_logits, mask_logits, **identity(mask_logits), is_thing=THINGS)
    assert seg.masks.shape == (0, 9, 11)
    assert torch.equal(seg.panoptic, torch.zeros(9, 11, dtype=torch.int32))


def two_halves(first_label: int, second_label: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Query 0 owns the left half, query 1 the right half, query 2 is no-object; K = 2."""
    class_logits = torch.zeros(1, 3, 3)
    class_logits[0, 0, first_label] = 10.0
    class_logits[0, 1, second_label] = 9.0  # a lower score than query 0
    class_logits[0, 2, 2] = 10.0
    mask_logits = torch.full((1, 3, 4, 4), -10.0)
    mask_logits[0, 0, :, :2] = 10.0
    mask_logits[0, 1, :, 2:] = 10.0
    return class_logits, mask_logits


def test_panoptic_merges_stuff_of_one_class():
    class_logits, mask_logits = two_halves(1, 1)
    stuff = [True, False]
    (seg,) = panoptic_inference(class_logits, mask_logits, **identity(mask_logits), is_thing=stuff)
    check_panoptic(seg, class_logits[0], mask_logits[0], stuff)
    assert seg.labels.tolist() == [1]
    assert torch.equal(seg.panoptic, torch.ones(4, 4, dtype=torch.int32))
    assert_close(seg.scores, class_logits[0, 0].softmax(-1)[1:2])  # the higher of the two query scores

    (seg,) = panoptic_inference(class_logits, mask_logits, **identity(mask_logits), is_thing=[True, True])
    assert seg.labels.tolist() == [1, 1]  # things stay apart
    assert seg.panoptic[:, :2].eq(1).all() and seg.panoptic[:, 2:].eq(2).all()


def test_panoptic_overlap_threshold_drops_a_mostly_covered_query():
    class_logits = torch.zeros(1, 2, 2)
    class_logits[0, :, 0] = 10.0  # both queries class 0, equal scores
    mask_logits = torch.full((1, 2, 4, 4), -10.0)
    mask_logits[0, 0, :, 1:] = 3.0  # query 0: columns 1-3
    mask_logits[0, 1, :, 0] = 9.0  # query 1: columns 0-1, but loses column 1 to query 0
    mask_logits[0, 1, :, 1] = 1.0
    sizes = identity(mask_logits)

    (seg,) = panoptic_inference(class_logits, mask_logits, **sizes, is_thing=[True])
    check_panoptic(seg, class_logits[0], mask_logits[0], [True])
    expected = torch.zeros(4, 4, dtype=torch.int32)
    expected[:, 1:] = 1  # query 1 won 4 of its 8 pixels: 0.5 < 0.8, dropped; column 0 stays void
    assert torch.equal(seg.panoptic, expected)

    (seg,) = panoptic_inference(class_logits, mask_logits, **sizes, is_thing=[True], overlap_threshold=0.4)
    check_panoptic(seg, class_logits[0], mask_logits[0], [True], overlap=0.4)
    expected[:, 0] = 2
    assert torch.equal(seg.panoptic, expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("top_k", [1, 10, 100])
@pytest.mark.parametrize("things", [None, THINGS])
def test_instance_matches_reference(seed, top_k, things, device):
    class_logits, mask_logits = random_outputs(seed)
    (seg,) = instance_inference(
        class_logits.to(device), mask_logits.to(device), **identity(mask_logits), top_k=top_k, is_thing=things
    )
    check_instance(seg, class_logits[0], mask_logits[0], top_k, things)
    if things is None:
        assert len(seg.labels) == min(top_k, 7 * 5)
    else:
        assert all(THINGS[label] for label in seg.labels.tolist())
    assert torch.all(seg.scores[:-1] >= seg.scores[1:])


def test_instance_ties_keep_selection_order():
    class_logits, mask_logits = random_outputs(7)
    class_logits[0, 4] = class_logits[0, 1]  # a duplicate query: equal class and mask scores
    mask_logits[0, 4] = mask_logits[0, 1]
    class_logits[0, :, 2] = class_logits[0, :, 3]  # two equal classes in every query
    (seg,) = instance_inference(class_logits, mask_logits, **identity(mask_logits), top_k=20)
    check_instance(seg, class_logits[0], mask_logits[0], 20)


def test_instance_keeps_empty_masks():
    class_logits, mask_logits = random_outputs(8)
    mask_logits = -mask_logits.abs() - 0.1
    (seg,) = instance_inference(class_logits, mask_logits, **identity(mask_logits), top_k=5)
    check_instance(seg, class_logits[0], mask_logits[0], 5)
    assert len(seg.labels) == 5 and not seg.masks.any() and torch.all(seg.scores == 0)


def test_instance_things_only_can_leave_nothing():
    class_logits, mask_logits = random_outputs(9)
    class_logits[..., 2] = 50.0  # every query's best class is stuff class 2
    (seg,) = instance_inference(class_logits, mask_logits, **identity(mask_logits), top_k=3, is_thing=THINGS)
    assert seg.masks.shape == (0, 9, 11) and seg.labels.numel() == 0


# ---------------------------------------------------------------------------------------------------------------
# Resize chain, batching and chunking

GEOMETRY = {"image_sizes": [(21, 27)], "output_sizes": [(17, 23)], "padded_size": (24, 32)}


def direct_resize(mask_logits: torch.Tensor, image_size, output_size, padded_size) -> torch.Tensor:
    """All queries at once, spelled out: (Q, h, w) -> (Q, H, W)."""
    x = F.interpolate(mask_logits[None], size=padded_size, mode="bilinear", align_corners=False)
    x = x[:, :, : image_size[0], : image_size[1]]
    return F.interpolate(x, size=output_size, mode="bilinear", align_corners=False)[0]


def test_upsample_matches_direct_resize():
    _, mask_logits = random_outputs(10, h=6, w=8)
    got = upsample_mask_logits(mask_logits[0], image_size=(21, 27), output_size=(40, 50), padded_size=(24, 32))
    assert got.shape == (7, 40, 50)
    assert torch.equal(got, direct_resize(mask_logits[0], (21, 27), (40, 50), (24, 32)))


def ref_semantic_resized_after(mask_cls, mask_logits, image_size, output_size, padded_size):
    """The official semantic-only order, spelled out: mask logits to the padded input, class scores there,
    then the whole (K, Hp, Wp) map cropped and resized (detectron2's sem_seg_postprocess)."""
    padded = F.interpolate(mask_logits[None], size=padded_size, mode="bilinear", align_corners=False)[0]
    semseg = ref_semseg(mask_cls, padded)[:, : image_size[0], : image_size[1]]  # (K, h, w)
    semseg = F.interpolate(semseg[None], size=output_size, mode="bilinear", align_corners=False)[0]  # (K, H, W)
    return ref_semantic_map(semseg)


@pytest.mark.parametrize("chunk_size", [None, 1, 2, 3])
@pytest.mark.parametrize("output_size", [(17, 23), (40, 50), (21, 27)])
def test_semantic_resizes_class_scores_after_inference_by_default(chunk_size, output_size):
    class_logits, mask_logits = random_outputs(20, h=6, w=8, sharp=6.0)
    sizes = {**GEOMETRY, "output_sizes": [output_size]}
    (seg,) = semantic_inference(class_logits, mask_logits, **sizes, chunk_size=chunk_size)
    check_semantic_map(
        seg, ref_semantic_resized_after(class_logits[0], mask_logits[0], (21, 27), output_size, (24, 32))
    )
    assert seg.masks.shape[1:] == output_size
    assert torch.equal(seg.masks.sum(0), torch.ones(output_size, dtype=torch.int64))  # a partition


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_semantic_resize_after_ties_across_class_chunks_go_to_lowest_class(chunk_size):
    class_logits, mask_logits = random_outputs(21, h=6, w=8)
    class_logits[..., 1] += 5.0
    class_logits[..., 3] = class_logits[..., 1]  # classes 1 and 3 tie everywhere; chunks of 2 split them
    (seg,) = semantic_inference(class_logits, mask_logits, **GEOMETRY, chunk_size=chunk_size)
    check_semantic_map(seg, ref_semantic_resized_after(class_logits[0], mask_logits[0], (21, 27), (17, 23), (24, 32)))
    assert 3 not in seg.labels.tolist() and 1 in seg.labels.tolist()


def test_semantic_orders_differ_and_resize_first_resizes_mask_logits():
    class_logits, mask_logits = random_outputs(11, h=6, w=8, sharp=6.0)
    resized = direct_resize(mask_logits[0], (21, 27), (17, 23), (24, 32))
    (first,) = semantic_inference(class_logits, mask_logits, **GEOMETRY, chunk_size=3, resize_first=True)
    check_semantic(first, class_logits[0], resized)
    (after,) = semantic_inference(class_logits, mask_logits, **GEOMETRY, chunk_size=3)
    assert not torch.allclose(first.scores, after.scores)  # the two orders are not the same computation


def test_semantic_resize_after_never_holds_all_classes_at_output_size(monkeypatch):
    class_logits, mask_logits = random_outputs(22, h=6, w=8, k=9)
    shapes = []
    interpolate = F.interpolate

    def spy(x, *args, **kwargs):
        out = interpolate(x, *args, **kwargs)
        shapes.append(tuple(out.shape))
        return out

    monkeypatch.setattr(F, "interpolate", spy)
    sizes = {**GEOMETRY, "output_sizes": [(40, 50)]}
    (seg,) = semantic_inference(class_logits, mask_logits, **sizes, chunk_size=2)
    at_output = [s for s in shapes if s[-2:] == (40, 50)]
    assert at_output and max(s[1] for s in at_output) <= 2  # class chunks of 2, never (K, H, W)
    monkeypatch.undo()
    check_semantic_map(seg, ref_semantic_resized_after(class_logits[0], mask_logits[0], (21, 27), (40, 50), (24, 32)))


def test_resize_chain_feeds_the_algorithms():
    class_logits, mask_logits = random_outputs(11, h=6, w=8, sharp=6.0)
    resized = direct_resize(mask_logits[0], (21, 27), (17, 23), (24, 32))
    (seg,) = semantic_inference(class_logits, mask_logits, **GEOMETRY, chunk_size=3, resize_first=True)
    check_semantic(seg, class_logits[0], resized)
    (seg,) = panoptic_inference(
        class_logits,
        mask_logits,
        **GEOMETRY,
        is_thing=THINGS,
        object_mask_threshold=0.5,
        overlap_threshold=0.5,
        chunk_size=2,
    )
    check_panoptic(seg, class_logits[0], resized, THINGS, 0.5, 0.5)
    assert seg.labels.numel() > 0
    (seg,) = instance_inference(class_logits, mask_logits, **GEOMETRY, top_k=8, chunk_size=3)
    check_instance(seg, class_logits[0], resized, 8)


def test_default_padded_size_is_four_times_the_masks():
    class_logits, mask_logits = random_outputs(12, h=6, w=8)
    sizes = {"image_sizes": [(21, 27)], "output_sizes": [(30, 41)]}
    (a,) = semantic_inference(class_logits, mask_logits, **sizes)
    (b,) = semantic_inference(class_logits, mask_logits, **sizes, padded_size=(24, 32))
    assert_same(a, b)
    assert a.masks.shape[1:] == (30, 41)


def run_all(class_logits, mask_logits, sizes, chunk_size=None) -> list[list[Segments]]:
    return [
        semantic_inference(class_logits, mask_logits, **sizes, chunk_size=chunk_size),
        instance_inference(class_logits, mask_logits, **sizes, top_k=12, is_thing=THINGS, chunk_size=chunk_size),
        panoptic_inference(
            class_logits,
            mask_logits,
            **sizes,
            is_thing=THINGS,
            object_mask_threshold=0.4,
            overlap_threshold=0.3,
            chunk_size=chunk_size,
        ),
    ]


@pytest.mark.parametrize("device", DEVICES)
def test_batch_equals_single_images(device):
    class_logits, mask_logits = random_outputs(13, b=2, h=8, w=8, sharp=6.0)
    class_logits, mask_logits = class_logits.to(device), mask_logits.to(device)
    image_sizes, output_sizes = [(32, 20), (25, 32)], [(45, 30), (19, 26)]
    batched = run_all(class_logits, mask_logits, {"image_sizes": image_sizes, "output_sizes": output_sizes})
    for i in range(2):
        single = run_all(
            class_logits[i : i + 1],
            mask_logits[i : i + 1],
            {"image_sizes": [image_sizes[i]], "output_sizes": [output_sizes[i]]},
        )
        assert len(batched[2][i].labels) > 0  # the panoptic case is not vacuous
        for task_batched, (task_single,) in zip(batched, single, strict=True):
            assert_same(task_batched[i], task_single)
            assert task_single.masks.shape[1:] == output_sizes[i]
            assert task_single.masks.device.type == device


@pytest.mark.parametrize("chunk_size", [1, 3, 5])
def test_chunking_changes_nothing(chunk_size):
    class_logits, mask_logits = random_outputs(14, b=2, h=6, w=8, sharp=6.0)
    sizes = {"image_sizes": [(21, 27), (24, 19)], "output_sizes": [(33, 40), (20, 16)], "padded_size": (24, 32)}
    whole = run_all(class_logits, mask_logits, sizes, chunk_size=1000)
    chunked = run_all(class_logits, mask_logits, sizes, chunk_size=chunk_size)
    for task_whole, task_chunked in zip(whole, chunked, strict=True):
        for a, b in zip(task_whole, task_chunked, strict=True):
            assert_same(a, b)
    assert all(len(s.labels) for s in whole[2])  # the panoptic case is not vacuous


def test_half_precision_outputs_are_accepted():
    class_logits, mask_logits = random_outputs(15)
    half = run_all(class_logits.half(), mask_logits.half(), identity(mask_logits))
    full = run_all(class_logits.half().float(), mask_logits.half().float(), identity(mask_logits))
    for a, b in zip(half, full, strict=True):
        assert_same(a[0], b[0])


# ---------------------------------------------------------------------------------------------------------------
# Dispatch and errors


def tiny_config(task: str = "panoptic", **post) -> ModelConfig:
    return ModelConfig(
        name="tiny",
        backbone=ResNetConfig(),
        num_classes=5,
        class_names=tuple("abcde"),
        is_thing=tuple(THINGS),
        task=task,
        postprocess=PostprocessConfig(**post),
    )


def test_postprocess_uses_the_config():
    class_logits, mask_logits = random_outputs(16, sharp=6.0)
    sizes = identity(mask_logits)
    config = tiny_config(object_mask_threshold=0.5, overlap_threshold=0.3, instance_top_k=7)

    (got,) = postprocess("panoptic", class_logits, mask_logits, config=config, **sizes)
    (want,) = panoptic_inference(
        class_logits, mask_logits, **sizes, is_thing=THINGS, object_mask_threshold=0.5, overlap_threshold=0.3
    )
    assert_same(got, want)
    assert len(got.labels) == 3

    (got,) = postprocess("instance", class_logits, mask_logits, config=config, **sizes)
    (want,) = instance_inference(class_logits, mask_logits, **sizes, top_k=7, is_thing=THINGS)
    assert_same(got, want)

    (got,) = postprocess("instance", class_logits, mask_logits, config=tiny_config("instance"), **sizes)
    (want,) = instance_inference(class_logits, mask_logits, **sizes, top_k=100)  # not a panoptic model
    assert_same(got, want)

    (got,) = postprocess("instance", class_logits, mask_logits, config=config, **sizes, top_k=3, is_thing=None)
    (want,) = instance_inference(class_logits, mask_logits, **sizes, top_k=3)
    assert_same(got, want)

    # semantic output: a panoptic or instance model resizes mask logits first, a semantic model after
    for task, resize_first in (("panoptic", True), ("instance", True), ("semantic", False)):
        (got,) = postprocess("semantic", class_logits, mask_logits, config=tiny_config(task), **GEOMETRY)
        (want,) = semantic_inference(class_logits, mask_logits, **GEOMETRY, resize_first=resize_first)
        assert_same(got, want)
    (got,) = postprocess("semantic", class_logits, mask_logits, config=config, **GEOMETRY, resize_first=False)
    (want,) = semantic_inference(class_logits, mask_logits, **GEOMETRY, chunk_size=2)
    assert_same(got, want)


def test_postprocess_rejects_bad_requests():
    class_logits, mask_logits = random_outputs(17)
    sizes = identity(mask_logits)
    config = tiny_config()
    with pytest.raises(ValueError, match="'depth'"):
        postprocess("depth", class_logits, mask_logits, config=config, **sizes)
    with pytest.raises(ValueError, match="top_k"):
        postprocess("semantic", class_logits, mask_logits, config=config, **sizes, top_k=3)
    with pytest.raises(ValueError, match="expects 6"):
        postprocess("semantic", class_logits[..., :4], mask_logits, config=config, **sizes)


def test_inference_rejects_bad_sizes():
    class_logits, mask_logits = random_outputs(18, b=2, h=6, w=8)
    with pytest.raises(ValueError, match="2 image sizes and 1 output"):
        semantic_inference(class_logits, mask_logits, image_sizes=[(24, 32)] * 2, output_sizes=[(24, 32)])
    with pytest.raises(ValueError, match=r"\(25, 32\)"):
        semantic_inference(class_logits, mask_logits, image_sizes=[(25, 32)] * 2, output_sizes=[(9, 9)] * 2)
    with pytest.raises(ValueError, match="3 entries for 5 classes"):
        panoptic_inference(class_logits, mask_logits, **identity(mask_logits), is_thing=[True] * 3)
    with pytest.raises(ValueError, match="top_k"):
        instance_inference(class_logits, mask_logits, **identity(mask_logits), top_k=0)
    with pytest.raises(ValueError, match="chunk_size"):
        semantic_inference(class_logits, mask_logits, **identity(mask_logits), chunk_size=0)
    with pytest.raises(ValueError, match=r"\(2, 7, 6, 8\)"):
        semantic_inference(class_logits[:, :6], mask_logits, **identity(mask_logits))


@pytest.mark.parametrize(
    ("shape", "size"),
    [
        ((1, 256, 128, 128), (16, 16)),  # the decoder's levels at 512 x 512: factors 8, 4, 2
        ((1, 8, 128, 128), (64, 64)),
        ((2, 3, 200, 304), (25, 38)),  # 800 x 1216
        ((1, 4, 90, 90), (30, 18)),  # odd factors (3, 5): one source sample each
        ((1, 4, 96, 96), (96, 48)),  # factor 1 on one axis
        ((1, 4, 10, 10), (3, 4)),  # not whole factors: interpolate itself
    ],
)
def test_downsample_equals_bilinear_interpolation(shape, size) -> None:
    x = torch.randn(shape, dtype=torch.float64)
    want = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    got = downsample(x, size)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
