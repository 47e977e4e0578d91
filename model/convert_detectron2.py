"""Official (detectron2) Mask2Former checkpoints -> our config and state dict.

The model zoo's `model_final_*.pkl` is a pickled dict whose `model` entry maps detectron2 names
(`backbone.*`, `sem_seg_head.pixel_decoder.*`, `sem_seg_head.predictor.*`) to numpy arrays; `.pth`
files hold the same names as tensors. The architecture is read off the weights' shapes, so a
checkpoint loads without naming a preset; naming one only supplies class names and resize rule.
"""

from __future__ import annotations

import math
import re

import torch
from torch import Tensor

from m2f.model.config import DecoderConfig, ModelConfig, PixelDecoderConfig, PreprocessConfig, ResNetConfig, SwinConfig
from m2f.model.keymap import CheckpointMismatch, KeyMap
from m2f.model.presets import PRESETS, class_metadata, dataset_names, preprocess_for

PD_NAME, PR_NAME = "sem_seg_head.pixel_decoder.", "sem_seg_head.predictor."
PD, PR = re.escape(PD_NAME), re.escape(PR_NAME)

D2_KEYMAP = KeyMap(
    rules=(
        # --- ResNet
        (r"backbone\.stem\.conv1\.weight", r"backbone.stem.conv.weight"),
        (r"backbone\.stem\.conv1\.norm\.(\w+)", r"backbone.stem.norm.\1"),
        (
            r"backbone\.res(\d)\.(\d+)\.(conv\d|shortcut)\.weight",
            lambda m: f"backbone.stages.{int(m[1]) - 2}.{m[2]}.{m[3]}.conv.weight",
        ),
        (
            r"backbone\.res(\d)\.(\d+)\.(conv\d|shortcut)\.norm\.(\w+)",
            lambda m: f"backbone.stages.{int(m[1]) - 2}.{m[2]}.{m[3]}.norm.{m[4]}",
        ),
        # --- Swin
        (r"backbone\.patch_embed\.proj\.(weight|bias)", r"backbone.patch_embed.\1"),
        (r"backbone\.patch_embed\.norm\.(weight|bias)", r"backbone.patch_norm.\1"),
        (
            r"backbone\.layers\.(\d+)\.blocks\.(\d+)\.(norm1|norm2|attn\.qkv|attn\.proj)\.(weight|bias)",
            r"backbone.stages.\1.blocks.\2.\3.\4",
        ),
        (
            r"backbone\.layers\.(\d+)\.blocks\.(\d+)\.attn\.relative_position_bias_table",
            r"backbone.stages.\1.blocks.\2.attn.relative_position_bias_table",
        ),
        (r"backbone\.layers\.(\d+)\.blocks\.(\d+)\.mlp\.fc1\.(weight|bias)", r"backbone.stages.\1.blocks.\2.mlp.0.\3"),
        (r"backbone\.layers\.(\d+)\.blocks\.(\d+)\.mlp\.fc2\.(weight|bias)", r"backbone.stages.\1.blocks.\2.mlp.2.\3"),
        (
            r"backbone\.layers\.(\d+)\.downsample\.(reduction|norm)\.(weight|bias)",
            r"backbone.stages.\1.downsample.\2.\3",
        ),
        (r"backbone\.norm(\d)\.(weight|bias)", r"backbone.norms.\1.\2"),
        # --- pixel decoder
        (PD + r"input_proj\.(\d)\.(\d)\.(weight|bias)", r"pixel_decoder.input_proj.\1.\2.\3"),
        (PD + r"transformer\.level_embed", r"pixel_decoder.level_embed"),
        (
            PD + r"transformer\.encoder\.layers\.(\d+)\.(self_attn\.\w+|norm1|norm2|linear1|linear2)\.(weight|bias)",
            r"pixel_decoder.layers.\1.\2.\3",
        ),
        (PD + r"adapter_1\.weight", r"pixel_decoder.lateral.0.weight"),
        (PD + r"adapter_1\.norm\.(weight|bias)", r"pixel_decoder.lateral.1.\1"),
        (PD + r"layer_1\.weight", r"pixel_decoder.output.0.weight"),
        (PD + r"layer_1\.norm\.(weight|bias)", r"pixel_decoder.output.1.\1"),
        (PD + r"mask_features\.(weight|bias)", r"pixel_decoder.mask_features.\1"),
        # --- transformer decoder
        (PR + r"(query_feat|query_embed|level_embed)\.weight", r"transformer_decoder.\1.weight"),
        (PR + r"input_proj\.(\d)\.(weight|bias)", r"transformer_decoder.input_proj.\1.\2"),
        (
            PR
            + r"transformer_cross_attention_layers\.(\d+)\.multihead_attn\.(in_proj_weight|in_proj_bias|out_proj\.\w+)",
            r"transformer_decoder.layers.\1.cross_attn.\2",
        ),
        (
            PR + r"transformer_cross_attention_layers\.(\d+)\.norm\.(\w+)",
            r"transformer_decoder.layers.\1.cross_norm.\2",
        ),
        (
            PR + r"transformer_self_attention_layers\.(\d+)\.self_attn\.(in_proj_weight|in_proj_bias|out_proj\.\w+)",
            r"transformer_decoder.layers.\1.self_attn.\2",
        ),
        (PR + r"transformer_self_attention_layers\.(\d+)\.norm\.(\w+)", r"transformer_decoder.layers.\1.self_norm.\2"),
        (PR + r"transformer_ffn_layers\.(\d+)\.(linear1|linear2)\.(\w+)", r"transformer_decoder.layers.\1.\2.\3"),
        (PR + r"transformer_ffn_layers\.(\d+)\.norm\.(\w+)", r"transformer_decoder.layers.\1.ffn_norm.\2"),
        (PR + r"decoder_norm\.(\w+)", r"transformer_decoder.decoder_norm.\1"),
        (PR + r"class_embed\.(\w+)", r"transformer_decoder.class_embed.\1"),
        (PR + r"mask_embed\.layers\.(\d)\.(\w+)", r"transformer_decoder.mask_embed.layers.\1.\2"),
    ),
    ignore=(
        r"criterion\.empty_weight",  # the loss's no-object weight
        r"pixel_(mean|std)",  # read into the preprocessing config instead
        r".*relative_position_index",  # derived from the window size
        r".*attn_mask",  # shifted-window masks of the classification Swin, recomputed per size
        r".*num_batches_tracked",
    ),
)


