"""Data readers: each format round-trips a generated synthetic set; hand-built COCO edge cases."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import pytest
from PIL import Image

from m2f.pipeline.groundtruth import contiguous_mapping
from m2f.pipeline.storage import Storage
from m2f.pipeline.training.datasets import (
    CocoInstances,
    CocoPanoptic,
    Sample,
    SemanticMasks,
    decode_segmentation,
)
from m2f.pipeline.training.synthetic import SYNTHETIC_CATEGORIES, THING_IDS, generate, render_scene

N = 4
SEED = 11


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    generate(str(root), N, seed=SEED)
    return root


def _scene(i: int):
    return render_scene(np.random.default_rng(np.random.SeedSequence(SEED, spawn_key=(i,))))


def _check_sample(sample: Sample, image: np.ndarray, expected: list[tuple[np.ndarray, int]]) -> None:
    """`sample` holds `image` and exactly the (mask, contiguous label) pairs of `expected`, in order."""
    assert np.array_equal(sample.image, image)
    assert sample.masks.dtype == np.bool_ and sample.labels.dtype == np.int64
    assert sample.masks.shape == (len(expected), *image.shape[:2])
    assert sample.labels.tolist() == [label for _, label in expected]
    for got, (mask, _) in zip(sample.masks, expected, strict=True):
        assert np.array_equal(got, mask)


def _index(category_id: int) -> int:
    return [c["id"] for c in SYNTHETIC_CATEGORIES].index(category_id)


@pytest.mark.parametrize("scheme", ["", "file://"])
def test_coco_panoptic_round_trip(synthetic, scheme):
    root = f"{scheme}{synthetic}"
    ds = CocoPanoptic(f"{root}/panoptic.json", f"{root}/panoptic", f"{root}/images")
    assert len(ds) == N
    assert [(c["id"], c["name"], c["isthing"]) for c in ds.categories] == [
        (c["id"], c["name"], c["isthing"]) for c in SYNTHETIC_CATEGORIES
    ]
    for i in range(N):
        image, segments = _scene(i)
        record = ds.record(i)
        assert record.file_name == f"{i + 1:06d}.png" and record.image_uri == f"{root}/images/{record.file_name}"
        assert (record.height, record.width) == image.shape[:2]
        sample = ds.load(i)
        assert sample.image_id == i + 1 and sample.file_name == record.file_name
        _check_sample(sample, image, [(s.mask, _index(s.category_id)) for s in segments])


def test_coco_instances_round_trip(synthetic):
    ds = CocoInstances(f"{synthetic}/instances.json", f"{synthetic}/images")
    assert len(ds) == N
    assert [c["name"] for c in ds.categories] == ["circle", "rectangle", "triangle"]
    for i in range(N):
        image, segments = _scene(i)
        things = [(s.mask, _index(s.category_id)) for s in segments if s.category_id in THING_IDS]
        _check_sample(ds.load(i), image, things)


def test_semantic_round_trip(synthetic):
    ds = SemanticMasks(f"file://{synthetic}/images", f"file://{synthetic}/semantic", SYNTHETIC_CATEGORIES)
    assert len(ds) == N
    for i in range(N):
        image, segments = _scene(i)
        label = np.full(image.shape[:2], 255)
        for s in segments:
            label[s.mask] = _index(s.category_id)
        present = sorted(set(np.unique(label).tolist()))
        _check_sample(ds.load(i), image, [(label == k, k) for k in present])
        record = ds.record(i)
        assert record.image_id == f"{i + 1:06d}" and (record.height, record.width) == image.shape[:2]


def _write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_semantic_ignore_and_stem_matching(tmp_path):
    image = np.random.default_rng(0).integers(0, 256, (6, 8, 3), dtype=np.uint8)
    label = np.full((6, 8), 255, dtype=np.uint8)  # all ignored ...
    label[1:3, 2:5] = 2  # ... except a block of class 2
    label[4, :] = 0
    _write_png(tmp_path / "img" / "a.jpg", image)
    _write_png(tmp_path / "img" / "b.png", image)  # no label: skipped
    _write_png(tmp_path / "lbl" / "a.png", label)
    _write_png(tmp_path / "lbl" / "c.png", label)  # no image: skipped
    ds = SemanticMasks(str(tmp_path / "img"), str(tmp_path / "lbl"), ["zero", "one", "two"])
    assert len(ds) == 1
    assert [c["name"] for c in ds.categories] == ["zero", "one", "two"]
    sample = ds.load(0)
    assert sample.file_name == "a.jpg" and sample.image_id == "a"
    assert sample.labels.tolist() == [0, 2]
    assert np.array_equal(sample.masks[0], label == 0) and np.array_equal(sample.masks[1], label == 2)
    assert not sample.masks.any(axis=0)[label == 255].any(), "ignored pixels belong to no mask"

    _write_png(tmp_path / "lbl" / "a.png", np.full((6, 8), 7, dtype=np.uint8))
    with pytest.raises(ValueError, match="label 7 but only 3 categories"):
        ds.load(0)
    with pytest.raises(ValueError, match="not a directory"):
        SemanticMasks(str(tmp_path / "img"), str(tmp_path / "nothing_here"), ["x"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image"):
        SemanticMasks(str(tmp_path / "img"), str(tmp_path / "empty"), ["x"])


def test_semantic_palette_png_gives_indices(tmp_path):
    label = np.zeros((4, 4), dtype=np.uint8)
    label[:2] = 1
    palette = Image.new("P", (4, 4))
    palette.putdata(label.flatten().tolist())
    palette.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    palette.save(tmp_path / "x.png")
    _write_png(tmp_path / "img" / "x.png", np.zeros((4, 4, 3), dtype=np.uint8))
    ds = SemanticMasks(str(tmp_path / "img"), str(tmp_path), ["a", "b"])
    assert ds.load(0).labels.tolist() == [0, 1]


def _square_polygon(x0: int, y0: int, x1: int, y1: int) -> list[float]:
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def test_coco_instances_polygon_rle_and_crowd(tmp_path):
    h, w = 20, 30
    image = np.random.default_rng(1).integers(0, 256, (h, w, 3), dtype=np.uint8)
    _write_png(tmp_path / "images" / "pic.png", image)
    _write_png(tmp_path / "images" / "empty.png", image)

    poly_ref = np.zeros((h, w), dtype=bool)  # two polygons of one object, pixel-aligned corners
    poly_ref[2:6, 3:9] = True
    poly_ref[10:12, 20:25] = True
    rle_ref = np.zeros((h, w), dtype=bool)
    rle_ref[5:15, 12:18] = True
    crowd_ref = np.zeros((h, w), dtype=bool)
    crowd_ref[15:20, 0:10] = True
    compressed = mask_utils.encode(np.asfortranarray(rle_ref.astype(np.uint8)))
    uncompressed = _uncompressed_rle(crowd_ref)

    data = {
        "images": [
            {"id": 7, "file_name": "pic.png", "height": h, "width": w},
            {"id": 8, "file_name": "empty.png", "height": h, "width": w},
        ],
        "categories": [{"id": 30, "name": "dog"}, {"id": 4, "name": "cat"}],  # unsorted on purpose
        "annotations": [
            {
                "id": 1,
                "image_id": 7,
                "category_id": 30,
                "segmentation": [_square_polygon(3, 2, 9, 6), _square_polygon(20, 10, 25, 12), [1, 1, 2, 2]],
                "iscrowd": 0,
            },
            {
                "id": 2,
                "image_id": 7,
                "category_id": 4,
                "segmentation": {"size": [h, w], "counts": compressed["counts"].decode()},
                "iscrowd": 0,
            },
            {
                "id": 3,
                "image_id": 7,
                "category_id": 4,
                "segmentation": {"size": [h, w], "counts": uncompressed},
                "iscrowd": 1,
            },
        ],
    }
    (tmp_path / "instances.json").write_text(json.dumps(data))
    ds = CocoInstances(str(tmp_path / "instances.json"), str(tmp_path / "images"))
    assert [c["name"] for c in ds.categories] == ["cat", "dog"]
    assert contiguous_mapping(ds.categories) == {4: 0, 30: 1}
    assert all(c["isthing"] == 1 for c in ds.categories)
    assert len(ds) == 2

    sample = ds.load(0)
    assert sample.image_id == 7
    assert sample.labels.tolist() == [1, 0], "the crowd annotation is left out"
    # pycocotools rasterises polygon edges by rounding; compare away from the boundary.
    inner = np.zeros_like(poly_ref)
    inner[3:5, 4:8] = inner[10:11, 21:24] = True
    assert sample.masks[0][inner].all() and (sample.masks[0] & ~_dilate(poly_ref)).sum() == 0
    assert np.array_equal(sample.masks[1], rle_ref)
    # The uncompressed RLE decodes to the crowd region it was built from.
    assert np.array_equal(decode_segmentation({"size": [h, w], "counts": uncompressed}, h, w), crowd_ref)

    empty = ds.load(1)
    assert empty.masks.shape == (0, h, w) and empty.labels.shape == (0,)


def _uncompressed_rle(mask: np.ndarray) -> list[int]:
    """COCO uncompressed RLE: column-major run lengths, starting with a (possibly empty) run of zeros."""
    counts, current, run = [], False, 0
    for value in mask.flatten(order="F"):
        if value != current:
            counts.append(run)
            current, run = value, 0
        run += 1
    return [*counts, run]


def _dilate(mask: np.ndarray) -> np.ndarray:
    """Mask grown by one pixel in each direction (a tolerance band for polygon rasterisation)."""
    out = mask.copy()
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    out[:, 1:] |= out[:, :-1].copy()
    out[:, :-1] |= out[:, 1:].copy()
    return out


def test_bad_inputs(tmp_path):
    _write_png(tmp_path / "images" / "a.png", np.zeros((5, 5, 3), dtype=np.uint8))
    data = {
        "images": [{"id": 1, "file_name": "a.png", "height": 6, "width": 5}],
        "categories": [{"id": 1, "name": "x"}],
        "annotations": [],
    }
    (tmp_path / "a.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="annotated as 5x6"):
        CocoInstances(str(tmp_path / "a.json"), str(tmp_path / "images")).load(0)
    data["annotations"] = [{"id": 1, "image_id": 1, "category_id": 9, "segmentation": [], "iscrowd": 0}]
    (tmp_path / "b.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="unknown category id 9"):
        CocoInstances(str(tmp_path / "b.json"), str(tmp_path / "images"))
    with pytest.raises(ValueError, match="RLE size"):
        decode_segmentation({"size": [3, 3], "counts": [9]}, 4, 4)
    with pytest.raises(ValueError, match="polygon list or an RLE dict"):
        decode_segmentation("nope", 4, 4)
    with pytest.raises(ValueError, match="duplicate category id"):
        contiguous_mapping([{"id": 1}, {"id": 1}])
    with pytest.raises(ValueError, match="masks must be"):
        Sample(np.zeros((2, 2, 3), np.uint8), np.zeros((1, 3, 2), bool), np.zeros(1, np.int64), 0, "x")


@pytest.fixture
def s3_options():
    """A real S3 API (moto's server on a free local port) and the storage options that reach it."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    options = {
        "key": "testing",
        "secret": "testing",
        # Not us-east-1: s3fs sends it as a LocationConstraint when creating a bucket, which S3 rejects.
        "client_kwargs": {"endpoint_url": f"http://{host}:{port}", "region_name": "eu-west-1"},
    }
    yield options
    server.stop()


def test_generate_and_read_on_s3(s3_options):
    import fsspec

    fsspec.filesystem("s3", **s3_options).mkdir("scenes")
    storage = Storage(user_options=s3_options)
    summary = generate("s3://scenes/train", 2, seed=SEED, storage=storage)
    assert summary["panoptic_json"] == "s3://scenes/train/panoptic.json"
    panoptic = CocoPanoptic(summary["panoptic_json"], summary["panoptic_dir"], summary["images"], storage=storage)
    semantic = SemanticMasks(summary["images"], summary["semantic_dir"], SYNTHETIC_CATEGORIES, storage=storage)
    assert len(panoptic) == len(semantic) == 2
    image, segments = _scene(1)
    _check_sample(panoptic.load(1), image, [(s.mask, _index(s.category_id)) for s in segments])
    assert np.array_equal(semantic.load(1).image, image)
    assert panoptic.record(1).image_uri == "s3://scenes/train/images/000002.png"
