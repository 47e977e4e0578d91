"""Training augmentation that moves an image and its masks together, and batch collation.

Mask2Former's recipe: large-scale jitter (random rescale, then a fixed-size crop/pad) and a horizontal
flip for COCO; shortest-edge resize for semantic data sets. Every random draw comes from an explicit
`np.random.Generator`, so a seeded run sees the same crops on every machine.

Padding: the uint8 image is padded with 0 and `Sample.valid` marks the real pixels; `collate` sets
padded pixels to exactly 0 after normalisation, the value the model also sees around padded images
at inference. The uint8 pad value therefore never reaches the model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from PIL import Image

from m2f.pipeline.training.datasets import Sample

Resample = Literal["bilinear", "nearest"]


def _valid(sample: Sample) -> np.ndarray:
    """(H, W) bool of real (non-padded) pixels."""
    if sample.valid is not None:
        return sample.valid
    return np.ones(sample.image.shape[:2], dtype=bool)


def _nearest_index(src: int, dst: int) -> np.ndarray:
    """(dst,) source index of each output pixel centre: nearest-neighbour sampling for masks."""
    return np.minimum(((np.arange(dst) + 0.5) * src / dst).astype(np.int64), src - 1)


def resize(sample: Sample, height: int, width: int, *, image_resample: Resample = "bilinear") -> Sample:
    """Resize to (height, width): the image with `image_resample`, masks and `valid` nearest-neighbour.

    Bilinear (antialiased when shrinking) suits training images; masks stay binary and use the same
    pixel-centre grid, so mask edges land where image edges do (exactly with "nearest", within a pixel
    with "bilinear"). Masks that shrink to nothing are dropped with their labels.
    """
    if height < 1 or width < 1:
        raise ValueError(f"resize target must be at least 1x1, got {width}x{height}")
    if image_resample not in ("bilinear", "nearest"):
        raise ValueError(f"image_resample must be 'bilinear' or 'nearest', got {image_resample!r}")
    h, w = sample.image.shape[:2]
    if (h, w) == (height, width):
        return sample
    rows, cols = _nearest_index(h, height), _nearest_index(w, width)
    if image_resample == "nearest":
        image = sample.image[rows][:, cols]  # (height, width, 3), the very grid the masks use
    else:
        image = np.array(Image.fromarray(sample.image).resize((width, height), Image.Resampling.BILINEAR))
    masks = sample.masks[:, rows][:, :, cols]  # (N, height, width)
    valid = None if sample.valid is None else sample.valid[rows][:, cols]
    return _drop_empty(dataclasses.replace(sample, image=image, masks=masks, valid=valid))


def _drop_empty(sample: Sample) -> Sample:
    """Remove masks (and their labels) left with no pixels, e.g. objects cropped away."""
    keep = sample.masks.any(axis=(1, 2))  # (N,)
    if keep.all():
        return sample
    return dataclasses.replace(sample, masks=sample.masks[keep], labels=sample.labels[keep])


def large_scale_jitter(
    sample: Sample,
    *,
    output_size: int,
    min_scale: float = 0.1,
    max_scale: float = 2.0,
    rng: np.random.Generator,
    image_resample: Resample = "bilinear",
) -> Sample:
    """Rescale by a random factor, then crop/pad to exactly (output_size, output_size).

    The longer side is resized to output_size * scale, scale ~ U[min_scale, max_scale]; a random
    window of at most output_size x output_size is kept and padded at the bottom/right (image 0,
    masks False, `valid` False). Masks emptied by the crop are dropped with their labels.
    """
    if output_size < 1:
        raise ValueError(f"output_size must be >= 1, got {output_size}")
    if not 0 < min_scale <= max_scale:
        raise ValueError(f"need 0 < min_scale <= max_scale, got min_scale={min_scale}, max_scale={max_scale}")
    h, w = sample.image.shape[:2]
    factor = output_size * rng.uniform(min_scale, max_scale) / max(h, w)
    sample = resize(sample, max(1, round(h * factor)), max(1, round(w * factor)), image_resample=image_resample)
    sample = random_crop(sample, output_size, output_size, rng=rng)
    return pad(sample, output_size, output_size)


def random_crop(sample: Sample, height: int, width: int, *, rng: np.random.Generator) -> Sample:
    """Keep a random window of at most (height, width); a smaller side is kept whole."""
    h, w = sample.image.shape[:2]
    ch, cw = min(h, height), min(w, width)
    y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    if (ch, cw) == (h, w):
        return sample
    window = (slice(y0, y0 + ch), slice(x0, x0 + cw))
    cropped = dataclasses.replace(
        sample,
        image=sample.image[window],
        masks=sample.masks[(slice(None), *window)],
        valid=None if sample.valid is None else sample.valid[window],
    )
    return _drop_empty(cropped)


def pad(sample: Sample, height: int, width: int) -> Sample:
    """Pad at the bottom/right to (height, width): image 0, masks False; sets `valid` to the real region."""
    h, w = sample.image.shape[:2]
    if h > height or w > width:
        raise ValueError(f"cannot pad a {w}x{h} image to the smaller {width}x{height}")
    image = np.zeros((height, width, 3), dtype=np.uint8)
    image[:h, :w] = sample.image
    masks = np.zeros((len(sample.masks), height, width), dtype=bool)
    masks[:, :h, :w] = sample.masks
    valid = np.zeros((height, width), dtype=bool)
    valid[:h, :w] = _valid(sample)
    return dataclasses.replace(sample, image=image, masks=masks, valid=valid)


def random_flip(sample: Sample, rng: np.random.Generator, prob: float = 0.5) -> Sample:
    """Mirror left-right with probability `prob` (one draw from `rng` either way)."""
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"prob must be in [0, 1], got {prob}")
    if rng.random() >= prob:
        return sample
    return dataclasses.replace(
        sample,
        image=np.ascontiguousarray(sample.image[:, ::-1]),
        masks=np.ascontiguousarray(sample.masks[:, :, ::-1]),
        valid=None if sample.valid is None else np.ascontiguousarray(sample.valid[:, ::-1]),
    )


def resize_shortest_edge(
    sample: Sample,
    *,
    short_edges: Sequence[int],
    max_size: int,
    rng: np.random.Generator,
    image_resample: Resample = "bilinear",
) -> Sample:
    """Resize so the shorter side is a random choice of `short_edges`, the longer capped at `max_size`."""
    if not short_edges or min(short_edges) < 1 or max_size < 1:
        raise ValueError(f"need positive short_edges and max_size, got {list(short_edges)} and {max_size}")
    h, w = sample.image.shape[:2]
    short = int(short_edges[int(rng.integers(len(short_edges)))])
    factor = min(short / min(h, w), max_size / max(h, w))
    return resize(sample, max(1, round(h * factor)), max(1, round(w * factor)), image_resample=image_resample)


def collate(
    samples: Sequence[Sample], pixel_mean: Sequence[float], pixel_std: Sequence[float]
) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    """Stack samples into normalised pixels (B, 3, H, W) float32 and per-image targets.

    Samples of different sizes are padded at the bottom/right to the largest; padded pixels are 0
    after normalisation. Targets: {"labels": (N,) int64, "masks": (N, H, W) bool} per image.
    `pixel_mean`/`pixel_std` are RGB on the 0-255 scale (the model's preprocessing config).
    """
    if not samples:
        raise ValueError("collate needs at least one sample")
    if len(pixel_mean) != 3 or len(pixel_std) != 3 or min(pixel_std) <= 0:
        raise ValueError(f"pixel_mean/pixel_std must be 3 RGB values, std > 0; got {pixel_mean}, {pixel_std}")
    height = max(s.image.shape[0] for s in samples)
    width = max(s.image.shape[1] for s in samples)
    mean = torch.tensor(pixel_mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(pixel_std, dtype=torch.float32).view(3, 1, 1)
    pixel_values = torch.zeros(len(samples), 3, height, width)  # (B, 3, H, W)
    targets = []
    for b, sample in enumerate(samples):
        sample = pad(sample, height, width)
        image = torch.from_numpy(sample.image).permute(2, 0, 1).float()  # (3, H, W)
        valid = torch.from_numpy(sample.valid)  # (H, W)
        pixel_values[b] = torch.where(valid, (image - mean) / std, 0.0)
        targets.append({"labels": torch.from_numpy(sample.labels.copy()), "masks": torch.from_numpy(sample.masks)})
    return pixel_values, targets
