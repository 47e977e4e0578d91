"""Mask2Former's training loss: Hungarian matching, then class, mask-BCE and dice losses.

For every prediction (the final one and, with deep supervision, each earlier one) queries are
matched to target segments independently. Every query gets a class loss (unmatched ones target
"no object", down-weighted); matched pairs also get BCE and dice on points chosen by importance
sampling on the prediction. Mask losses are normalised by the number of target masks, averaged
over distributed workers so every worker's gradient has the same scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from m2f.model.mask2former import Mask2FormerOutput
from m2f.model.matcher import HungarianMatcher, Indices, Target, check_targets
from m2f.model.point_sampling import point_sample, uncertain_point_coords


@dataclass(frozen=True)
class LossConfig:
    """Loss weights and point sampling; the matcher uses the same three weights as its costs."""

    class_weight: float = 2.0
    mask_weight: float = 5.0
    dice_weight: float = 5.0
    no_object_weight: float = 0.1  # most queries are unmatched: keep them from swamping the class loss
    num_points: int = 12544  # 112 * 112 points per mask instead of every pixel (official setting)
    oversample_ratio: float = 3.0  # candidates per kept point for importance sampling
    importance_sample_ratio: float = 0.75  # share of points taken where the prediction is most uncertain
    deep_supervision: bool = True  # the same losses on every earlier decoder prediction

    def __post_init__(self) -> None:
        for name in ("class_weight", "mask_weight", "dice_weight", "no_object_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.num_points < 1:
            raise ValueError(f"num_points must be >= 1, got {self.num_points}")
        if self.oversample_ratio < 1:
            raise ValueError(f"oversample_ratio must be >= 1, got {self.oversample_ratio}")
        if not 0 <= self.importance_sample_ratio <= 1:
            raise ValueError(f"importance_sample_ratio must be in [0, 1], got {self.importance_sample_ratio}")


def average_num_masks(targets: list[Target], device: torch.device) -> Tensor:
    """Target masks in the batch, averaged over distributed workers, at least 1 (a scalar tensor)."""
    num = torch.tensor(float(sum(len(t["labels"]) for t in targets)), device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(num)
        num = num / dist.get_world_size()
    return num.clamp(min=1)


class SetCriterion(nn.Module):
    """forward(output, targets) -> weighted losses per prediction and their sum under "loss".

    Keys: loss_ce, loss_mask, loss_dice for the final prediction; loss_ce_0, loss_mask_0, ... for
    `output.aux` in order (with deep supervision). Each is already multiplied by its weight.
    """

    def __init__(self, num_classes: int, config: LossConfig | None = None, matcher: HungarianMatcher | None = None):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.config = config = config or LossConfig()
        self.matcher = matcher or HungarianMatcher(
            cost_class=config.class_weight,
            cost_mask=config.mask_weight,
            cost_dice=config.dice_weight,
            num_points=config.num_points,
        )
        class_weights = torch.ones(num_classes + 1)
        class_weights[-1] = config.no_object_weight
        self.register_buffer("class_weights", class_weights, persistent=False)  # (K+1,)

    def sample_points(self, logits: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Where to measure the mask losses: logits (M, 1, h, w) -> coords (M, P, 2).

        The one place points are chosen; override it (or wrap it) to inspect or fix them.
        """
        c = self.config
        return uncertain_point_coords(logits, c.num_points, c.oversample_ratio, c.importance_sample_ratio, generator)

    def forward(
        self, output: Mask2FormerOutput, targets: list[Target], generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        """output: the model's predictions for B images; targets: one {"labels" (N,), "masks" (N, H, W)}
        per image, masks covering the same (padded) extent as the input. `generator` drives every
        random point draw (matching and losses) for reproducible losses."""
        k1 = output.class_logits.shape[-1]
        if k1 != self.num_classes + 1:
            raise ValueError(f"class_logits has {k1} classes, expected num_classes + 1 = {self.num_classes + 1}")
        check_targets(targets, output.class_logits.shape[0], self.num_classes)
        num_masks = average_num_masks(targets, output.class_logits.device)

        preds = [(output.class_logits, output.mask_logits, "")]
        if self.config.deep_supervision:
            preds += [(p.class_logits, p.mask_logits, f"_{i}") for i, p in enumerate(output.aux)]
        c = self.config
        losses: dict[str, Tensor] = {}
        for class_logits, mask_logits, suffix in preds:
            indices = self.matcher(class_logits, mask_logits, targets, generator=generator)
            losses["loss_ce" + suffix] = c.class_weight * self.class_loss(class_logits, targets, indices)
            bce, dice = self.mask_losses(mask_logits, targets, indices, num_masks, generator)
            losses["loss_mask" + suffix] = c.mask_weight * bce
            losses["loss_dice" + suffix] = c.dice_weight * dice
        losses["loss"] = torch.stack(list(losses.values())).sum()
        return losses

    def class_loss(self, class_logits: Tensor, targets: list[Target], indices: Indices) -> Tensor:
        """Weighted cross-entropy over K+1 classes; class_logits (B, Q, K+1)."""
        B, Q, _ = class_logits.shape
        device = class_logits.device
        target_classes = torch.full((B, Q), self.num_classes, dtype=torch.int64, device=device)  # (B, Q) no object
        for b, ((pred_idx, tgt_idx), t) in enumerate(zip(indices, targets, strict=True)):
            target_classes[b, pred_idx.to(device)] = t["labels"].to(device)[tgt_idx.to(device)]
        logits = class_logits.float().transpose(1, 2)  # (B, K+1, Q)
        return F.cross_entropy(logits, target_classes, weight=self.class_weights.to(device))

    def mask_losses(
        self,
        mask_logits: Tensor,
        targets: list[Target],
        indices: Indices,
        num_masks: Tensor,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Point-sampled sigmoid BCE and dice of matched pairs, each summed over masks / num_masks.

        mask_logits (B, Q, h, w); targets at their own resolution (normalised points align them).
        """
        device = mask_logits.device
        preds, tgts = [], []
        for b, (pred_idx, tgt_idx) in enumerate(indices):
            if len(pred_idx):
                preds.append(mask_logits[b, pred_idx.to(device)])  # (M_b, h, w)
                tgts.append(targets[b]["masks"][tgt_idx.to(targets[b]["masks"].device)])  # (M_b, H_b, W_b)
        if not preds:
            # No matched pair anywhere: zero, still attached to the graph (DDP expects every parameter used).
            zero = mask_logits.sum() * 0.0
            return zero, zero.clone()
        pred = torch.cat(preds)[:, None].float()  # (M, 1, h, w)
        coords = self.sample_points(pred.detach(), generator)  # (M, P, 2)
        point_logits = point_sample(pred, coords)[:, 0]  # (M, P)
        with torch.no_grad():
            sizes = [len(m) for m in tgts]
            point_labels = torch.cat(
                [
                    point_sample(m[:, None].to(device=device, dtype=torch.float32), c)[:, 0]  # (M_b, P)
                    for m, c in zip(tgts, coords.split(sizes), strict=True)
                ]
            )  # (M, P)
        bce = F.binary_cross_entropy_with_logits(point_logits, point_labels, reduction="none").mean(1)  # (M,)
        probs = point_logits.sigmoid()
        dice = 1 - (2 * (probs * point_labels).sum(1) + 1) / (probs.sum(1) + point_labels.sum(1) + 1)  # (M,)
        return bce.sum() / num_masks, dice.sum() / num_masks
