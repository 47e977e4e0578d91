"""Test-time preprocessing: detectron2's resize rule, normalise-then-pad batching, same-padding groups."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from m2f.model.config import PreprocessConfig
from m2f.model.preprocess import group_by_padded_size, padded_size, resize_image, resized_shape, to_batch

COCO = PreprocessConfig()  # 800 / 1333 / 32
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize(
    ("size", "min_size", "max_size", "expected"),
    [
        ((480, 640), 800, 1333, (800, 1067)),  # 640 * 800 / 480 = 1066.67
        ((640, 480), 800, 1333, (1067, 800)),
        ((500, 500), 800, 1333, (800, 800)),
        ((100, 1000), 800, 1333, (133, 1333)),  # 8000 wide is capped: 800 * 1333 / 8000 = 133.3
        ((1000, 100), 800, 1333, (1333, 133)),
        ((375, 500), 512, 2048, (512, 683)),  # ADE20K
        ((1024, 2048), 1024, 2048, (1024, 2048)),  # Cityscapes: unchanged
        ((1200, 1600), 800, 1333, (800, 1067)),  # shrinking follows the same rule
        ((123, 457), 0, 1333, (123, 457)),  # min_size 0 keeps the size
    ],
)
def test_resized_shape_known_cases(size, min_size, max_size, expected):
    assert resized_shape(*size, min_size, max_size) == expected


def test_resized_shape_respects_both_limits():
    rng = random.Random(0)
    for _ in range(500):
        h, w = rng.randint(1, 5000), rng.randint(1, 5000)
        newh, neww = resized_shape(h, w, 800, 1333)
        assert max(newh, neww) <= 1333
        assert min(newh, neww) == 800 or max(newh, neww) == 1333
        assert abs(newh / neww - h / w) <= (h / w) * (1 / min(newh, neww) + 1 / max(newh, neww))  # rounding only


@pytest.mark.parametrize(
    ("args", "bad"), [((0, 5, 800, 1333), "(0, 5)"), ((5, 5, -1, 1333), "-1"), ((5, 5, 8, 0), "0")]
)
def test_resized_shape_rejects_bad_values(args, bad):
    with pytest.raises(ValueError, match=bad.replace("(", r"\(").replace(")", r"\)")):
        resized_shape(*args)


def test_resize_image_uses_the_resized_shape():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(48, 64, 3), dtype=np.uint8)
    out = resize_image(image, PreprocessConfig(min_size=80, max_size=200))
    assert out.shape == (80, 107, 3) and out.dtype == np.uint8
    assert abs(float(out.mean()) - float(image.mean())) < 2.0  # bilinear keeps the brightness

    flat = np.full((30, 50, 3), (10, 120, 250), dtype=np.uint8)
    assert np.array_equal(
        resize_image(flat, PreprocessConfig(min_size=15, max_size=100)), np.full((15, 25, 3), (10, 120, 250))
    )


def test_resize_image_is_a_no_op_at_the_target_size():
    image = np.zeros((800, 1000, 3), dtype=np.uint8)
    assert resize_image(image, COCO) is image


def test_resize_image_rejects_bad_images():
    with pytest.raises(ValueError, match="float32"):
        resize_image(np.zeros((4, 4, 3), dtype=np.float32), COCO)
    with pytest.raises(ValueError, match=r"\(4, 4\)"):
        resize_image(np.zeros((4, 4), dtype=np.uint8), COCO)


def test_padded_size():
    assert padded_size(800, 1067, 32) == (800, 1088)
    assert padded_size(33, 1, 32) == (64, 32)
    assert padded_size(33, 17, 1) == (33, 17)
    assert padded_size(33, 17, 0) == (33, 17)
    with pytest.raises(ValueError, match="-32"):
        padded_size(33, 17, -32)


@pytest.mark.parametrize("device", DEVICES)
def test_to_batch_normalises_then_zero_pads(device):
    rng = np.random.default_rng(1)
    first = rng.integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    second = torch.from_numpy(rng.integers(0, 256, size=(9, 4, 3), dtype=np.uint8))  # tensors work too
    cfg = PreprocessConfig(size_divisibility=8)
    batch, sizes = to_batch([first, second], cfg, device=device)

    assert batch.shape == (2, 3, 16, 8) and batch.dtype == torch.float32 and batch.device.type == device
    assert sizes == [(5, 7), (9, 4)]
    mean = torch.tensor(cfg.pixel_mean).view(3, 1, 1)
    std = torch.tensor(cfg.pixel_std).view(3, 1, 1)
    batch = batch.cpu()
    for i, image in enumerate([torch.from_numpy(first), second]):
        h, w = sizes[i]
        expected = (image.permute(2, 0, 1).float() - mean) / std
        assert_close(batch[i, :, :h, :w], expected)
        padding = torch.ones(3, 16, 8, dtype=torch.bool)
        padding[:, :h, :w] = False
        assert torch.all(batch[i][padding] == 0)  # padding comes after normalisation


def test_to_batch_dtype_and_divisibility():
    image = np.full((20, 30, 3), 128, dtype=np.uint8)
    batch, sizes = to_batch([image], COCO, dtype=torch.float16)
    assert batch.shape == (1, 3, 32, 32) and batch.dtype == torch.float16 and sizes == [(20, 30)]
    expected = ((128 - torch.tensor(COCO.pixel_mean)) / torch.tensor(COCO.pixel_std)).half()
    assert torch.equal(batch[0, :, 0, 0], expected)

    batch, _ = to_batch([image], PreprocessConfig(size_divisibility=0))
    assert batch.shape == (1, 3, 20, 30)


def test_to_batch_rejects_bad_input():
    with pytest.raises(ValueError, match="none"):
        to_batch([], COCO)
    with pytest.raises(ValueError, match=r"image 1 .*\(4, 4, 4\)"):
        to_batch([np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4, 4), np.uint8)], COCO)


def test_group_by_padded_size_invariants():
    rng = random.Random(2)
    sizes = [(rng.choice([480, 500, 512, 800]), rng.choice([600, 640, 1067, 1088])) for _ in range(200)]
    for batch_size in [1, 3, 8, 500]:
        groups = group_by_padded_size(sizes, batch_size, 32)
        flat = [i for g in groups for i in g]
        assert sorted(flat) == list(range(len(sizes)))  # every index once
        per_size: dict[tuple[int, int], list[list[int]]] = {}
        for g in groups:
            assert 1 <= len(g) <= batch_size
            assert g == sorted(g)  # stable order inside a group
            padded = {padded_size(*sizes[i], 32) for i in g}
            assert len(padded) == 1  # one padded size per group
            per_size.setdefault(padded.pop(), []).append(g)
        for same in per_size.values():
            assert all(len(g) == batch_size for g in same[:-1])  # only the last group of a size is partial
            assert [i for g in same for i in g] == sorted(i for g in same for i in g)


def test_group_by_padded_size_small_cases():
    sizes = [(480, 640), (500, 640), (800, 1067), (512, 620), (800, 1088)]
    assert group_by_padded_size(sizes, 2, 32) == [[0], [1, 3], [2, 4]]
    assert group_by_padded_size(sizes, 1, 32) == [[0], [1], [3], [2], [4]]
    assert group_by_padded_size(sizes, 2, 0) == [[0], [1], [2], [3], [4]]
    assert group_by_padded_size([], 4, 32) == []
    with pytest.raises(ValueError, match="0"):
        group_by_padded_size(sizes, 0, 32)
