"""Hugging Face `Mask2FormerForUniversalSegmentation` directories -> our config and state dict.

Reads what `save_pretrained` writes (`config.json` + `model.safetensors` / `pytorch_model.bin`)
and, when present, `preprocessor_config.json` for the normalisation. Both the key names that
transformers writes to disk (`attention.self.query`, ...) and its in-memory v5 names
(`q_proj`, ...) are accepted.
"""

from __future__ import annotations

from typing import Any

from m2f.model.config import DecoderConfig, ModelConfig, PixelDecoderConfig, PreprocessConfig, ResNetConfig, SwinConfig
from m2f.model.keymap import KeyMap
from m2f.model.presets import class_metadata, preprocess_for

E = r"model\.pixel_level_module\.encoder\.(?:swin\.)?"
D = r"model\.pixel_level_module\.decoder\."
T = r"model\.transformer_module\."
SW_BLOCK = E + r"encoder\.layers\.(\d+)\.blocks\.(\d+)\."
RES_LAYER = E + r"encoder\.stages\.(\d+)\.layers\.(\d+)\."

HF_KEYMAP = KeyMap(
    fuse=(
        # Swin attention: separate query/key/value -> packed qkv
        (SW_BLOCK + r"attention\.self\.query\.(weight|bias)", ("query", "key", "value"), r"\g<0>@qkv"),
        (SW_BLOCK + r"attention\.q_proj\.(weight|bias)", ("q_proj", "k_proj", "v_proj"), r"\g<0>@qkv"),
        # decoder self-attention: q/k/v projections -> nn.MultiheadAttention's in_proj
        (T + r"decoder\.layers\.(\d+)\.self_attn\.q_proj\.(weight|bias)", ("q_proj", "k_proj", "v_proj"), r"\g<0>@qkv"),
    ),
    rules=(
        # --- Swin backbone
        (E + r"embeddings\.patch_embeddings\.projection\.(weight|bias)", r"backbone.patch_embed.\1"),
        (E + r"embeddings\.norm\.(weight|bias)", r"backbone.patch_norm.\1"),
        (
            SW_BLOCK + r"attention\.(?:self\.query|q_proj)\.(weight|bias)@qkv",
            r"backbone.stages.\1.blocks.\2.attn.qkv.\3",
        ),
        (
            SW_BLOCK + r"attention\.(?:self|relative_position_bias)\.relative_position_bias_table",
            r"backbone.stages.\1.blocks.\2.attn.relative_position_bias_table",
        ),
        (
            SW_BLOCK + r"attention\.(?:output\.dense|o_proj)\.(weight|bias)",
            r"backbone.stages.\1.blocks.\2.attn.proj.\3",
        ),
        (SW_BLOCK + r"layernorm_before\.(weight|bias)", r"backbone.stages.\1.blocks.\2.norm1.\3"),
        (SW_BLOCK + r"layernorm_after\.(weight|bias)", r"backbone.stages.\1.blocks.\2.norm2.\3"),
        (SW_BLOCK + r"(?:intermediate\.dense|mlp\.fc1)\.(weight|bias)", r"backbone.stages.\1.blocks.\2.mlp.0.\3"),
        (SW_BLOCK + r"(?:output\.dense|mlp\.fc2)\.(weight|bias)", r"backbone.stages.\1.blocks.\2.mlp.2.\3"),
        (
            E + r"encoder\.layers\.(\d+)\.downsample\.(reduction|norm)\.(weight|bias)",
            r"backbone.stages.\1.downsample.\2.\3",
        ),
        (E + r"hidden_states_norms\.stage(\d+)\.(weight|bias)", lambda m: f"backbone.norms.{int(m[1]) - 1}.{m[2]}"),
        # --- ResNet backbone
        (E + r"embedder\.embedder\.convolution\.weight", r"backbone.stem.conv.weight"),
        (E + r"embedder\.embedder\.normalization\.(\w+)", r"backbone.stem.norm.\1"),
        (
            RES_LAYER + r"layer\.(\d)\.convolution\.weight",
            lambda m: f"backbone.stages.{m[1]}.{m[2]}.conv{int(m[3]) + 1}.conv.weight",
        ),
        (
            RES_LAYER + r"layer\.(\d)\.normalization\.(\w+)",
            lambda m: f"backbone.stages.{m[1]}.{m[2]}.conv{int(m[3]) + 1}.norm.{m[4]}",
        ),
        (RES_LAYER + r"shortcut\.convolution\.weight", r"backbone.stages.\1.\2.shortcut.conv.weight"),
        (RES_LAYER + r"shortcut\.normalization\.(\w+)", r"backbone.stages.\1.\2.shortcut.norm.\3"),
        # --- pixel decoder
        (D + r"input_projections\.(\d)\.(\d)\.(weight|bias)", r"pixel_decoder.input_proj.\1.\2.\3"),
        (D + r"level_embed", r"pixel_decoder.level_embed"),
        (
            D
            + r"encoder\.layers\.(\d+)\.self_attn\.(sampling_offsets|attention_weights|value_proj|output_proj)\.(\w+)",
            r"pixel_decoder.layers.\1.self_attn.\2.\3",
        ),
        (D + r"encoder\.layers\.(\d+)\.self_attn_layer_norm\.(\w+)", r"pixel_decoder.layers.\1.norm1.\2"),
        (D + r"encoder\.layers\.(\d+)\.fc1\.(\w+)", r"pixel_decoder.layers.\1.linear1.\2"),
        (D + r"encoder\.layers\.(\d+)\.fc2\.(\w+)", r"pixel_decoder.layers.\1.linear2.\2"),
        (D + r"encoder\.layers\.(\d+)\.final_layer_norm\.(\w+)", r"pixel_decoder.layers.\1.norm2.\2"),
        (D + r"adapter_1\.(\d)\.(\w+)", r"pixel_decoder.lateral.\1.\2"),
        (D + r"layer_1\.(\d)\.(\w+)", r"pixel_decoder.output.\1.\2"),
        (D + r"mask_projection\.(\w+)", r"pixel_decoder.mask_features.\1"),
        # --- transformer decoder
        (T + r"queries_features\.weight", r"transformer_decoder.query_feat.weight"),
        (T + r"queries_embedder\.weight", r"transformer_decoder.query_embed.weight"),
        (T + r"level_embed\.weight", r"transformer_decoder.level_embed.weight"),
        (T + r"input_projections\.(\d)\.(\w+)", r"transformer_decoder.input_proj.\1.\2"),
        (
            T + r"decoder\.layers\.(\d+)\.cross_attn\.(in_proj_weight|in_proj_bias)",
            r"transformer_decoder.layers.\1.cross_attn.\2",
        ),
        (
            T + r"decoder\.layers\.(\d+)\.cross_attn\.out_proj\.(\w+)",
            r"transformer_decoder.layers.\1.cross_attn.out_proj.\2",
        ),
        (T + r"decoder\.layers\.(\d+)\.cross_attn_layer_norm\.(\w+)", r"transformer_decoder.layers.\1.cross_norm.\2"),
        (
            T + r"decoder\.layers\.(\d+)\.self_attn\.q_proj\.(weight|bias)@qkv",
            lambda m: f"transformer_decoder.layers.{m[1]}.self_attn.in_proj_{m[2]}",
        ),
        (
            T + r"decoder\.layers\.(\d+)\.self_attn\.out_proj\.(\w+)",
            r"transformer_decoder.layers.\1.self_attn.out_proj.\2",
        ),
        (T + r"decoder\.layers\.(\d+)\.self_attn_layer_norm\.(\w+)", r"transformer_decoder.layers.\1.self_norm.\2"),
        (T + r"decoder\.layers\.(\d+)\.fc1\.(\w+)", r"transformer_decoder.layers.\1.linear1.\2"),
        (T + r"decoder\.layers\.(\d+)\.fc2\.(\w+)", r"transformer_decoder.layers.\1.linear2.\2"),
        (T + r"decoder\.layers\.(\d+)\.final_layer_norm\.(\w+)", r"transformer_decoder.layers.\1.ffn_norm.\2"),
        (T + r"decoder\.layernorm\.(\w+)", r"transformer_decoder.decoder_norm.\1"),
        (T + r"decoder\.mask_predictor\.mask_embedder\.(\d)\.0\.(\w+)", r"transformer_decoder.mask_embed.layers.\1.\2"),
        (r"class_predictor\.(\w+)", r"transformer_decoder.class_embed.\1"),
    ),
    ignore=(
        r"criterion\.empty_weight",  # the loss's no-object weight, not a model parameter
        r".*\.num_batches_tracked",
        r".*relative_position_index",  # derived from the window size
        E + r"layernorm\.(weight|bias)",  # SwinModel's final norm, unused by the backbone
    ),
)


