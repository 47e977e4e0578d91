"""One image -> segments recipe, used by the Ray actor, the quality scorer, the benchmarks and users.

`Predictor(net, task=...)` owns everything between pixels and segment dicts: the model's test-time
resize, normalisation and padding, the forward pass (under autocast for bf16/fp16), the configured
task's post-processing, the compact form the device hands to the host (`pipeline.compact.CompactPrediction`:
an id map or box-cropped packed masks, without segments below the score threshold) and its encoding into the
rows' `segments` (COCO RLE, `encode`). Batch plumbing (Ray batches, error rows, retries) stays with its
callers, so the numbers a user gets from `Predictor(net)(image)` are the ones `m2f segment` writes.
`check_precision` is the one rule for `precision`, for callers that refuse a bad setting early.

    from m2f import model
    from m2f.pipeline.predictor import Predictor

    predict = Predictor(model.load("model_final_94dc52.pkl"), task="panoptic")
    segments = predict(image)  # image (H, W, 3) uint8 RGB -> [{"label", "score", "rle", ...}, ...]

    predict = Predictor.load("s3://models/ft1/model.safetensors", task="instance")  # or in one step
    segments = predict(PIL.Image.open("cat.jpg"))  # a PIL image is turned upright and into RGB first
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from m2f.model.config import TASKS
from m2f.model.mask2former import Mask2Former
from m2f.model.postprocess import postprocess
from m2f.model.preprocess import group_by_padded_size, resize_image, to_batch
from m2f.pipeline.compact import LARGE_PIXELS, CompactPrediction, compact, keep_instance_mask
from m2f.pipeline.encode import image_stats, segment_dicts

__all__ = ["CompactPrediction", "Predictor", "autocast_dtype", "check_precision", "default_score_threshold"]

INSTANCE_SCORE_THRESHOLD = 0.5  # detectron2's demo and Hugging Face's pipeline keep instances scoring >= 0.5

# --precision -> autocast dtype (None: plain fp32)
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def default_score_threshold(task: str) -> float:
    """0.5 for instance output (each query is a candidate instance; most score near 0), else 0 (panoptic and
    semantic post-processing decide themselves what to keep)."""
    return INSTANCE_SCORE_THRESHOLD if task == "instance" else 0.0


def check_precision(precision: str, device_type: str | None) -> None:
    """The one precision rule: ValueError for a name we do not know, or for fp16 on anything but a CUDA
    device. `device_type` "cuda", "cpu", ... or None while the device is not decided yet (only the name is
    checked then).

    Separate from `Predictor` so that a caller can refuse a bad setting before loading a checkpoint.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp16" and device_type is not None and device_type != "cuda":
        raise ValueError("precision fp16 needs a GPU; use bf16 or fp32 on CPU")


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of `precision` on `device` (None: plain fp32); ValueError as `check_precision`."""
    check_precision(precision, device.type)
    return PRECISIONS[precision]


class Predictor:
    """image -> segments with one loaded model.

    `__call__(image)` does the whole chain for one image. The steps are public for callers that batch:
    `resize` (a CPU stage may do it elsewhere), `groups` (equal padded sizes, since padding changes
    predictions), `predict` (one forward pass over resized images of one padded size) and `encode`.
    """

    def __init__(
        self,
        net: Mask2Former,
        *,
        task: str | None = None,
        precision: str = "fp32",
        score_threshold: float = 0.0,
    ) -> None:
        self.net = net
        self.config = net.config
        self.task = task or self.config.task
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        self.device = net.device
        self.dtype = autocast_dtype(precision, self.device)
        self.score_threshold = score_threshold

    @classmethod
    def load(
        cls,
        path_or_uri: str,
        *,
        device: str = "cpu",
        task: str | None = None,
        precision: str = "fp32",
        score_threshold: float | None = None,
        preset: str | None = None,
        storage_options: dict[str, Any] | None = None,
    ) -> Predictor:
        """A Predictor for any checkpoint `model.load` reads. `score_threshold` None: 0.5 for instance
        output (as `m2f segment` and detectron2's demo), else 0."""
        from m2f.model.checkpoint import load

        net = load(path_or_uri, device, preset=preset, storage_options=storage_options)
        task = task or net.config.task
        if score_threshold is None:
            score_threshold = default_score_threshold(task)
        return cls(net, task=task, precision=precision, score_threshold=score_threshold)

    def __call__(self, image: Any) -> list[dict[str, Any]]:
        """image: (H, W, 3) uint8 RGB, upright, or a PIL image -> its segments, as a row's `segments`
        column holds them."""
        image = _as_rgb_array(image)
        (prediction,) = self.predict([self.resize(image)], [image.shape[:2]])
        return self.encode(prediction)

    def resize(self, image: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 -> (h, w, 3) by the checkpoint's test-time resize rule."""
        return resize_image(image, self.config.preprocess)

    def groups(self, images: Sequence[np.ndarray], batch_size: int) -> list[list[int]]:
        """Indices of resized `images` in forward passes of one padded size and at most `batch_size`."""
        sizes = [image.shape[:2] for image in images]
        return group_by_padded_size(sizes, batch_size, self.config.preprocess.size_divisibility)

    def predict(self, images: Sequence[np.ndarray], output_sizes: Sequence[tuple[int, int]]) -> list[CompactPrediction]:
        """Resized images (h, w, 3) of one padded size -> the configured task's prediction per image, at
        `output_sizes` (each image's original (H, W)), compact, without segments scoring below
        `score_threshold` (nor instances whose mask is empty at that size)."""
        return [by_task[self.task] for by_task in self.predict_tasks(images, output_sizes, (self.task,))]

    def predict_tasks(
        self, images: Sequence[np.ndarray], output_sizes: Sequence[tuple[int, int]], tasks: Sequence[str]
    ) -> list[dict[str, CompactPrediction]]:
        """As `predict`, for several tasks from one forward pass (the quality scorer wants PQ and AP)."""
        with torch.inference_mode():
            pixel_values, image_sizes = to_batch(images, self.config.preprocess, device=self.device)  # (B, 3, Hp, Wp)
            with self._autocast():
                out = self.net(pixel_values)
            sizes = [(int(h), int(w)) for h, w in output_sizes]
            # large instance masks become RLEs as they are made: never two whole at once (pipeline.compact)
            large = {"keep_mask": keep_instance_mask} if max(h * w for h, w in sizes) > LARGE_PIXELS else {}
            per_task = {
                task: postprocess(
                    task,
                    out.class_logits.float(),  # (B, Q, K+1)
                    out.mask_logits.float(),  # (B, Q, Hp/4, Wp/4)
                    config=self.config,
                    image_sizes=image_sizes,
                    output_sizes=sizes,
                    padded_size=tuple(pixel_values.shape[-2:]),
                    **(large if task == "instance" else {}),
                )
                for task in tasks
            }
            # Compacted on the model's device: only id maps or packed crops are copied to the host.
            return [
                {task: compact(task, results[i], self.score_threshold) for task, results in per_task.items()}
                for i in range(len(images))
            ]

    def encode(self, prediction: CompactPrediction) -> list[dict[str, Any]]:
        """A prediction -> segment dicts (COCO RLE, area, bbox, class and score), ids 1..N in its order."""
        return segment_dicts(prediction.rles(), *self.classes(prediction), prediction.scores)

    def classes(self, prediction: CompactPrediction) -> tuple[list[int], list[str], list[bool]]:
        """Per segment of `prediction`: its dataset category id, class name and whether it is a thing."""
        labels, cfg = prediction.labels.tolist(), self.config
        if labels and (min(labels) < 0 or max(labels) >= len(cfg.class_names)):
            raise ValueError(f"labels must lie in [0, {len(cfg.class_names)}), got {min(labels)}..{max(labels)}")
        return (
            [int(cfg.category_id(label)) for label in labels],
            [cfg.class_names[label] for label in labels],
            [bool(cfg.is_thing[label]) for label in labels],
        )

    def stats(self, segments: Sequence[dict[str, Any]], height: int, width: int) -> dict[str, Any]:
        """The row's per-image statistics of `segments` (class fractions, counts, mean score)."""
        return image_stats(segments, height, width, semantic=self.task == "semantic")

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)


def _as_rgb_array(image: Any) -> np.ndarray:
    """A PIL image (turned upright by its EXIF orientation, as `m2f segment` reads files) or an array."""
    from PIL import Image, ImageOps

    if isinstance(image, Image.Image):
        image = np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {image.dtype} {image.shape}")
    return image
