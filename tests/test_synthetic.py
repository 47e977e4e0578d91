"""Synthetic scenes: exact labels in every format, byte-for-byte determinism, the documented ranges."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import pytest
from PIL import Image
from pycocotools.coco import COCO

from m2f.pipeline.training.synthetic import (
    MAX_SIDE,
    MAX_THINGS,
    MIN_SIDE,
    MIN_VISIBLE_PX,
    SYNTHETIC_CATEGORIES,
    THING_IDS,
    generate,
    render_scene,
)

N = 6


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synthetic")
    return out, generate(str(out), N, seed=3)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _scenes(seed: int, n: int):
    """The scenes `generate` draws for image i: one stream per (seed, i)."""
    return [render_scene(np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(i,)))) for i in range(n)]


def test_layout_and_summary(dataset):
    root, summary = dataset
    names = [f"{i:06d}.png" for i in range(1, N + 1)]
    for sub in ("images", "panoptic", "semantic"):
        assert sorted(p.name for p in (root / sub).iterdir()) == names
    assert summary["num_images"] == N
    panoptic = json.loads((root / "panoptic.json").read_text())
    instances = json.loads((root / "instances.json").read_text())
    assert summary["num_segments"] == sum(len(a["segments_info"]) for a in panoptic["annotations"])
    assert summary["num_things"] == len(instances["annotations"])
    assert summary["instances_json"] == f"{root}/instances.json"
    assert [c["id"] for c in panoptic["categories"]] == [1, 2, 3, 4, 5]
    assert all("color" in c for c in panoptic["categories"])
    assert [c["name"] for c in instances["categories"]] == ["circle", "rectangle", "triangle"]


def test_same_seed_same_bytes_different_seed_differs(dataset, tmp_path):
    root, _ = dataset
    generate(str(tmp_path / "again"), N, seed=3)
    assert _files(tmp_path / "again") == _files(root)
    generate(str(tmp_path / "other"), N, seed=4)
    other = _files(tmp_path / "other")
    assert other.keys() == _files(root).keys()
    assert other["images/000001.png"] != _files(root)["images/000001.png"]


def test_image_i_does_not_depend_on_n(dataset, tmp_path):
    root, _ = dataset
    generate(str(tmp_path), 2, seed=3)
    for name in ("images/000002.png", "panoptic/000002.png"):
        assert (tmp_path / name).read_bytes() == (root / name).read_bytes()


def test_panoptic_png_decodes_to_the_exact_segments(dataset):
    root, _ = dataset
    panoptic = json.loads((root / "panoptic.json").read_text())
    for (image, segments), ann, info in zip(_scenes(3, N), panoptic["annotations"], panoptic["images"], strict=True):
        assert np.array_equal(np.array(Image.open(root / "images" / info["file_name"])), image)
        rgb = np.array(Image.open(root / "panoptic" / ann["file_name"])).astype(np.int64)
        ids = rgb[..., 0] + 256 * rgb[..., 1] + 256**2 * rgb[..., 2]
        assert (ids > 0).all(), "synthetic scenes have no void pixels"
        assert len(ann["segments_info"]) == len(segments)
        for s, seg in zip(ann["segments_info"], segments, strict=True):
            assert s["category_id"] == seg.category_id and s["iscrowd"] == 0
            assert np.array_equal(ids == s["id"], seg.mask)
            assert s["area"] == int(seg.mask.sum())
            ys, xs = np.nonzero(seg.mask)
            assert s["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]


def test_semantic_png_matches_segments(dataset):
    root, _ = dataset
    for i, (_, segments) in enumerate(_scenes(3, N), start=1):
        semantic = np.array(Image.open(root / "semantic" / f"{i:06d}.png"))
        expected = np.full(semantic.shape, 255)
        for seg in segments:
            expected[seg.mask] = [c["id"] for c in SYNTHETIC_CATEGORIES].index(seg.category_id)
        assert np.array_equal(semantic, expected)
        assert semantic.max() <= 4


def test_instances_rle_decodes_to_thing_masks_and_coco_loads(dataset):
    root, _ = dataset
    coco = COCO(str(root / "instances.json"))
    assert sorted(coco.getCatIds()) == [1, 2, 3]
    for image_id, (_, segments) in enumerate(_scenes(3, N), start=1):
        things = [s for s in segments if s.category_id in THING_IDS]
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
        assert len(anns) == len(things)
        for ann, seg in zip(anns, things, strict=True):
            assert isinstance(ann["segmentation"]["counts"], str)
            assert ann["category_id"] == seg.category_id and ann["iscrowd"] == 0
            assert np.array_equal(mask_utils.decode(ann["segmentation"]).astype(bool), seg.mask)
            assert np.array_equal(coco.annToMask(ann).astype(bool), seg.mask)
            assert ann["area"] == int(seg.mask.sum())
            assert ann["bbox"] == [round(v) for v in mask_utils.toBbox(ann["segmentation"])]


def test_scene_ranges_and_partition():
    counts = set()
    for seed in range(40):
        image, segments = render_scene(np.random.default_rng(seed))
        h, w = image.shape[:2]
        assert image.dtype == np.uint8 and image.shape == (h, w, 3)
        assert MIN_SIDE <= h <= MAX_SIDE and MIN_SIDE <= w <= MAX_SIDE
        cover = np.sum([s.mask for s in segments], axis=0)
        assert (cover == 1).all(), "segments must partition the image"
        things = [s for s in segments if s.category_id in THING_IDS]
        counts.add(len(things))
        assert 0 <= len(things) <= MAX_THINGS
        for s in things:
            assert s.mask.sum() >= MIN_VISIBLE_PX
            ys, xs = np.nonzero(s.mask)
            # No thing is wider than 45 % of the shorter side, rotated rectangles up to their diagonal.
            assert max(np.ptp(xs), np.ptp(ys)) <= 0.45 * np.sqrt(2) * min(h, w) + 2
        stuff = {s.category_id for s in segments if s.category_id not in THING_IDS}
        assert stuff <= {4, 5}
    assert {1, 3, 6} <= counts, "thing counts should span 1..6"


def test_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="n must be"):
        generate(str(tmp_path), -1, seed=0)
    with pytest.raises(ValueError, match="seed must be"):
        generate(str(tmp_path), 1, seed=-5)