def config_from_hf(hf: dict[str, Any], preprocessor: dict[str, Any] | None = None, name: str = "hf") -> ModelConfig:
    """Translate a Mask2FormerConfig (as a dict from config.json) into a ModelConfig."""
    if hf.get("model_type") != "mask2former":
        raise ValueError(f"config.json is not a Mask2Former config (model_type={hf.get('model_type')!r})")
    bb = hf.get("backbone_config")
    if not bb:
        raise ValueError(
            "this Hugging Face config names its backbone by reference (timm or hub); only configs with an "
            "inline backbone_config (swin or resnet), as save_pretrained writes, can be built offline"
        )
    backbone = _backbone_from_hf(bb)
    for key, want in (("activation_function", "relu"), ("common_stride", 4)):
        if hf.get(key, want) != want:
            raise ValueError(f"unsupported Mask2Former config: {key}={hf[key]!r} (only {want!r})")
    if list(hf.get("feature_strides", [4, 8, 16, 32])) != [4, 8, 16, 32]:
        raise ValueError(f"unsupported feature_strides {hf['feature_strides']}")
    id2label = {int(k): v for k, v in (hf.get("id2label") or {}).items()}
    num_classes = int(hf.get("num_labels", len(id2label)) or len(id2label))
    labels = tuple(id2label.get(i, f"class_{i}") for i in range(num_classes))
    meta = class_metadata(labels)
    heads = int(hf.get("num_attention_heads", 8))
    return ModelConfig(
        name=name,
        backbone=backbone,
        num_classes=num_classes,
        class_names=labels,
        is_thing=meta.is_thing,
        category_ids=meta.category_ids,
        task=meta.task,
        pixel_decoder=PixelDecoderConfig(
            conv_dim=hf.get("feature_size", 256),
            mask_dim=hf.get("mask_feature_size", 256),
            num_layers=hf.get("encoder_layers", 6),
            num_heads=heads,
            ffn_dim=hf.get("encoder_feedforward_dim", 1024),
        ),
        decoder=DecoderConfig(
            hidden_dim=hf.get("hidden_dim", 256),
            num_queries=hf.get("num_queries", 100),
            num_heads=heads,
            ffn_dim=hf.get("dim_feedforward", 2048),
            num_layers=int(hf.get("decoder_layers", 10)) - 1,  # HF counts the initial prediction as a layer
            pre_norm=bool(hf.get("pre_norm", False)),
            enforce_input_projection=bool(hf.get("enforce_input_projection", False)),
        ),
        preprocess=_preprocess_from_hf(preprocessor, preprocess_for(meta.dataset)),
    )


