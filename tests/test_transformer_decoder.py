"""The transformer decoder's folded mask projection: the pixel decoder's final 1x1 convolution moved into the
query embeddings gives the logits that convolving every pixel first gives."""

from __future__ import annotations

import pytest
import torch

from m2f import model
from m2f.model.transformer_decoder import mask_product
from tests.hf_models import tiny_hf_model


@pytest.mark.parametrize("bias", [True, False])
def test_mask_product_with_projection_equals_projecting_first(bias) -> None:
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(12, 8, 1, bias=bias)
    embed, pixels = torch.randn(2, 5, 8), torch.randn(2, 12, 9, 11)
    with torch.inference_mode():
        want = torch.einsum("bqc,bchw->bqhw", embed, conv(pixels))
        got = mask_product(embed, pixels, conv)
    assert got.shape == (2, 5, 9, 11)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backbone", ["resnet", "swin"])
def test_inference_forward_folds_and_agrees_with_the_unfolded_path(backbone, tmp_path) -> None:
    tiny_hf_model(backbone).save_pretrained(tmp_path)
    m = model.load(str(tmp_path))
    x = torch.randn(1, 3, 96, 128)
    with torch.inference_mode():
        folded = m(x)
        feats = m.backbone(x)
        mask_features, multi_scale = m.pixel_decoder(feats)  # the 1x1 convolution over every pixel
        plain = m.transformer_decoder(multi_scale, mask_features, aux=False)[-1]
        pixels, _ = m.pixel_decoder(feats, project=False)
    assert pixels.shape[1] == m.pixel_decoder.mask_features.in_channels  # the map before the convolution
    torch.testing.assert_close(folded.mask_logits, plain.mask_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(folded.class_logits, plain.class_logits, rtol=1e-4, atol=1e-4)
