"""The official Mask2Former checkpoints by short name: `coco-panoptic/swin-l`, `ade20k-semantic/r50`, ...

Source: MODEL_ZOO.md of facebookresearch/Mask2Former at commit 9b0651c6c1d5b3af2e6da0589b719c514ec0d69a
(2022-05-20; its image tables are as at 161be514814ea63440fae520d2ec72707b62ba54): every image model of its
tables, with backbone, reported metrics (single-scale unless the metric says "ms+flip") and download URL;
its video models (YouTube-VIS) are left out. The query counts come from the configs it links: 200 for the
Swin-L panoptic and instance models ("Mask2Former (200 queries)" in the tables), 100 everywhere else,
Swin-L semantic included. Two cells of that file disagree with their own config and URL; the table below
follows the config: ADE20K instance Swin-L (listed as "R50") and ADE20K semantic Swin-T (as "Swin-L").

The zoo's file names carry the first 6 hex digits of the file's md5 ("model_final_f07440.pkl"), which
`md5_prefix` exposes for an integrity check. No sha256 is published. `M2F_ZOO_BASE_URL` replaces
`https://dl.fbaipublicfiles.com` in every URL (a mirror, or a test server).
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass

from m2f.model.config import Task

OFFICIAL_BASE_URL = "https://dl.fbaipublicfiles.com"
ZOO_PREFIX = "zoo:"

# Classes per (dataset, task), as the official heads have them (Mapillary Vistas v1.2: 65).
CLASSES: dict[tuple[str, str], int] = {
    ("coco", "panoptic"): 133,
    ("coco", "instance"): 80,
    ("ade20k", "panoptic"): 150,
    ("ade20k", "instance"): 100,
    ("ade20k", "semantic"): 150,
    ("cityscapes", "panoptic"): 19,
    ("cityscapes", "instance"): 8,
    ("cityscapes", "semantic"): 19,
    ("mapillary", "panoptic"): 65,
    ("mapillary", "semantic"): 65,
}

# Our backbone keys (model.presets.BACKBONES) and the ImageNet pre-training of each zoo variant.
_VARIANTS: dict[str, tuple[str, str]] = {
    "r50": ("r50", "IN1k"),
    "r101": ("r101", "IN1k"),
    "swin-t": ("swin_t", "IN1k"),
    "swin-s": ("swin_s", "IN1k"),
    "swin-b": ("swin_b", "IN1k-384"),
    "swin-b-in21k": ("swin_b", "IN21k-384"),
    "swin-l": ("swin_l", "IN21k-384"),
}


@dataclass(frozen=True)
class Entry:
    name: str  # "coco-panoptic/swin-l"
    dataset: str  # coco | ade20k | cityscapes | mapillary (Mapillary Vistas)
    task: Task
    variant: str  # the name's backbone part: "swin-b-in21k"
    queries: int
    metrics: tuple[tuple[str, float], ...]  # as reported, e.g. (("PQ", 57.8), ("AP", 48.6), ("mIoU", 67.4))
    path: str  # below {base}/maskformer/mask2former/

    @property
    def backbone(self) -> str:
        """The backbone's key in `model.presets.BACKBONES` ("swin_b")."""
        return _VARIANTS[self.variant][0]

    @property
    def pretrain(self) -> str:
        return _VARIANTS[self.variant][1]

    @property
    def classes(self) -> int:
        return CLASSES[(self.dataset, self.task)]

    @property
    def url(self) -> str:
        return f"{base_url()}/maskformer/mask2former/{self.path}"

    @property
    def md5_prefix(self) -> str:
        match = re.search(r"_([0-9a-f]{6})\.pkl$", self.path)
        assert match, self.path
        return match.group(1)

    @property
    def preset(self) -> str | None:
        """The `model.presets` name to load this checkpoint with (classes, task, resize), if we have one."""
        from m2f.model.presets import PRESETS

        name = f"{self.backbone}_{self.dataset}_{self.task}"
        return name if name in PRESETS else None

    def metrics_text(self) -> str:
        return ", ".join(f"{name} {value:.1f}" for name, value in self.metrics)


def base_url() -> str:
    return os.environ.get("M2F_ZOO_BASE_URL", OFFICIAL_BASE_URL).rstrip("/")


def _table(dataset: str, task: Task, metrics: tuple[str, ...], rows: list[tuple]) -> list[Entry]:
    """rows: (variant, queries, metric values, path below the dataset/task folder)."""
    folder = {"mapillary": "mapillary_vistas"}.get(dataset, dataset)
    out = []
    for variant, queries, values, file in rows:
        assert len(values) == len(metrics), (dataset, task, variant)
        out.append(
            Entry(
                name=f"{dataset}-{task}/{variant}",
                dataset=dataset,
                task=task,
                variant=variant,
                queries=queries,
                metrics=tuple(zip(metrics, values, strict=True)),
                path=f"{folder}/{task}/{file}",
            )
        )
    return out