def _backbone_from_hf(bb: dict[str, Any]) -> ResNetConfig | SwinConfig:
    kind = bb.get("model_type")
    if kind == "swin":
        if bb.get("use_absolute_embeddings"):
            raise ValueError("Swin with absolute position embeddings is not supported")
        if bb.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"unsupported Swin activation {bb['hidden_act']!r}")
        return SwinConfig(
            embed_dim=bb.get("embed_dim", 96),
            depths=tuple(bb.get("depths", (2, 2, 6, 2))),
            num_heads=tuple(bb.get("num_heads", (3, 6, 12, 24))),
            window_size=bb.get("window_size", 7),
            patch_size=bb.get("patch_size", 4),
            mlp_ratio=float(bb.get("mlp_ratio", 4.0)),
            qkv_bias=bool(bb.get("qkv_bias", True)),
            drop_path_rate=float(bb.get("drop_path_rate", 0.3)),
            layer_norm_eps=float(bb.get("layer_norm_eps", 1e-5)),
        )
    if kind == "resnet":
        if bb.get("layer_type", "bottleneck") != "bottleneck":
            raise ValueError(f"only bottleneck ResNets are supported, got layer_type={bb['layer_type']!r}")
        if bb.get("downsample_in_first_stage"):
            raise ValueError("ResNet with downsample_in_first_stage=True is not supported")
        return ResNetConfig(
            depths=tuple(bb.get("depths", (3, 4, 6, 3))),
            stem_channels=bb.get("embedding_size", 64),
            widths=tuple(bb.get("hidden_sizes", (256, 512, 1024, 2048))),
            stride_in_1x1=bool(bb.get("downsample_in_bottleneck", False)),
            norm="frozen_bn",
        )
    raise ValueError(f"unsupported Hugging Face backbone {kind!r} (swin and resnet are)")


def _preprocess_from_hf(pre: dict[str, Any] | None, default: PreprocessConfig) -> PreprocessConfig:
    """Mean/std from preprocessor_config.json (0-1 or 0-255 scale); the resize rule stays the official
    one for the dataset, since HF processors often default to a smaller training-time size."""
    if not pre:
        return default
    mean, std = pre.get("image_mean"), pre.get("image_std")
    if mean is None or std is None:
        return default
    factor = 255.0 if max(mean) <= 1.0 else 1.0
    return PreprocessConfig(
        pixel_mean=tuple(float(m) * factor for m in mean),
        pixel_std=tuple(float(s) * factor for s in std),
        min_size=default.min_size,
        max_size=default.max_size,
        size_divisibility=int(pre.get("size_divisor", 0) or default.size_divisibility),
    )
