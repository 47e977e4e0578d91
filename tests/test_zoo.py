"""The model zoo catalog: names, URLs and reported numbers, and each entry's architecture against our presets."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator

import pytest

from m2f.model import zoo
from m2f.model.presets import BACKBONES, PRESETS
from tests import net_guard

# What each variant's URL says about its backbone, as the zoo names its configs.
URL_BACKBONE = {
    "r50": "maskformer2?_R50_",
    "r101": "maskformer2_R101_",
    "swin-t": "maskformer2_swin_tiny_",
    "swin-s": "maskformer2_swin_small_",
    "swin-b": "maskformer2_swin_base_384_",
    "swin-b-in21k": "maskformer2_swin_base_IN21k_384_",
    "swin-l": "maskformer2_swin_large_IN21k_384_",
}


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    attempts = net_guard.install(monkeypatch)
    yield
    assert not attempts, f"connections beyond 127.0.0.1: {attempts}"


def test_every_table_of_the_model_zoo_is_here():
    counts = Counter(f"{e.dataset}-{e.task}" for e in zoo.entries())
    assert counts == {
        "coco-panoptic": 7,
        "coco-instance": 7,
        "cityscapes-panoptic": 6,
        "cityscapes-instance": 6,
        "cityscapes-semantic": 6,
        "ade20k-panoptic": 2,
        "ade20k-instance": 2,
        "ade20k-semantic": 7,
        "mapillary-panoptic": 2,
        "mapillary-semantic": 2,
    }
    names = [e.name for e in zoo.entries()]
    assert len(set(names)) == len(names) == 47
    for e in zoo.entries():
        assert e.name == f"{e.dataset}-{e.task}/{e.variant}"


@pytest.mark.parametrize("entry", zoo.entries(), ids=lambda e: e.name)
def test_url_agrees_with_the_entry(entry: zoo.Entry):
    folder = {"mapillary": "mapillary_vistas"}.get(entry.dataset, entry.dataset)
    prefix = f"https://dl.fbaipublicfiles.com/maskformer/mask2former/{folder}/{entry.task}/"
    assert entry.url.startswith(prefix)
    config, file = entry.url[len(prefix) :].split("/")
    assert re.match(URL_BACKBONE[entry.variant], config), (config, entry.variant)
    assert re.fullmatch(r"model_final_[0-9a-f]{6}\.pkl", file)
    assert file == f"model_final_{entry.md5_prefix}.pkl"
    assert ("IN21k" in config) == entry.pretrain.startswith("IN21k")


@pytest.mark.parametrize("entry", zoo.entries(), ids=lambda e: e.name)
def test_reported_metrics_fit_the_task(entry: zoo.Entry):
    first = {"panoptic": "PQ", "instance": "AP", "semantic": "mIoU"}[entry.task]
    assert entry.metrics[0][0] == first
    assert all(0 < value < 100 for _, value in entry.metrics)
    # 200 queries exactly for the Swin-L models the zoo marks "(200 queries)": panoptic and instance
    assert entry.queries == (200 if entry.variant == "swin-l" and entry.task != "semantic" else 100)


def test_numbers_as_the_model_zoo_reports_them():
    # a few cells of MODEL_ZOO.md, checked by eye against the official file
    assert dict(zoo.find("coco-panoptic/swin-l").metrics) == {"PQ": 57.8, "AP": 48.6, "mIoU": 67.4}
    assert dict(zoo.find("coco-instance/swin-b-in21k").metrics) == {"AP": 48.1, "Boundary AP": 34.4}
    assert dict(zoo.find("ade20k-semantic/swin-l").metrics) == {"mIoU": 56.1, "mIoU (ms+flip)": 57.3}
    assert dict(zoo.find("cityscapes-instance/r50").metrics) == {"AP": 37.4, "AP50": 61.9}
    assert dict(zoo.find("mapillary-panoptic/swin-l").metrics) == {"PQ": 45.5, "mIoU": 60.8}
    assert zoo.find("coco-panoptic/swin-l").url.endswith(
        "/coco/panoptic/maskformer2_swin_large_IN21k_384_bs16_100ep/model_final_f07440.pkl"
    )
    assert zoo.find("coco-panoptic/swin-l").metrics_text() == "PQ 57.8, AP 48.6, mIoU 67.4"


@pytest.mark.parametrize("entry", zoo.entries(), ids=lambda e: e.name)
def test_architecture_matches_the_preset(entry: zoo.Entry):
    assert entry.preset is not None, entry  # every official checkpoint loads with its class names
    preset = PRESETS[entry.preset]
    assert entry.preset == f"{entry.backbone}_{entry.dataset}_{entry.task}"
    assert preset.backbone == BACKBONES[entry.backbone]
    assert preset.decoder.num_queries == entry.queries
    assert preset.num_classes == entry.classes
    assert preset.task == entry.task


def test_presets_cover_the_large_resize_of_the_640_models():
    # the res640 ADE20K semantic models (Swin-B/L) test at 640, the others at 512
    assert PRESETS[zoo.find("ade20k-semantic/swin-b-in21k").preset].preprocess.min_size == 640
    assert PRESETS[zoo.find("ade20k-semantic/swin-l").preset].preprocess.min_size == 640
    assert PRESETS[zoo.find("ade20k-semantic/swin-s").preset].preprocess.min_size == 512


def test_find_takes_the_prefix_or_not_and_suggests_close_names():
    assert zoo.find("zoo:coco-panoptic/swin-l") is zoo.find("coco-panoptic/swin-l")
    assert zoo.is_zoo_name("zoo:ade20k-semantic/r50") and zoo.is_zoo_name("ade20k-semantic/r50")
    assert not zoo.is_zoo_name("facebook/mask2former-swin-large-coco-panoptic")
    with pytest.raises(ValueError, match=r"did you mean zoo:coco-panoptic/swin-l") as info:
        zoo.find("zoo:coco-panoptic/swin-xl")
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="unknown model zoo name 'nothing-like-it'"):
        zoo.find("nothing-like-it")


def test_base_url_from_the_environment(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("M2F_ZOO_BASE_URL", "http://127.0.0.1:8123/")
    url = zoo.find("cityscapes-semantic/r101").url
    assert url == (
        "http://127.0.0.1:8123/maskformer/mask2former/cityscapes/semantic/maskformer2_R101_bs16_90k/model_final_257ce8.pkl"
    )
    monkeypatch.delenv("M2F_ZOO_BASE_URL")
    assert zoo.find("cityscapes-semantic/r101").url.startswith("https://dl.fbaipublicfiles.com/")