_PQ_AP_MIOU = ("PQ", "AP", "mIoU")
_MIOU = ("mIoU", "mIoU (ms+flip)")

_COCO_PANOPTIC = [
    ("r50", 100, (51.9, 41.7, 61.7), "maskformer2_R50_bs16_50ep/model_final_94dc52.pkl"),
    ("r101", 100, (52.6, 42.6, 62.4), "maskformer2_R101_bs16_50ep/model_final_b807bd.pkl"),
    ("swin-t", 100, (53.2, 43.3, 63.2), "maskformer2_swin_tiny_bs16_50ep/model_final_9fd0ae.pkl"),
    ("swin-s", 100, (54.6, 44.7, 64.2), "maskformer2_swin_small_bs16_50ep/model_final_a407fd.pkl"),
    ("swin-b", 100, (55.1, 45.2, 65.1), "maskformer2_swin_base_384_bs16_50ep/model_final_9d7f02.pkl"),
    ("swin-b-in21k", 100, (56.4, 46.3, 67.1), "maskformer2_swin_base_IN21k_384_bs16_50ep/model_final_54b88a.pkl"),
    ("swin-l", 200, (57.8, 48.6, 67.4), "maskformer2_swin_large_IN21k_384_bs16_100ep/model_final_f07440.pkl"),
]

_COCO_INSTANCE = [
    ("r50", 100, (43.7, 30.6), "maskformer2_R50_bs16_50ep/model_final_3c8ec9.pkl"),
    ("r101", 100, (44.2, 31.1), "maskformer2_R101_bs16_50ep/model_final_eba159.pkl"),
    ("swin-t", 100, (45.0, 31.8), "maskformer2_swin_tiny_bs16_50ep/model_final_86143f.pkl"),
    ("swin-s", 100, (46.3, 32.9), "maskformer2_swin_small_bs16_50ep/model_final_1e7f22.pkl"),
    ("swin-b", 100, (46.7, 33.2), "maskformer2_swin_base_384_bs16_50ep/model_final_f6e0f6.pkl"),
    ("swin-b-in21k", 100, (48.1, 34.4), "maskformer2_swin_base_IN21k_384_bs16_50ep/model_final_83d103.pkl"),
    ("swin-l", 200, (50.1, 36.2), "maskformer2_swin_large_IN21k_384_bs16_100ep/model_final_e5f453.pkl"),
]

_CITYSCAPES_PANOPTIC = [
    ("r50", 100, (62.1, 37.3, 77.5), "maskformer2_R50_bs16_90k/model_final_4ab90c.pkl"),
    ("r101", 100, (62.4, 37.7, 78.6), "maskformer2_R101_bs16_90k/model_final_04d286.pkl"),
    ("swin-t", 100, (63.9, 39.1, 80.5), "maskformer2_swin_tiny_bs16_90k/model_final_ceba0f.pkl"),
    ("swin-s", 100, (64.8, 40.7, 81.8), "maskformer2_swin_small_bs16_90k/model_final_23efb7.pkl"),
    ("swin-b-in21k", 100, (66.1, 42.8, 82.7), "maskformer2_swin_base_IN21k_384_bs16_90k/model_final_fa840f.pkl"),
    ("swin-l", 200, (66.6, 43.6, 82.9), "maskformer2_swin_large_IN21k_384_bs16_90k/model_final_064788.pkl"),
]

_CITYSCAPES_INSTANCE = [
    ("r50", 100, (37.4, 61.9), "maskformer2_R50_bs16_90k/model_final_01a8ed.pkl"),
    ("r101", 100, (38.5, 63.9), "maskformer2_R101_bs16_90k/model_final_c2b8c8.pkl"),
    ("swin-t", 100, (39.7, 66.9), "maskformer2_swin_tiny_bs16_90k/model_final_6a63f8.pkl"),
    ("swin-s", 100, (41.8, 70.4), "maskformer2_swin_small_bs16_90k/model_final_974824.pkl"),
    ("swin-b-in21k", 100, (42.0, 68.8), "maskformer2_swin_base_IN21k_384_bs16_90k/model_final_7a3b6d.pkl"),
    ("swin-l", 200, (43.7, 71.4), "maskformer2_swin_large_IN21k_384_bs16_90k/model_final_dfa862.pkl"),
]

_CITYSCAPES_SEMANTIC = [
    ("r50", 100, (79.4, 82.2), "maskformer2_R50_bs16_90k/model_final_cc1b1f.pkl"),
    ("r101", 100, (80.1, 81.9), "maskformer2_R101_bs16_90k/model_final_257ce8.pkl"),
    ("swin-t", 100, (82.1, 83.0), "maskformer2_swin_tiny_bs16_90k/model_final_2d58d4.pkl"),
    ("swin-s", 100, (82.6, 83.6), "maskformer2_swin_small_bs16_90k/model_final_fa26ae.pkl"),
    ("swin-b-in21k", 100, (83.3, 84.5), "maskformer2_swin_base_IN21k_384_bs16_90k/model_final_1c6b65.pkl"),
    ("swin-l", 100, (83.3, 84.3), "maskformer2_swin_large_IN21k_384_bs16_90k/model_final_17c1ee.pkl"),
]

