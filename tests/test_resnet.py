"""The ResNet's inference shortcuts: the norm folded into the convolution, the stem pool by slices."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from m2f.model.resnet import ConvNorm, max_pool_3x3_s2


def _randomised(norm: str) -> ConvNorm:
    torch.manual_seed(0)
    unit = ConvNorm(8, 16, 3, 2, norm)
    with torch.no_grad():
        for t in (unit.norm.weight, unit.norm.bias, unit.norm.running_mean):
            t.copy_(torch.randn_like(t))
        unit.norm.running_var.copy_(torch.rand_like(unit.norm.running_var) + 0.1)
    return unit.eval()


@pytest.mark.parametrize("norm", ["frozen_bn", "bn"])
def test_folded_norm_equals_conv_then_norm(norm: str) -> None:
    unit = _randomised(norm)
    x = torch.randn(2, 8, 20, 13)
    reference = unit.norm(unit.conv(x))  # gradients on: the unfolded path
    with torch.no_grad():
        folded = unit(x)
    assert unit._folded is not None, "inference did not take the folded path"
    torch.testing.assert_close(folded, reference.detach(), atol=1e-5, rtol=1e-5)


def test_fold_follows_changed_weights_and_training_mode() -> None:
    unit = _randomised("bn")
    x = torch.randn(1, 8, 16, 16)
    with torch.no_grad():
        before = unit(x)
        unit.norm.running_mean.add_(1.0)  # e.g. a checkpoint loaded into the same module
        after = unit(x)
        torch.testing.assert_close(after, unit.norm(unit.conv(x)), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(before, after)
        unit.train()  # batch statistics: nothing to fold
        torch.testing.assert_close(unit(x), unit.norm(unit.conv(x)))


@pytest.mark.parametrize("shape", [(1, 4, 16, 16), (2, 3, 15, 17), (1, 2, 1, 1), (1, 64, 40, 61)])
def test_the_stem_pool_by_slices_equals_max_pool(shape) -> None:
    x = torch.randn(shape)
    assert torch.equal(max_pool_3x3_s2(x), F.max_pool2d(x, 3, 2, 1))
