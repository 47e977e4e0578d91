"""Presets: parameter counts against closed-form counts and the paper, and a real forward for each.

Expected parameter counts (trainable parameters; frozen BatchNorm statistics and affine are buffers, as in
detectron2), computed by `expected_parameters` below from the official hyper-parameters:

    preset               ours / closed form      paper (Mask2Former, Table 1 / MODEL_ZOO)
    r50_coco_panoptic     43.98 M                 44 M
    r101_coco_panoptic    62.92 M                 63 M
    swin_t_coco_panoptic  47.44 M                 47 M
    swin_s_coco_panoptic  68.75 M                 69 M
    swin_b_coco_panoptic 106.92 M                107 M
    swin_l_coco_panoptic 215.54 M                216 M (200 queries)
"""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch

from m2f.model.config import ModelConfig, ResNetConfig, SwinConfig
from m2f.model.mask2former import build_model
from m2f.model.presets import BACKBONES, DATASETS, PRESETS

pytestmark = pytest.mark.usefixtures("one_thread")


def resnet_parameters(cfg: ResNetConfig) -> int:
    """Convolution weights only: the convolutions have no bias and frozen BatchNorm holds buffers."""
    n = 3 * cfg.stem_channels * 7 * 7
    cin = cfg.stem_channels
    for depth, cout in zip(cfg.depths, cfg.widths, strict=True):
        mid = cout // 4
        for j in range(depth):
            c = cin if j == 0 else cout
            n += c * mid + mid * mid * 9 + mid * cout  # 1x1, 3x3, 1x1
            if j == 0:
                n += c * cout  # projection shortcut
        cin = cout
    return n


def swin_parameters(cfg: SwinConfig) -> int:
    linear = lambda i, o, bias=True: i * o + (o if bias else 0)  # noqa: E731
    c = cfg.embed_dim
    n = 3 * c * cfg.patch_size**2 + c + 2 * c  # patch embedding + its LayerNorm
    for i, (depth, heads) in enumerate(zip(cfg.depths, cfg.num_heads, strict=True)):
        d = c * 2**i
        hidden = int(d * cfg.mlp_ratio)
        block = 2 * d + linear(d, 3 * d) + linear(d, d) + (2 * cfg.window_size - 1) ** 2 * heads
        block += 2 * d + linear(d, hidden) + linear(hidden, d)
        n += depth * block
        if i < len(cfg.depths) - 1:
            n += 2 * 4 * d + linear(4 * d, 2 * d, bias=False)  # patch merging
        n += 2 * d  # the output norm of this stage
    return n


def pixel_decoder_parameters(channels: tuple[int, ...], *, dim=256, mask_dim=256, layers=6, heads=8, ffn=1024) -> int:
    levels, points = 3, 4
    n = sum(c * dim + dim + 2 * dim for c in channels[1:])  # 1x1 conv + GroupNorm for res3..res5
    n += levels * dim  # level embedding
    attn = (dim * heads * levels * points * 2 + heads * levels * points * 2) + (
        dim * heads * levels * points + heads * levels * points
    )
    attn += 2 * (dim * dim + dim)  # value and output projections
    n += layers * (attn + 2 * dim + dim * ffn + ffn + ffn * dim + dim + 2 * dim)
    n += channels[0] * dim + 2 * dim  # lateral 1x1 conv (no bias) + GroupNorm
    n += dim * dim * 9 + 2 * dim  # output 3x3 conv (no bias) + GroupNorm
    return n + dim * mask_dim + mask_dim  # mask features


def decoder_parameters(*, classes: int, queries: int, dim=256, ffn=2048, layers=9) -> int:
    attention = 3 * dim * dim + 3 * dim + dim * dim + dim
    layer = 2 * (attention + 2 * dim) + dim * ffn + ffn + ffn * dim + dim + 2 * dim
    n = 2 * queries * dim + 3 * dim + layers * layer + 2 * dim
    return n + dim * (classes + 1) + classes + 1 + 3 * (dim * dim + dim)  # class head, 3-layer mask MLP


def expected_parameters(cfg: ModelConfig) -> int:
    bb = cfg.backbone
    backbone = resnet_parameters(bb) if isinstance(bb, ResNetConfig) else swin_parameters(bb)
    return (
        backbone
        + pixel_decoder_parameters(bb.out_channels)
        + decoder_parameters(classes=cfg.num_classes, queries=cfg.decoder.num_queries)
    )


def count_on_meta(cfg: ModelConfig) -> int:
    with torch.device("meta"):
        m = build_model(cfg)
    return sum(p.numel() for p in m.parameters())


