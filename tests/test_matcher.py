"""HungarianMatcher against a brute-force assignment, and point_sample against explicit bilinear reads."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from m2f.model.matcher import HungarianMatcher, pairwise_bce, pairwise_dice
from m2f.model.point_sampling import point_sample


def bilinear_reference(image: torch.Tensor, x: float, y: float) -> float:
    """Value of a (H, W) map at normalised (x, y): pixel centres at (i + 0.5) / size, zeros outside."""
    h, w = image.shape
    px, py = x * w - 0.5, y * h - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    total = 0.0
    for yy, xx in itertools.product((y0, y0 + 1), (x0, x0 + 1)):
        weight = (1 - abs(px - xx)) * (1 - abs(py - yy))
        if 0 <= yy < h and 0 <= xx < w:
            total += weight * float(image[yy, xx])
    return total


def test_point_sample_matches_bilinear_reference() -> None:
    g = torch.Generator().manual_seed(0)
    image = torch.randn(2, 3, 5, 7, generator=g, dtype=torch.float64)
    coords = torch.rand(2, 11, 2, generator=g, dtype=torch.float64)
    coords[0, 0] = torch.tensor([0.0, 1.0], dtype=torch.float64)  # corners read half/quarter padding
    out = point_sample(image, coords)
    assert out.shape == (2, 3, 11)
    for n, c, p in itertools.product(range(2), range(3), range(11)):
        x, y = coords[n, p].tolist()
        assert out[n, c, p].item() == pytest.approx(bilinear_reference(image[n, c], x, y), abs=1e-9)


def test_point_sample_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="coords"):
        point_sample(torch.zeros(2, 1, 4, 4), torch.zeros(3, 5, 2))


def reference_cost(
    class_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    labels: torch.Tensor,
    masks: torch.Tensor,
    coords: torch.Tensor,
    weights: tuple[float, float, float] = (2.0, 5.0, 5.0),
) -> torch.Tensor:
    """(Q, N) cost from explicit per-pair formulas, in float64."""
    probs = class_logits.double().softmax(-1)
    q, n = mask_logits.shape[0], masks.shape[0]
    pred = point_sample(mask_logits[:, None].double(), coords.double().expand(q, -1, -1))[:, 0]  # (Q, P)
    tgt = point_sample(masks[:, None].double(), coords.double().expand(n, -1, -1))[:, 0]  # (N, P)
    cost = torch.zeros(q, n, dtype=torch.float64)
    for i, j in itertools.product(range(q), range(n)):
        s, t = pred[i].sigmoid(), tgt[j]
        bce = -(t * torch.log(s) + (1 - t) * torch.log(1 - s)).mean()
        dice = 1 - (2 * (s * t).sum() + 1) / (s.sum() + t.sum() + 1)
        cost[i, j] = -weights[0] * probs[i, labels[j]] + weights[1] * bce + weights[2] * dice
    return cost


def brute_force(cost: torch.Tensor) -> tuple[list[int], list[int]]:
    """Cheapest injective assignment of the N targets to Q >= N queries, sorted by query."""
    q, n = cost.shape
    best = min(itertools.permutations(range(q), n), key=lambda perm: sum(cost[perm[j], j].item() for j in range(n)))
    pairs = sorted((qi, j) for j, qi in enumerate(best))
    return [p for p, _ in pairs], [t for _, t in pairs]


def random_case(g: torch.Generator, q: int, k: int, ns: list[int], h: int = 6, w: int = 8, scale: int = 4):
    b = len(ns)
    class_logits = 2 * torch.randn(b, q, k + 1, generator=g)
    mask_logits = 3 * torch.randn(b, q, h, w, generator=g)
    targets = [
        {
            "labels": torch.randint(0, k, (n,), generator=g),
            "masks": torch.rand(n, h * scale, w * scale, generator=g) > 0.6,
        }
        for n in ns
    ]
    return class_logits, mask_logits, targets


def test_cost_matrix_matches_reference() -> None:
    g = torch.Generator().manual_seed(1)
    class_logits, mask_logits, targets = random_case(g, q=5, k=4, ns=[3])
    coords = torch.rand(1, 50, 2, generator=g)
    matcher = HungarianMatcher(cost_class=1.5, cost_mask=3.0, cost_dice=4.0)
    labels, masks = targets[0]["labels"], targets[0]["masks"]
    got = matcher.cost_matrix(class_logits[0], mask_logits[0], labels, masks, coords)
    want = reference_cost(class_logits[0], mask_logits[0], labels, masks, coords, (1.5, 3.0, 4.0))
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_pairwise_costs_accept_soft_targets() -> None:
    # Bilinear reads of a binary mask are fractional at edges: BCE stays the exact soft-label BCE.
    g = torch.Generator().manual_seed(2)
    logits, targets = torch.randn(4, 30, generator=g), torch.rand(3, 30, generator=g)
    want = torch.stack(
        [torch.stack([torch.nn.functional.binary_cross_entropy_with_logits(x, t) for t in targets]) for x in logits]
    )
    torch.testing.assert_close(pairwise_bce(logits, targets), want)
    assert pairwise_dice(logits, targets).shape == (4, 3)


@pytest.mark.parametrize("seed", range(6))
def test_matcher_equals_brute_force(seed: int) -> None:
    g = torch.Generator().manual_seed(100 + seed)
    q = 3 + seed % 3  # 3..5
    ns = [int(torch.randint(1, q + 1, (1,), generator=g)), 0, int(torch.randint(0, q + 1, (1,), generator=g))]
    class_logits, mask_logits, targets = random_case(g, q=q, k=3, ns=ns)
    num_points = 64
    indices = HungarianMatcher(num_points=num_points)(
        class_logits, mask_logits, targets, generator=torch.Generator().manual_seed(seed)
    )

    # The matcher draws one (1, P, 2) set per image that has targets, in batch order.
    replay = torch.Generator().manual_seed(seed)
    assert len(indices) == len(targets)
    for b, (t, (pred_idx, tgt_idx)) in enumerate(zip(targets, indices, strict=True)):
        assert pred_idx.dtype == tgt_idx.dtype == torch.int64
        if len(t["labels"]) == 0:
            assert pred_idx.numel() == tgt_idx.numel() == 0
            continue
        coords = torch.rand(1, num_points, 2, generator=replay)
        cost = reference_cost(class_logits[b], mask_logits[b], t["labels"], t["masks"], coords)
        want_pred, want_tgt = brute_force(cost)
        assert pred_idx.tolist() == want_pred
        assert tgt_idx.tolist() == want_tgt


def test_matcher_is_reproducible_with_a_generator() -> None:
    g = torch.Generator().manual_seed(3)
    class_logits, mask_logits, targets = random_case(g, q=6, k=3, ns=[4, 2])
    matcher = HungarianMatcher(num_points=16)
    runs = [matcher(class_logits, mask_logits, targets, generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    for (p1, t1), (p2, t2) in zip(*runs, strict=True):
        assert torch.equal(p1, p2) and torch.equal(t1, t2)


def test_all_images_without_targets() -> None:
    g = torch.Generator().manual_seed(4)
    class_logits, mask_logits, targets = random_case(g, q=4, k=2, ns=[0, 0])
    indices = HungarianMatcher()(class_logits, mask_logits, targets)
    assert [(p.numel(), t.numel()) for p, t in indices] == [(0, 0), (0, 0)]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_cost_raises_naming_the_image(bad: float) -> None:
    g = torch.Generator().manual_seed(5)
    class_logits, mask_logits, targets = random_case(g, q=4, k=2, ns=[2, 2])
    class_logits[1, 2, 0] = bad
    with pytest.raises(ValueError, match="image 1"):
        HungarianMatcher(num_points=16)(class_logits, mask_logits, targets)
    class_logits[1, 2, 0] = 0.0
    mask_logits[0] = bad
    with pytest.raises(ValueError, match="image 0"):
        HungarianMatcher(num_points=16)(class_logits, mask_logits, targets)


def test_bad_input_raises() -> None:
    g = torch.Generator().manual_seed(6)
    class_logits, mask_logits, targets = random_case(g, q=4, k=2, ns=[2, 1])
    matcher = HungarianMatcher(num_points=16)
    with pytest.raises(ValueError, match="targets for a batch"):
        matcher(class_logits, mask_logits, targets[:1])
    with pytest.raises(ValueError, match=r"labels must be in \[0, 2\)"):
        matcher(class_logits, mask_logits, [targets[0], {**targets[1], "labels": torch.tensor([2])}])
    with pytest.raises(ValueError, match="masks"):
        matcher(class_logits, mask_logits, [targets[0], {**targets[1], "masks": targets[0]["masks"]}])
    with pytest.raises(ValueError, match="not all zero"):
        HungarianMatcher(cost_class=0, cost_mask=0, cost_dice=0)


def test_matches_hugging_face_matcher() -> None:
    hf = pytest.importorskip("transformers.models.mask2former.modeling_mask2former")
    g = torch.Generator().manual_seed(8)
    class_logits, mask_logits, targets = random_case(g, q=8, k=5, ns=[5, 3, 6])
    num_points = 200
    ours = HungarianMatcher(num_points=num_points)(
        class_logits, mask_logits, targets, generator=torch.Generator().manual_seed(9)
    )
    # HF draws torch.rand(1, P, 2) per image from the global generator: the same stream as ours.
    torch.manual_seed(9)
    theirs = hf.Mask2FormerHungarianMatcher(cost_class=2.0, cost_mask=5.0, cost_dice=5.0, num_points=num_points)(
        mask_logits, class_logits, [t["masks"].float() for t in targets], [t["labels"] for t in targets]
    )
    for (p1, t1), (p2, t2) in zip(ours, theirs, strict=True):
        assert p1.tolist() == p2.tolist() and t1.tolist() == t2.tolist()
