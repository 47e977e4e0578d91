"""Augmentation keeps image and masks aligned, produces the promised sizes, and is seed-deterministic."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from m2f.pipeline.training.augment import (
    collate,
    large_scale_jitter,
    pad,
    random_crop,
    random_flip,
    resize,
    resize_shortest_edge,
)
from m2f.pipeline.training.datasets import Sample

MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)


def _painted(h: int = 90, w: int = 140) -> Sample:
    """Black image with a red square and a green bar; their masks are exactly the painted pixels."""
    image = np.zeros((h, w, 3), dtype=np.uint8)
    masks = np.zeros((2, h, w), dtype=bool)
    masks[0, 10:40, 20:50] = True
    masks[1, 60:70, 5:130] = True
    image[masks[0]] = (255, 0, 0)
    image[masks[1]] = (0, 255, 0)
    return Sample(image, masks, np.array([3, 1], dtype=np.int64), image_id=1, file_name="x.png")


def _assert_aligned(sample: Sample) -> None:
    """Each mask covers exactly the pixels painted in its colour (channel 0 red, channel 1 green)."""
    for mask, channel in zip(sample.masks, (0, 1), strict=False):
        assert np.array_equal(mask, sample.image[..., channel] == 255)


@pytest.mark.parametrize("seed", range(8))
def test_jitter_nearest_keeps_masks_exactly_on_painted_pixels(seed):
    rng = np.random.default_rng(seed)
    out = large_scale_jitter(_painted(), output_size=64, rng=rng, image_resample="nearest")
    assert out.image.shape == (64, 64, 3) and out.masks.shape[1:] == (64, 64) and out.valid.shape == (64, 64)
    labels = {3: 0, 1: 1}  # label -> colour channel
    for mask, label in zip(out.masks, out.labels, strict=True):
        assert np.array_equal(mask, out.image[..., labels[int(label)]] == 255)
        assert mask.any(), "empty masks are dropped"
    assert not out.image[~out.valid].any(), "padding is 0"
    assert not out.masks[:, ~out.valid].any()
    # The real region is a top-left rectangle.
    rows, cols = np.flatnonzero(out.valid.any(1)), np.flatnonzero(out.valid.any(0))
    assert out.valid.sum() == len(rows) * len(cols) and rows[0] == 0 and cols[0] == 0


def test_jitter_bilinear_stays_within_a_pixel():
    for seed in range(6):
        out = large_scale_jitter(_painted(), output_size=96, min_scale=0.5, rng=np.random.default_rng(seed))
        for mask, label in zip(out.masks, out.labels, strict=True):
            painted = out.image[..., 0 if label == 3 else 1] > 127
            assert (mask ^ painted).sum() <= 0.1 * max(mask.sum(), 1) + 4


def test_jitter_scale_range_and_output_size():
    sample = _painted(100, 200)
    # Scale 2 with output 50: the longer side becomes 100 before a 50x50 crop, so everything is real.
    big = large_scale_jitter(sample, output_size=50, min_scale=2.0, max_scale=2.0, rng=np.random.default_rng(0))
    assert big.image.shape == (50, 50, 3) and big.valid.all()
    # Scale 0.5 with output 100: 200x100 -> 50x25, padded to 100x100.
    small = large_scale_jitter(sample, output_size=100, min_scale=0.5, max_scale=0.5, rng=np.random.default_rng(0))
    assert small.image.shape == (100, 100, 3) and small.valid.sum() == 50 * 25
    assert small.valid[:25, :50].all()
    with pytest.raises(ValueError, match="min_scale"):
        large_scale_jitter(sample, output_size=10, min_scale=2.0, max_scale=1.0, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="output_size"):
        large_scale_jitter(sample, output_size=0, rng=np.random.default_rng(0))


def test_crop_drops_emptied_masks_with_their_labels():
    dropped = 0
    for seed in range(20):
        cropped = random_crop(_painted(), 30, 60, rng=np.random.default_rng(seed))
        assert cropped.image.shape == (30, 60, 3)
        # A label survives exactly when some of its colour is left in the window.
        visible = [label for label, channel in ((3, 0), (1, 1)) if (cropped.image[..., channel] == 255).any()]
        assert cropped.labels.tolist() == visible
        assert cropped.masks.shape == (len(visible), 30, 60) and cropped.masks.any(axis=(1, 2)).all()
        for mask, label in zip(cropped.masks, cropped.labels, strict=True):
            assert np.array_equal(mask, cropped.image[..., 0 if label == 3 else 1] == 255)
        dropped += len(visible) < 2
    assert dropped > 0


def test_shrinking_drops_masks_that_vanish():
    sample = _painted()
    masks = np.concatenate([sample.masks, np.zeros((1, 90, 140), dtype=bool)])
    masks[2, 0, 0] = True  # a one-pixel object
    tiny = Sample(sample.image, masks, np.array([3, 1, 4], dtype=np.int64), 1, "x.png")
    small = resize(tiny, 9, 14, image_resample="nearest")
    assert small.labels.tolist() == [3, 1]


def test_flip_mirrors_image_masks_and_valid():
    sample = pad(_painted(), 100, 150)
    flipped = random_flip(sample, np.random.default_rng(0), prob=1.0)
    assert np.array_equal(flipped.image, sample.image[:, ::-1])
    assert np.array_equal(flipped.masks, sample.masks[:, :, ::-1])
    assert np.array_equal(flipped.valid, sample.valid[:, ::-1])
    _assert_aligned(flipped)
    assert random_flip(sample, np.random.default_rng(0), prob=0.0) is sample
    flips = [random_flip(sample, np.random.default_rng(s)) is not sample for s in range(200)]
    assert 60 < sum(flips) < 140


def test_resize_shortest_edge():
    sample = _painted(90, 140)
    out = resize_shortest_edge(sample, short_edges=[45], max_size=1000, rng=np.random.default_rng(0))
    assert out.image.shape[:2] == (45, 70)
    capped = resize_shortest_edge(sample, short_edges=[90], max_size=70, rng=np.random.default_rng(0))
    assert max(capped.image.shape[:2]) == 70
    with pytest.raises(ValueError, match="short_edges"):
        resize_shortest_edge(sample, short_edges=[], max_size=10, rng=np.random.default_rng(0))


def test_same_seed_same_output():
    def run(seed: int) -> Sample:
        rng = np.random.default_rng(seed)
        return random_flip(large_scale_jitter(_painted(), output_size=48, rng=rng), rng)

    a, b, c = run(5), run(5), run(6)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.masks, b.masks) and np.array_equal(a.valid, b.valid)
    assert not (np.array_equal(a.image, c.image) and np.array_equal(a.valid, c.valid))


def test_collate_normalises_and_zeroes_padding():
    rng = np.random.default_rng(0)
    samples = [large_scale_jitter(_painted(), output_size=32, rng=rng) for _ in range(3)]
    pixels, targets = collate(samples, MEAN, STD)
    assert pixels.shape == (3, 3, 32, 32) and pixels.dtype == torch.float32
    for b, (sample, target) in enumerate(zip(samples, targets, strict=True)):
        expected = (torch.from_numpy(sample.image).permute(2, 0, 1).float() - torch.tensor(MEAN).view(3, 1, 1)) / (
            torch.tensor(STD).view(3, 1, 1)
        )
        valid = torch.from_numpy(sample.valid)
        torch.testing.assert_close(pixels[b][:, valid], expected[:, valid])
        assert (pixels[b][:, ~valid] == 0).all()
        assert target["labels"].dtype == torch.int64 and target["masks"].dtype == torch.bool
        assert target["masks"].shape == (len(sample.labels), 32, 32)
        assert target["labels"].tolist() == sample.labels.tolist()


def test_collate_pads_mixed_sizes():
    pixels, targets = collate([_painted(90, 140), _painted(40, 60)], MEAN, STD)
    assert pixels.shape == (2, 3, 90, 140)
    assert (pixels[1, :, 40:] == 0).all() and (pixels[1, :, :, 60:] == 0).all()
    assert targets[1]["masks"].shape[1:] == (90, 140)
    with pytest.raises(ValueError, match="at least one"):
        collate([], MEAN, STD)


def test_sample_without_targets_passes_through():
    image = np.full((50, 70, 3), 9, dtype=np.uint8)
    empty = Sample(image, np.zeros((0, 50, 70), dtype=bool), np.zeros(0, dtype=np.int64), 2, "e.png")
    out = random_flip(large_scale_jitter(empty, output_size=40, rng=np.random.default_rng(1)), np.random.default_rng(1))
    assert out.masks.shape == (0, 40, 40) and out.labels.shape == (0,)
    _, targets = collate([out], MEAN, STD)
    assert targets[0]["masks"].shape == (0, 40, 40) and targets[0]["labels"].shape == (0,)
