"""Tiny Hugging Face Mask2Former models for parity tests (transformers is the oracle, test-only)."""

from __future__ import annotations

import torch


def tiny_hf_model(backbone: str, *, num_labels: int = 7, seed: int = 0, window: int = 7):
    """A random, then perturbed, `Mask2FormerForUniversalSegmentation` with a swin or resnet backbone.

    Every parameter and buffer is moved away from its initial value (zero biases, unit norms and
    identity BatchNorm statistics would hide mapping mistakes).
    """
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, ResNetConfig, SwinConfig

    torch.manual_seed(seed)
    stages = ["stage1", "stage2", "stage3", "stage4"]
    if backbone == "swin":
        bb = SwinConfig(
            embed_dim=32,
            depths=[2, 2, 2, 2],
            num_heads=[1, 2, 4, 8],
            window_size=window,
            image_size=224,
            drop_path_rate=0.0,
            out_features=stages,
        )
    elif backbone == "resnet":
        bb = ResNetConfig(
            embedding_size=16,
            hidden_sizes=[32, 64, 128, 256],
            depths=[1, 2, 1, 1],
            layer_type="bottleneck",
            out_features=stages,
        )
    else:
        raise ValueError(backbone)
    config = Mask2FormerConfig(
        backbone_config=bb,
        feature_size=64,
        mask_feature_size=64,
        hidden_dim=64,
        encoder_feedforward_dim=96,
        dim_feedforward=128,
        encoder_layers=2,
        decoder_layers=5,
        num_queries=12,
        num_labels=num_labels,
        num_attention_heads=4,
        id2label={i: f"label_{i}" for i in range(num_labels)},
        label2id={f"label_{i}": i for i in range(num_labels)},
    )
    model = Mask2FormerForUniversalSegmentation(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        for name, b in model.named_buffers():
            if name.endswith("running_var"):
                b.copy_(torch.rand_like(b) + 0.5)
            elif name.endswith("running_mean"):
                b.copy_(torch.randn_like(b) * 0.2)
    return model


def hf_predictions(model, pixel_values: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """All (class, mask) predictions of the HF model, first to last."""
    with torch.no_grad():
        out = model(pixel_values=pixel_values, output_auxiliary_logits=True)
    preds = [(a["class_queries_logits"], a["masks_queries_logits"]) for a in out.auxiliary_logits]
    return preds + [(out.class_queries_logits, out.masks_queries_logits)]
