"""Named configurations of the official model zoo: backbone × dataset.

`PRESETS["r50_coco_panoptic"]` etc. are plain `ModelConfig`s built from two small tables: the
backbones (official hyper-parameters) and the datasets (classes, thing/stuff flags, default task,
test-time resize). No registry: a dict of names, and two functions for checkpoints that arrive
without a name (`class_metadata` guesses the dataset from its labels or its class count).
"""

from __future__ import annotations

from dataclasses import dataclass

from m2f.model import categories as cats
from m2f.model.config import (
    DecoderConfig,
    ModelConfig,
    PixelDecoderConfig,
    PreprocessConfig,
    ResNetConfig,
    SwinConfig,
    Task,
)

BACKBONES: dict[str, ResNetConfig | SwinConfig] = {
    "r50": ResNetConfig(depths=(3, 4, 6, 3)),
    "r101": ResNetConfig(depths=(3, 4, 23, 3)),
    "swin_t": SwinConfig(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7),
    "swin_s": SwinConfig(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), window_size=7),
    "swin_b": SwinConfig(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), window_size=12),
    "swin_l": SwinConfig(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48), window_size=12),
}


@dataclass(frozen=True)
class Architecture:
    """Everything but the classes: what `m2f train --arch NAME` builds from scratch."""

    backbone: ResNetConfig | SwinConfig
    pixel_decoder: PixelDecoderConfig = PixelDecoderConfig()
    decoder: DecoderConfig = DecoderConfig()


ARCHITECTURES: dict[str, Architecture] = {name: Architecture(bb) for name, bb in BACKBONES.items()}
# The bundled demo model: ~2 M parameters (8 MB) so that it trains on a CPU and ships in the repo.
# Trainable BatchNorm, since there is no pre-trained backbone to freeze.
ARCHITECTURES["tiny"] = Architecture(
    backbone=ResNetConfig(depths=(1, 2, 2, 1), stem_channels=32, widths=(64, 128, 256, 512), norm="bn"),
    pixel_decoder=PixelDecoderConfig(conv_dim=96, mask_dim=96, num_layers=3, num_heads=4, ffn_dim=384),
    decoder=DecoderConfig(hidden_dim=96, num_queries=20, num_heads=4, ffn_dim=384, num_layers=6),
)


@dataclass(frozen=True)
class Dataset:
    categories: tuple[cats.Category, ...]
    task: Task
    min_size: int
    max_size: int
    # Swin-B/L (384-pretrained) ADE20K models test at 640 instead of 512.
    large_min_size: int | None = None
    large_max_size: int | None = None


DATASETS: dict[str, Dataset] = {
    "coco_panoptic": Dataset(cats.COCO_PANOPTIC, "panoptic", 800, 1333),
    "coco_instance": Dataset(cats.COCO_INSTANCE, "instance", 800, 1333),
    "ade20k_semantic": Dataset(cats.ADE20K_150, "semantic", 512, 2048, 640, 2560),
    "ade20k_panoptic": Dataset(cats.ADE20K_150_PANOPTIC, "panoptic", 640, 2560),
    "ade20k_instance": Dataset(cats.ADE20K_100, "instance", 640, 2560),
    "cityscapes_semantic": Dataset(cats.CITYSCAPES_19, "semantic", 1024, 2048),
    "cityscapes_panoptic": Dataset(cats.CITYSCAPES_19, "panoptic", 1024, 2048),
    "cityscapes_instance": Dataset(cats.CITYSCAPES_8, "instance", 1024, 2048),
    "mapillary_semantic": Dataset(cats.MAPILLARY_65, "semantic", 2048, 2048),
    "mapillary_panoptic": Dataset(cats.MAPILLARY_65, "panoptic", 2048, 2048),
}


def preset(backbone: str, dataset: str) -> ModelConfig:
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; choose from {sorted(BACKBONES)}")
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose from {sorted(DATASETS)}")
    ds = DATASETS[dataset]
    large = backbone in ("swin_b", "swin_l") and ds.large_min_size is not None
    # Swin-L uses 200 queries except for semantic segmentation (official configs).
    queries = 200 if backbone == "swin_l" and ds.task != "semantic" else 100
    return ModelConfig(
        name=f"{backbone}_{dataset}",
        backbone=BACKBONES[backbone],
        num_classes=len(ds.categories),
        class_names=cats.names(ds.categories),
        is_thing=cats.thing_flags(ds.categories),
        category_ids=cats.category_ids(ds.categories),
        task=ds.task,
        decoder=DecoderConfig(num_queries=queries),
        preprocess=PreprocessConfig(
            min_size=ds.large_min_size if large else ds.min_size,
            max_size=ds.large_max_size if large else ds.max_size,
        ),
    )


PRESETS: dict[str, ModelConfig] = {f"{b}_{d}": preset(b, d) for b in BACKBONES for d in DATASETS}


@dataclass(frozen=True)
class ClassMetadata:
    dataset: str | None
    is_thing: tuple[bool, ...]
    category_ids: tuple[int, ...]
    task: Task


# Class count -> dataset, for checkpoints that carry no names (detectron2 .pkl files).
_BY_COUNT = {133: "coco_panoptic", 80: "coco_instance", 150: "ade20k_semantic", 19: "cityscapes_semantic"}


def class_metadata(labels: tuple[str, ...] | int) -> ClassMetadata:
    """Thing flags, dataset ids and default task for a checkpoint's classes.

    Known datasets are recognised by their label names (HF's id2label) or, without names, by the
    class count. Unknown label sets are treated as all things with panoptic output; users can
    override the task per run.
    """
    count = labels if isinstance(labels, int) else len(labels)
    dataset = None
    if isinstance(labels, tuple):
        norm = tuple(name.strip().lower() for name in labels)
        for name, ds in DATASETS.items():
            if norm == tuple(c.name.strip().lower() for c in ds.categories):
                dataset = name
                break
    elif count in _BY_COUNT:
        dataset = _BY_COUNT[count]
    if dataset is None:
        return ClassMetadata(None, (True,) * count, tuple(range(count)), "panoptic")
    ds = DATASETS[dataset]
    return ClassMetadata(dataset, cats.thing_flags(ds.categories), cats.category_ids(ds.categories), ds.task)


def dataset_names(dataset: str | None, count: int) -> tuple[str, ...]:
    """Class names of a known dataset, else generic `class_<i>`."""
    if dataset is not None:
        return cats.names(DATASETS[dataset].categories)
    return tuple(f"class_{i}" for i in range(count))


def preprocess_for(dataset: str | None, large_backbone: bool = False) -> PreprocessConfig:
    """The official test-time resize for a dataset (COCO's 800/1333 when unknown)."""
    if dataset is None:
        return PreprocessConfig()
    ds = DATASETS[dataset]
    if large_backbone and ds.large_min_size is not None:
        return PreprocessConfig(min_size=ds.large_min_size, max_size=ds.large_max_size or ds.max_size)
    return PreprocessConfig(min_size=ds.min_size, max_size=ds.max_size)
