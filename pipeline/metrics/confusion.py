"""Semantic segmentation: mIoU, class and pixel accuracy from one confusion matrix over the whole set.

One matrix accumulated over every pixel of the set, not a mean of per-image IoUs: a small image
must not weigh as much as a large one, and a class absent from an image has no IoU there.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from m2f.pipeline.groundtruth import IGNORE


class ConfusionMatrix:
    """Pixel counts of (ground-truth class, predicted class) over a set, for mIoU and accuracy.

    Rows are GT classes 0..K-1; columns are predicted classes 0..K-1 plus one last column for
    pixels the prediction leaves unlabelled (value `ignore_index`), which count as wrong. GT
    pixels equal to `ignore_index` are not evaluated at all.
    """

    def __init__(self, num_classes: int, ignore_index: int = IGNORE) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        if 0 <= ignore_index < num_classes:
            raise ValueError(f"ignore_index {ignore_index} collides with class {ignore_index} of {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = np.zeros((num_classes, num_classes + 1), dtype=np.int64)  # (K, K + 1)

    def add(self, pred: np.ndarray, gt: np.ndarray) -> None:
        """Count one image: `pred` and `gt` are (H, W) integer class maps of the same shape."""
        pred, gt = np.asarray(pred), np.asarray(gt)
        if pred.shape != gt.shape:
            raise ValueError(f"pred has shape {pred.shape} but gt has shape {gt.shape}")
        for name, arr in (("pred", pred), ("gt", gt)):
            if not np.issubdtype(arr.dtype, np.integer):
                raise ValueError(f"{name} must hold integer class ids, got dtype {arr.dtype}")
        k = self.num_classes
        valid = gt != self.ignore_index
        gt_v = gt[valid].astype(np.int64)
        pred_v = pred[valid].astype(np.int64)
        bad_gt = (gt_v < 0) | (gt_v >= k)
        if bad_gt.any():
            raise ValueError(f"gt holds class ids {np.unique(gt_v[bad_gt])[:10].tolist()} outside 0..{k - 1}")
        unlabelled = pred_v == self.ignore_index
        bad_pred = ((pred_v < 0) | (pred_v >= k)) & ~unlabelled
        if bad_pred.any():
            raise ValueError(f"pred holds class ids {np.unique(pred_v[bad_pred])[:10].tolist()} outside 0..{k - 1}")
        pred_v[unlabelled] = k
        self.matrix += np.bincount(gt_v * (k + 1) + pred_v, minlength=k * (k + 1)).reshape(k, k + 1)

    def summary(self, class_names: Sequence[str] | None = None) -> dict[str, Any]:
        """mIoU, mean class accuracy, pixel accuracy and per-class IoU / accuracy.

        IoU_c = TP / (TP + FP + FN). mIoU averages over the classes that occur: those with a GT
        pixel or a prediction on an evaluated (non-ignored) pixel. A class never seen in either
        has an undefined IoU, is left out of the mean and reported as None; counting it as 0 or 1
        would reward or punish a model for classes the data does not contain. Class accuracy
        (TP / GT pixels) is averaged over classes present in the GT. Averages are 0.0 when
        nothing has been counted.
        """
        k = self.num_classes
        names = [str(c) for c in range(k)] if class_names is None else list(class_names)
        if len(names) != k:
            raise ValueError(f"got {len(names)} class names for {k} classes")
        tp = np.diag(self.matrix[:, :k]).astype(np.float64)
        gt_pixels = self.matrix.sum(axis=1).astype(np.float64)
        pred_pixels = self.matrix[:, :k].sum(axis=0).astype(np.float64)
        union = gt_pixels + pred_pixels - tp
        seen, in_gt = union > 0, gt_pixels > 0
        iou = np.divide(tp, union, out=np.zeros(k), where=seen)
        acc = np.divide(tp, gt_pixels, out=np.zeros(k), where=in_gt)
        total = gt_pixels.sum()
        per_class = [
            {
                "class": names[c],
                "iou": float(iou[c]) if seen[c] else None,
                "accuracy": float(acc[c]) if in_gt[c] else None,
            }
            for c in range(k)
        ]
        return {
            "mIoU": float(iou[seen].mean()) if seen.any() else 0.0,
            "mean_accuracy": float(acc[in_gt].mean()) if in_gt.any() else 0.0,
            "pixel_accuracy": float(tp.sum() / total) if total else 0.0,
            "per_class": per_class,
        }