def _need(sd: dict[str, Tensor], key: str) -> Tensor:
    """A tensor the architecture is read from; its absence is a checkpoint mismatch, named."""
    if key not in sd:
        raise CheckpointMismatch(f"checkpoint does not fit the architecture: missing {key!r} (its shape is needed)")
    return sd[key]


def _count(sd: dict[str, Tensor], pattern: str) -> int:
    rx = re.compile(pattern)
    found = {int(m[1]) for k in sd if (m := rx.match(k))}
    return max(found) + 1 if found else 0


def _backbone_from_weights(sd: dict[str, Tensor]) -> ResNetConfig | SwinConfig:
    if "backbone.stem.conv1.weight" in sd:
        depths = tuple(_count(sd, rf"backbone\.res{i}\.(\d+)\.") for i in range(2, 6))
        widths = tuple(_need(sd, f"backbone.res{i}.0.conv3.weight").shape[0] for i in range(2, 6))
        return ResNetConfig(depths=depths, stem_channels=sd["backbone.stem.conv1.weight"].shape[0], widths=widths)
    if "backbone.patch_embed.proj.weight" in sd:
        if "backbone.absolute_pos_embed" in sd:
            raise ValueError("Swin with absolute position embeddings (APE) is not supported")
        proj = sd["backbone.patch_embed.proj.weight"]
        stages = _count(sd, r"backbone\.layers\.(\d+)\.")
        depths = tuple(_count(sd, rf"backbone\.layers\.{i}\.blocks\.(\d+)\.") for i in range(stages))
        tables = [_need(sd, f"backbone.layers.{i}.blocks.0.attn.relative_position_bias_table") for i in range(stages)]
        window = (math.isqrt(tables[0].shape[0]) + 1) // 2
        return SwinConfig(
            embed_dim=proj.shape[0],
            patch_size=proj.shape[-1],
            depths=depths,
            num_heads=tuple(t.shape[1] for t in tables),
            window_size=window,
            qkv_bias="backbone.layers.0.blocks.0.attn.qkv.bias" in sd,
        )
    raise ValueError(
        "unrecognised backbone: expected detectron2 ResNet (backbone.stem.*) or Swin (backbone.patch_embed.*)"
    )


