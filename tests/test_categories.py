"""Dataset class metadata: counts, uniqueness, order and a few known positions."""

from __future__ import annotations

import dataclasses

import pytest

from m2f.model import categories as C
from m2f.model.categories import Category, category_ids, names, thing_flags

ALL = {
    "COCO_PANOPTIC": C.COCO_PANOPTIC,
    "COCO_INSTANCE": C.COCO_INSTANCE,
    "ADE20K_150": C.ADE20K_150,
    "ADE20K_150_PANOPTIC": C.ADE20K_150_PANOPTIC,
    "CITYSCAPES_19": C.CITYSCAPES_19,
}


@pytest.mark.parametrize(
    ("key", "count", "things"),
    [
        ("COCO_PANOPTIC", 133, 80),
        ("COCO_INSTANCE", 80, 80),
        ("ADE20K_150", 150, 0),
        ("ADE20K_150_PANOPTIC", 150, 100),
        ("CITYSCAPES_19", 19, 8),
    ],
)
def test_counts(key, count, things):
    cats = ALL[key]
    assert isinstance(cats, tuple)
    assert all(isinstance(c, Category) for c in cats)
    assert len(cats) == count
    assert sum(thing_flags(cats)) == things


@pytest.mark.parametrize("key", sorted(ALL))
def test_unique_ids_and_names(key):
    cats = ALL[key]
    assert len(set(category_ids(cats))) == len(cats)
    assert len(set(names(cats))) == len(cats)
    assert all(isinstance(n, str) and n for n in names(cats))


def test_helpers_and_frozen():
    cats = C.CITYSCAPES_19
    assert names(cats)[:3] == ("road", "sidewalk", "building")
    assert category_ids(cats)[:3] == (7, 8, 11)
    assert thing_flags(cats)[:3] == (False, False, False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cats[0].name = "x"  # type: ignore[misc]


def test_coco_panoptic():
    cats = C.COCO_PANOPTIC
    flags = thing_flags(cats)
    # 80 things first, then 53 stuff.
    assert flags == (True,) * 80 + (False,) * 53
    ids = category_ids(cats)
    assert list(ids) == sorted(ids)
    assert min(ids) == 1 and max(ids) == 200
    assert cats[0] == Category(1, "person", True)
    assert cats[1] == Category(2, "bicycle", True)
    assert cats[11] == Category(13, "stop sign", True)
    assert cats[62] == Category(72, "tv", True)
    assert cats[79] == Category(90, "toothbrush", True)
    assert cats[80] == Category(92, "banner", False)
    assert cats[131] == Category(199, "wall-other-merged", False)
    assert cats[132] == Category(200, "rug-merged", False)


def test_coco_instance_is_thing_subset_of_panoptic():
    things = tuple(c for c in C.COCO_PANOPTIC if c.isthing)
    assert things == C.COCO_INSTANCE
    assert category_ids(C.COCO_INSTANCE) == category_ids(C.COCO_PANOPTIC)[:80]
    assert names(C.COCO_INSTANCE)[-1] == "toothbrush"


def test_ade20k():
    sem, pan = C.ADE20K_150, C.ADE20K_150_PANOPTIC
    assert category_ids(sem) == tuple(range(150)) == category_ids(pan)
    assert names(sem) == names(pan)
    assert not any(thing_flags(sem))
    n = names(sem)
    assert n[0] == "wall"
    assert n[1] == "building"
    assert n[2] == "sky"
    assert n[12] == "person"
    assert n[20] == "car"
    assert n[149] == "flag"
    assert pan[0].isthing is False  # wall
    assert pan[2].isthing is False  # sky
    assert pan[7] == Category(7, "bed", True)
    assert pan[12].isthing is True  # person
    assert pan[149].isthing is True  # flag


def test_cityscapes():
    cats = C.CITYSCAPES_19
    assert names(cats) == (
        "road",
        "sidewalk",
        "building",
        "wall",
        "fence",
        "pole",
        "traffic light",
        "traffic sign",
        "vegetation",
        "terrain",
        "sky",
        "person",
        "rider",
        "car",
        "truck",
        "bus",
        "train",
        "motorcycle",
        "bicycle",
    )
    assert category_ids(cats) == (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)
    assert thing_flags(cats) == (False,) * 11 + (True,) * 8


def test_the_ade20k_instance_classes_are_the_instance100_mapping() -> None:
    """Mask2Former's datasets/ade20k_instance_catid_mapping.txt: Instance100 class i is SceneParse150 class k
    (1-based); these are its k, transcribed."""
    from m2f.model.categories import ADE20K_100, ADE20K_150

    scene_parse = (
        8, 9, 11, 13, 15, 16, 19, 20, 21, 23, 24, 25, 28, 31, 32, 33, 34, 36, 37, 38, 39, 40, 42, 43, 44, 45, 46, 48,
        50, 51, 54, 56, 57, 58, 59, 63, 65, 66, 67, 68, 70, 71, 72, 73, 74, 75, 76, 77, 79, 81, 82, 83, 84, 86, 87,
        88, 89, 90, 91, 93, 94, 96, 98, 99, 103, 104, 105, 108, 109, 111, 112, 113, 116, 117, 119, 120, 121, 122,
        124, 125, 126, 127, 128, 130, 131, 133, 134, 135, 136, 137, 138, 139, 140, 143, 144, 145, 147, 148, 149, 150,
    )  # fmt: skip
    assert [c.name for c in ADE20K_100] == [ADE20K_150[k - 1].name for k in scene_parse]
    assert [c.id for c in ADE20K_100] == list(range(1, 101)) and all(c.isthing for c in ADE20K_100)