_ADE20K_PANOPTIC = [
    ("r50", 100, (39.7, 26.5, 46.1), "maskformer2_R50_bs16_160k/model_final_5c90d4.pkl"),
    ("swin-l", 200, (48.1, 34.2, 54.5), "maskformer2_swin_large_IN21k_384_bs16_160k/model_final_e0c58e.pkl"),
]

_ADE20K_INSTANCE = [
    ("r50", 100, (26.4,), "maskformer2_R50_bs16_160k/model_final_67e945.pkl"),
    ("swin-l", 200, (34.9,), "maskformer2_swin_large_IN21k_384_bs16_160k/model_final_92dae9.pkl"),
]

_ADE20K_SEMANTIC = [
    ("r50", 100, (47.2, 49.2), "maskformer2_R50_bs16_160k/model_final_500878.pkl"),
    # 160k iterations despite the "90k" in its file name
    ("r101", 100, (47.8, 50.1), "maskformer2_R101_bs16_90k/model_final_0d68be.pkl"),
    ("swin-t", 100, (47.7, 49.6), "maskformer2_swin_tiny_bs16_160k/model_final_5274a6.pkl"),
    ("swin-s", 100, (51.3, 52.4), "maskformer2_swin_small_bs16_160k/model_final_011c6d.pkl"),
    ("swin-b", 100, (52.4, 53.7), "maskformer2_swin_base_384_bs16_160k_res640/model_final_503e96.pkl"),
    ("swin-b-in21k", 100, (53.9, 55.1), "maskformer2_swin_base_IN21k_384_bs16_160k_res640/model_final_7e47bf.pkl"),
    ("swin-l", 100, (56.1, 57.3), "maskformer2_swin_large_IN21k_384_bs16_160k_res640/model_final_6b4a3a.pkl"),
]

_MAPILLARY_PANOPTIC = [
    ("r50", 100, (36.3, 50.7), "maskformer_R50_bs16_300k/model_final_4e9874.pkl"),
    ("swin-l", 200, (45.5, 60.8), "maskformer2_swin_large_IN21k_384_bs16_300k/model_final_132c71.pkl"),
]

_MAPILLARY_SEMANTIC = [
    ("r50", 100, (57.4, 59.0), "maskformer_R50_bs16_300k/model_final_6c66d0.pkl"),
    ("swin-l", 100, (63.2, 64.7), "maskformer2_swin_large_IN21k_384_bs16_300k/model_final_90ee2d.pkl"),
]

_ENTRIES: list[Entry] = [
    *_table("coco", "panoptic", _PQ_AP_MIOU, _COCO_PANOPTIC),
    *_table("coco", "instance", ("AP", "Boundary AP"), _COCO_INSTANCE),
    *_table("cityscapes", "panoptic", _PQ_AP_MIOU, _CITYSCAPES_PANOPTIC),
    *_table("cityscapes", "instance", ("AP", "AP50"), _CITYSCAPES_INSTANCE),
    *_table("cityscapes", "semantic", _MIOU, _CITYSCAPES_SEMANTIC),
    *_table("ade20k", "panoptic", _PQ_AP_MIOU, _ADE20K_PANOPTIC),
    *_table("ade20k", "instance", ("AP",), _ADE20K_INSTANCE),
    *_table("ade20k", "semantic", _MIOU, _ADE20K_SEMANTIC),
    *_table("mapillary", "panoptic", ("PQ", "mIoU"), _MAPILLARY_PANOPTIC),
    *_table("mapillary", "semantic", _MIOU, _MAPILLARY_SEMANTIC),
]
_BY_NAME: dict[str, Entry] = {e.name: e for e in _ENTRIES}
assert len(_BY_NAME) == len(_ENTRIES), "zoo names must be unique"


def entries() -> tuple[Entry, ...]:
    """Every checkpoint, in MODEL_ZOO.md's order (COCO, Cityscapes, ADE20K, Mapillary Vistas)."""
    return tuple(_ENTRIES)


def is_zoo_name(name: str) -> bool:
    return name.removeprefix(ZOO_PREFIX) in _BY_NAME


def find(name: str) -> Entry:
    """The entry for `zoo:NAME` or `NAME`; ValueError naming the closest names for an unknown one."""
    short = name.removeprefix(ZOO_PREFIX)
    if short in _BY_NAME:
        return _BY_NAME[short]
    close = difflib.get_close_matches(short, list(_BY_NAME), n=4, cutoff=0.5)
    hint = f"; did you mean {', '.join(ZOO_PREFIX + c for c in close)}?" if close else ""
    raise ValueError(f"unknown model zoo name {name!r}{hint} (`m2f models list` shows them all)")