def config_from_detectron2(sd: dict[str, Tensor], preset: str | None = None, name: str = "detectron2") -> ModelConfig:
    """Architecture from the weights' shapes; classes and resize from `preset` or the class count."""
    backbone = _backbone_from_weights(sd)
    pre_attn = _need(sd, PD_NAME + "transformer.encoder.layers.0.self_attn.attention_weights.weight")
    heads_points = pre_attn.shape[0] // 3  # 3 levels
    pixel_decoder = PixelDecoderConfig(
        conv_dim=_need(sd, PD_NAME + "input_proj.0.0.weight").shape[0],
        mask_dim=_need(sd, PD_NAME + "mask_features.weight").shape[0],
        num_layers=_count(sd, PD + r"transformer\.encoder\.layers\.(\d+)\."),
        num_heads=heads_points // 4,  # the official 4 sampling points per head and level
        num_points=4,
        ffn_dim=_need(sd, PD_NAME + "transformer.encoder.layers.0.linear1.weight").shape[0],
    )
    pr = PR_NAME
    query_feat = _need(sd, pr + "query_feat.weight")
    hidden = query_feat.shape[1]
    decoder = DecoderConfig(
        hidden_dim=hidden,
        num_queries=query_feat.shape[0],
        # not in any shape; the official MODEL.MASK_FORMER.NHEADS sets both the pixel decoder's and these heads
        num_heads=pixel_decoder.num_heads,
        ffn_dim=_need(sd, pr + "transformer_ffn_layers.0.linear1.weight").shape[0],
        num_layers=_count(sd, PR + r"transformer_ffn_layers\.(\d+)\."),
        enforce_input_projection=(pr + "input_proj.0.weight") in sd and pixel_decoder.conv_dim == hidden,
    )
    num_classes = _need(sd, pr + "class_embed.weight").shape[0] - 1
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
        base = PRESETS[preset]
        if base.num_classes != num_classes:
            raise ValueError(f"preset {preset!r} has {base.num_classes} classes, the checkpoint {num_classes}")
        names, is_thing, ids, task = base.class_names, base.is_thing, base.category_ids, base.task
        preprocess = base.preprocess
    else:
        meta = class_metadata(num_classes)
        names, is_thing, ids, task = (
            dataset_names(meta.dataset, num_classes),
            meta.is_thing,
            meta.category_ids,
            meta.task,
        )
        large = isinstance(backbone, SwinConfig) and backbone.embed_dim >= 128
        preprocess = preprocess_for(meta.dataset, large_backbone=large)
    if "pixel_mean" in sd and "pixel_std" in sd:
        preprocess = PreprocessConfig(
            pixel_mean=tuple(float(v) for v in sd["pixel_mean"].flatten()),
            pixel_std=tuple(float(v) for v in sd["pixel_std"].flatten()),
            min_size=preprocess.min_size,
            max_size=preprocess.max_size,
            size_divisibility=preprocess.size_divisibility,
        )
    return ModelConfig(
        name=name,
        backbone=backbone,
        num_classes=num_classes,
        class_names=names,
        is_thing=is_thing,
        category_ids=ids,
        task=task,
        pixel_decoder=pixel_decoder,
        decoder=decoder,
        preprocess=preprocess,
    )


def unwrap(obj: object) -> dict[str, object]:
    """The weights dict of a detectron2 checkpoint ({'model': {...}, ...} or the bare dict)."""
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
        raise ValueError("checkpoint does not hold a name -> array mapping")
    return obj


def is_detectron2(keys: set[str]) -> bool:
    return any(k.startswith("sem_seg_head.predictor.") for k in keys)


def to_tensor_dict(raw: dict[str, object]) -> dict[str, Tensor]:
    from m2f.model.safe_pickle import as_tensor

    return {k: as_tensor(v, k).to(torch.float32) if _is_float(v) else as_tensor(v, k) for k, v in raw.items()}


def _is_float(v: object) -> bool:
    dtype = getattr(v, "dtype", None)
    if dtype is None:
        return False
    if isinstance(dtype, torch.dtype):
        return dtype.is_floating_point
    return getattr(dtype, "kind", "") == "f"
