"""Hungarian matching of predicted queries to target segments (one-to-one, per image).

The cost of pairing query q with target n is
    cost_class * -p_q(label_n) + cost_mask * BCE(mask_q, mask_n) + cost_dice * dice(mask_q, mask_n),
with both mask costs measured on the same uniformly sampled points for every query and target.
SciPy's `linear_sum_assignment` then picks the cheapest assignment; queries left over are "no object".
"""

from __future__ import annotations

from typing import TypedDict

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from m2f.model.point_sampling import point_sample, rand_points


class Target(TypedDict):
    labels: Tensor  # (N,) int64 in [0, K)
    masks: Tensor  # (N, H, W) bool or float, covering the same extent as the network input


Indices = list[tuple[Tensor, Tensor]]  # per image: (pred_idx (M,), tgt_idx (M,)) int64


def check_targets(targets: list[Target], batch_size: int, num_classes: int) -> None:
    """Raise ValueError unless `targets` holds one well-formed entry per image."""
    if len(targets) != batch_size:
        raise ValueError(f"got {len(targets)} targets for a batch of {batch_size} images")
    for i, t in enumerate(targets):
        if "labels" not in t or "masks" not in t:
            raise ValueError(f"target {i} must have 'labels' and 'masks', got keys {sorted(t)}")
        labels, masks = t["labels"], t["masks"]
        if labels.ndim != 1 or masks.ndim != 3 or masks.shape[0] != labels.shape[0]:
            raise ValueError(
                f"target {i}: labels must be (N,) and masks (N, H, W), got {tuple(labels.shape)} and "
                f"{tuple(masks.shape)}"
            )
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(f"target {i}: labels must be integers, got {labels.dtype}")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise ValueError(
                f"target {i}: labels must be in [0, {num_classes}), got {int(labels.min())}..{int(labels.max())}"
            )


def pairwise_bce(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean sigmoid BCE over points of every (prediction, target) pair.

    logits (Q, P), targets (N, P) in [0, 1] -> (Q, N).
    BCE(x, t) = t * softplus(-x) + (1 - t) * softplus(x), so the pairwise sum is two matmuls.
    """
    num_points = logits.shape[1]
    pos = F.softplus(-logits) @ targets.T  # (Q, N) cost where the target is on
    neg = F.softplus(logits) @ (1 - targets).T  # (Q, N) cost where the target is off
    return (pos + neg) / num_points


def pairwise_dice(logits: Tensor, targets: Tensor) -> Tensor:
    """Soft dice loss 1 - (2|p∩t| + 1) / (|p| + |t| + 1) of every pair; logits (Q, P), targets (N, P) -> (Q, N)."""
    probs = logits.sigmoid()
    inter = probs @ targets.T  # (Q, N)
    sizes = probs.sum(1)[:, None] + targets.sum(1)[None, :]  # (Q, N)
    return 1 - (2 * inter + 1) / (sizes + 1)


class HungarianMatcher:
    """Assigns each target segment one query, minimising the weighted class + mask + dice cost."""

    def __init__(
        self,
        cost_class: float = 2.0,
        cost_mask: float = 5.0,
        cost_dice: float = 5.0,
        num_points: int = 12544,  # 112 * 112, the official setting
    ) -> None:
        if min(cost_class, cost_mask, cost_dice) < 0 or cost_class == cost_mask == cost_dice == 0:
            raise ValueError(
                f"costs must be >= 0 and not all zero, got class={cost_class} mask={cost_mask} dice={cost_dice}"
            )
        if num_points < 1:
            raise ValueError(f"num_points must be >= 1, got {num_points}")
        self.cost_class, self.cost_mask, self.cost_dice = cost_class, cost_mask, cost_dice
        self.num_points = num_points

    def cost_matrix(
        self, class_logits: Tensor, mask_logits: Tensor, labels: Tensor, masks: Tensor, coords: Tensor
    ) -> Tensor:
        """Matching cost of one image.

        class_logits (Q, K+1), mask_logits (Q, h, w), labels (N,), masks (N, H, W),
        coords (P, 2) normalised points shared by predictions and targets -> (Q, N) float32.
        """
        probs = class_logits.float().softmax(-1)  # (Q, K+1)
        cost_class = -probs[:, labels]  # (Q, N)
        q, n = mask_logits.shape[0], masks.shape[0]
        pred = point_sample(mask_logits[:, None].float(), coords.expand(q, -1, -1))[:, 0]  # (Q, P)
        tgt = point_sample(masks[:, None].float(), coords.expand(n, -1, -1))[:, 0]  # (N, P)
        return (
            self.cost_class * cost_class
            + self.cost_mask * pairwise_bce(pred, tgt)
            + self.cost_dice * pairwise_dice(pred, tgt)
        )

    @torch.no_grad()
    def __call__(
        self,
        class_logits: Tensor,
        mask_logits: Tensor,
        targets: list[Target],
        generator: torch.Generator | None = None,
    ) -> Indices:
        """class_logits (B, Q, K+1), mask_logits (B, Q, h, w), one target dict per image ->
        per image (pred_idx (M,), tgt_idx (M,)) int64 on the CPU, M = min(Q, N), sorted by pred_idx.

        Points: one (P, 2) uniform draw from `generator` per image that has targets, in batch order.
        """
        if class_logits.ndim != 3 or mask_logits.ndim != 4 or class_logits.shape[:2] != mask_logits.shape[:2]:
            raise ValueError(
                f"expected class_logits (B, Q, K+1) and mask_logits (B, Q, h, w), got "
                f"{tuple(class_logits.shape)} and {tuple(mask_logits.shape)}"
            )
        batch_size = class_logits.shape[0]
        check_targets(targets, batch_size, class_logits.shape[2] - 1)
        indices: Indices = []
        for i, target in enumerate(targets):
            labels, masks = target["labels"], target["masks"]
            if labels.numel() == 0:
                empty = torch.empty(0, dtype=torch.int64)
                indices.append((empty, empty.clone()))
                continue
            device = mask_logits.device
            coords = rand_points(1, self.num_points, device, generator)  # (1, P, 2)
            cost = self.cost_matrix(
                class_logits[i], mask_logits[i], labels.to(device), masks.to(device), coords
            ).cpu()  # (Q, N)
            if not torch.isfinite(cost).all():
                raise ValueError(
                    f"matching cost of image {i} has NaN/inf entries: the predictions have diverged "
                    f"(non-finite logits) or the targets are invalid"
                )
            pred_idx, tgt_idx = linear_sum_assignment(cost.numpy())
            indices.append((torch.as_tensor(pred_idx, dtype=torch.int64), torch.as_tensor(tgt_idx, dtype=torch.int64)))
        return indices
