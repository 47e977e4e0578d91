"""Frozen dataclass configs for every part of the model.

`ModelConfig` is the one object that travels: the builder (`model.build_model`, in
model/mask2former.py) turns it into modules, checkpoints store it as JSON (`to_dict` / `from_dict`),
and the batch job reads its class names, preprocessing rule and default task from it. Nothing below
the builder receives a config: `ResNet`, `SwinTransformer` and the decoders take plain arguments.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

Task = Literal["semantic", "instance", "panoptic"]
TASKS: tuple[str, ...] = ("semantic", "instance", "panoptic")


@dataclass(frozen=True)
class ResNetConfig:
    """torchvision-style bottleneck ResNet (stride in the 3x3 conv)."""

    depths: tuple[int, ...] = (3, 4, 6, 3)
    stem_channels: int = 64
    # Output channels of res2..res5; the bottleneck width is a quarter of each.
    widths: tuple[int, ...] = (256, 512, 1024, 2048)
    # "frozen_bn": statistics and affine fixed (official fine-tuning); "bn": trainable BatchNorm,
    # for training a small backbone from scratch (the demo model).
    norm: Literal["frozen_bn", "bn"] = "frozen_bn"
    # detectron2's STRIDE_IN_1X1 / HF's downsample_in_bottleneck; Mask2Former's own configs use False.
    stride_in_1x1: bool = False
    kind: Literal["resnet"] = "resnet"

    @property
    def out_channels(self) -> tuple[int, ...]:
        return tuple(self.widths)


@dataclass(frozen=True)
class SwinConfig:
    """Swin Transformer as used by the official Mask2Former (D2SwinTransformer)."""

    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: int = 7
    patch_size: int = 4
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_path_rate: float = 0.3  # official training value; inactive at inference
    layer_norm_eps: float = 1e-5
    kind: Literal["swin"] = "swin"

    @property
    def out_channels(self) -> tuple[int, ...]:
        return tuple(self.embed_dim * 2**i for i in range(len(self.depths)))


BackboneConfig = ResNetConfig | SwinConfig


@dataclass(frozen=True)
class PixelDecoderConfig:
    """Multi-scale deformable-attention pixel decoder (MSDeformAttnPixelDecoder)."""

    conv_dim: int = 256
    mask_dim: int = 256
    num_layers: int = 6
    num_heads: int = 8
    num_points: int = 4
    ffn_dim: int = 1024
    num_groups: int = 32  # GroupNorm groups of every projection
    dropout: float = 0.0


@dataclass(frozen=True)
class DecoderConfig:
    """Masked-attention transformer decoder (MultiScaleMaskedTransformerDecoder)."""

    hidden_dim: int = 256
    num_queries: int = 100
    num_heads: int = 8
    ffn_dim: int = 2048
    num_layers: int = 9  # round-robin over 1/32, 1/16, 1/8
    pre_norm: bool = False
    enforce_input_projection: bool = False
    dropout: float = 0.0


@dataclass(frozen=True)
class PreprocessConfig:
    """Test-time resize, normalisation and padding (detectron2 conventions)."""

    pixel_mean: tuple[float, float, float] = (123.675, 116.280, 103.530)  # RGB, 0-255
    pixel_std: tuple[float, float, float] = (58.395, 57.120, 57.375)
    min_size: int = 800  # shortest edge; 0 keeps the image size
    max_size: int = 1333  # longest-edge cap after the shortest-edge resize
    size_divisibility: int = 32


@dataclass(frozen=True)
class PostprocessConfig:
    """Official inference thresholds (MaskFormer/Mask2Former `*_inference`)."""

    object_mask_threshold: float = 0.8
    overlap_threshold: float = 0.8
    instance_top_k: int = 100
    # With a panoptic model, instance output keeps thing classes only (official behaviour).
    instance_things_only: bool = True


@dataclass(frozen=True)
class ModelConfig:
    name: str
    backbone: BackboneConfig
    num_classes: int
    class_names: tuple[str, ...]
    is_thing: tuple[bool, ...]
    task: Task = "panoptic"
    pixel_decoder: PixelDecoderConfig = field(default_factory=PixelDecoderConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    postprocess: PostprocessConfig = field(default_factory=PostprocessConfig)
    # Dataset category ids of the contiguous classes (COCO's 1..200 with gaps); empty = 0..K-1.
    category_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if len(self.class_names) != self.num_classes:
            raise ValueError(f"{self.name}: {len(self.class_names)} class names for {self.num_classes} classes")
        if len(self.is_thing) != self.num_classes:
            raise ValueError(f"{self.name}: {len(self.is_thing)} thing flags for {self.num_classes} classes")
        if self.category_ids and len(self.category_ids) != self.num_classes:
            raise ValueError(f"{self.name}: {len(self.category_ids)} category ids for {self.num_classes} classes")
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")

    def category_id(self, label: int) -> int:
        """Dataset category id of contiguous class `label`."""
        return self.category_ids[label] if self.category_ids else label

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(data: dict[str, Any]) -> ModelConfig:
        data = dict(data)
        bb = dict(data.pop("backbone"))
        kind = bb.get("kind", "resnet")
        if kind not in ("resnet", "swin"):
            raise ValueError(f"unknown backbone kind {kind!r}")
        backbone = (ResNetConfig if kind == "resnet" else SwinConfig)(**_tuples(bb))
        parts = {
            "pixel_decoder": PixelDecoderConfig,
            "decoder": DecoderConfig,
            "preprocess": PreprocessConfig,
            "postprocess": PostprocessConfig,
        }
        kwargs = {k: cls(**_tuples(data.pop(k))) for k, cls in parts.items() if k in data}
        return ModelConfig(backbone=backbone, **kwargs, **_tuples(data))


def _tuples(d: dict[str, Any]) -> dict[str, Any]:
    """JSON gives lists; frozen configs hold tuples (hashable, immutable)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