@functools.cache
def preset_count(name: str) -> int:
    return count_on_meta(PRESETS[name])


# (preset, published size in millions, tolerance in millions)
PUBLISHED = [
    ("r50_coco_panoptic", 44.0, 0.5),
    ("r101_coco_panoptic", 63.0, 0.5),
    ("swin_t_coco_panoptic", 47.0, 0.5),
    ("swin_s_coco_panoptic", 69.0, 0.5),
    ("swin_b_coco_panoptic", 107.0, 0.5),
    ("swin_l_coco_panoptic", 216.0, 1.0),
]


@pytest.mark.parametrize(("name", "millions", "tolerance"), PUBLISHED)
def test_parameter_count_matches_closed_form_and_paper(name, millions, tolerance):
    cfg = PRESETS[name]
    count = preset_count(name)
    assert count == expected_parameters(cfg)
    assert abs(count / 1e6 - millions) <= tolerance, f"{name}: {count / 1e6:.2f} M parameters"


def test_every_preset_builds_with_its_classes():
    assert len(PRESETS) == len(BACKBONES) * len(DATASETS)
    for name, cfg in PRESETS.items():
        assert preset_count(name) == expected_parameters(cfg), name
        assert cfg.num_classes == len(cfg.class_names) == len(cfg.is_thing)
        queries = 200 if cfg.backbone == BACKBONES["swin_l"] and cfg.task != "semantic" else 100
        assert cfg.decoder.num_queries == queries, name
        assert cfg.preprocess.pixel_mean == (123.675, 116.280, 103.530)
        assert cfg.preprocess.pixel_std == (58.395, 57.120, 57.375)
    assert PRESETS["r50_coco_panoptic"].num_classes == 133 and PRESETS["r50_coco_instance"].num_classes == 80
    assert PRESETS["r50_ade20k_semantic"].num_classes == 150 and PRESETS["r50_cityscapes_semantic"].num_classes == 19
    assert sum(PRESETS["r50_coco_panoptic"].is_thing) == 80  # 80 things, 53 stuff
    assert (
        PRESETS["r50_ade20k_semantic"].preprocess.min_size,
        PRESETS["swin_l_ade20k_semantic"].preprocess.min_size,
    ) == (
        512,
        640,
    )
    assert PRESETS["swin_t_cityscapes_semantic"].preprocess.min_size == 1024
    assert (
        PRESETS["swin_l_coco_panoptic"].preprocess.min_size,
        PRESETS["swin_l_coco_panoptic"].preprocess.max_size,
    ) == (
        800,
        1333,
    )


def check_forward(cfg: ModelConfig, size: tuple[int, int], batch: int = 1) -> None:
    torch.manual_seed(0)
    m = build_model(cfg).eval()
    x = torch.randn(batch, 3, *size)
    with torch.inference_mode():
        out = m(x, aux=True)
    q, k = cfg.decoder.num_queries, cfg.num_classes
    assert out.class_logits.shape == (batch, q, k + 1)
    assert out.mask_logits.shape == (batch, q, size[0] // 4, size[1] // 4)
    assert torch.isfinite(out.class_logits).all() and torch.isfinite(out.mask_logits).all()
    assert len(out.aux) == cfg.decoder.num_layers
    for p in out.aux:
        assert p.class_logits.shape == out.class_logits.shape and p.mask_logits.shape == out.mask_logits.shape
    assert out.mask_logits.std() > 0


@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_every_backbone_runs_at_full_width(backbone):
    """The full preset, real weights shape, at 64x64 (Swin's deepest map 2x2, below its window)."""
    check_forward(PRESETS[f"{backbone}_coco_panoptic"], (64, 64))


# A cheap backbone, so each dataset's full-size head (classes, queries, pixel decoder) runs quickly.
CHEAP = ResNetConfig(depths=(1, 1, 1, 1), stem_channels=16, widths=(32, 64, 128, 256))


@pytest.mark.parametrize("dataset", list(DATASETS))
def test_every_dataset_head_runs(dataset):
    """Swin-L's heads: 200 queries for panoptic and instance, 100 for semantic; the full pixel decoder."""
    cfg = dataclasses.replace(PRESETS[f"swin_l_{dataset}"], backbone=CHEAP)
    check_forward(cfg, (64, 96), batch=2)


def test_parameter_figures_in_the_docstring_are_current():
    for name, _, _ in PUBLISHED:
        figure = f"{preset_count(name) / 1e6:.2f} M"
        assert figure in __doc__, f"{name}: {figure}"
