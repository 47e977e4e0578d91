"""The Mask2Former module and its builder: the one place where a `ModelConfig` becomes modules."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from m2f.model.config import ModelConfig, ResNetConfig, SwinConfig
from m2f.model.pixel_decoder import PixelDecoder
from m2f.model.resnet import ResNet
from m2f.model.swin import SwinTransformer
from m2f.model.transformer_decoder import Prediction, TransformerDecoder


@dataclass
class Mask2FormerOutput:
    """Final prediction plus every earlier one (deep supervision), first to last."""

    class_logits: Tensor  # (B, Q, K+1), last index = no object
    mask_logits: Tensor  # (B, Q, H/4, W/4)
    aux: list[Prediction] = field(default_factory=list)


class Mask2Former(nn.Module):
    """forward(pixel_values (B, 3, H, W), normalised with the config's mean/std) -> Mask2FormerOutput.

    H and W should be multiples of 32 (preprocessing pads them); other sizes run but give the
    strides' rounding of the official code.
    """

    def __init__(
        self,
        *,
        config: ModelConfig,
        backbone: nn.Module,
        pixel_decoder: PixelDecoder,
        transformer_decoder: TransformerDecoder,
    ) -> None:
        super().__init__()
        self.config = config
        self.backbone = backbone
        self.pixel_decoder = pixel_decoder
        self.transformer_decoder = transformer_decoder

    def forward(self, pixel_values: Tensor, *, aux: bool | None = None) -> Mask2FormerOutput:
        """aux: also return every earlier decoder prediction (deep supervision). Defaults to
        `self.training`; at inference the intermediate masks are never materialised at 1/4 scale."""
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"pixel_values must be (B, 3, H, W), got {tuple(pixel_values.shape)}")
        aux = self.training if aux is None else aux
        feats = self.backbone(pixel_values)  # [res2, res3, res4, res5]
        # In full precision the mask features' 1x1 convolution is folded into the decoder's mask embeddings
        # (transformer_decoder.mask_product). Not under autocast: rounding the folded (Q x C) embeddings to
        # bf16 doubled the bf16-vs-fp32 error of a small ResNet model, and on an accelerator the saving is small.
        fold = not torch.is_autocast_enabled(pixel_values.device.type)
        pixel, multi_scale = self.pixel_decoder(feats, project=not fold)
        projection = self.pixel_decoder.mask_features if fold else None
        preds = self.transformer_decoder(multi_scale, pixel, aux=aux, projection=projection)
        return Mask2FormerOutput(preds[-1].class_logits, preds[-1].mask_logits, preds[:-1])

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device


def build_backbone(cfg: ResNetConfig | SwinConfig) -> nn.Module:
    """The backbone of `cfg`: its fields (all but `kind`, which picks the class) are the constructor's keyword
    arguments, so a field added to one and not the other fails here, loudly."""
    kwargs = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name != "kind"}
    if isinstance(cfg, ResNetConfig):
        return ResNet(**kwargs)
    if isinstance(cfg, SwinConfig):
        return SwinTransformer(**kwargs)
    raise ValueError(f"unknown backbone config {type(cfg).__name__}")


def build_model(config: ModelConfig) -> Mask2Former:
    """Random-initialised Mask2Former for `config` (weights come from `model.load`)."""
    backbone = build_backbone(config.backbone)
    pd, dc = config.pixel_decoder, config.decoder
    pixel_decoder = PixelDecoder(
        in_channels=tuple(backbone.out_channels),
        conv_dim=pd.conv_dim,
        mask_dim=pd.mask_dim,
        num_layers=pd.num_layers,
        num_heads=pd.num_heads,
        num_points=pd.num_points,
        ffn_dim=pd.ffn_dim,
        num_groups=pd.num_groups,
        dropout=pd.dropout,
    )
    decoder = TransformerDecoder(
        in_channels=pd.conv_dim,
        mask_dim=pd.mask_dim,
        num_classes=config.num_classes,
        hidden_dim=dc.hidden_dim,
        num_queries=dc.num_queries,
        num_heads=dc.num_heads,
        ffn_dim=dc.ffn_dim,
        num_layers=dc.num_layers,
        pre_norm=dc.pre_norm,
        enforce_input_projection=dc.enforce_input_projection,
        dropout=dc.dropout,
    )
    return Mask2Former(config=config, backbone=backbone, pixel_decoder=pixel_decoder, transformer_decoder=decoder)
