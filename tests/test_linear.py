"""model.linear: oneDNN's fused linear at CPU inference equals F.linear (+ ReLU); training keeps autograd."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from m2f.model import linear as linear_module
from m2f.model.linear import linear


@pytest.mark.parametrize("activation", ["none", "relu", "gelu"])
@pytest.mark.parametrize("shape", [(37, 24), (2, 51, 24)])
def test_linear_equals_f_linear_at_inference(activation, shape) -> None:
    torch.manual_seed(0)
    layer = torch.nn.Linear(24, 40)
    x = torch.randn(shape)
    want = F.linear(x, layer.weight, layer.bias)
    want = {"none": want, "relu": want.relu(), "gelu": F.gelu(want)}[activation]
    with torch.inference_mode():
        got = linear(x, layer, activation)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if torch.backends.mkldnn.is_available():  # x86 CPU builds: the fused kernel ran
        assert linear_module._FUSED is True


def test_unfused_lets_a_flop_counter_see_the_matrix_products() -> None:
    from torch.utils.flop_counter import FlopCounterMode

    layer = torch.nn.Linear(16, 32).requires_grad_(False)
    x = torch.randn(10, 16)
    counter = FlopCounterMode(display=False)
    with counter, linear_module.unfused():
        linear(x, layer, "relu")
    assert counter.get_total_flops() == 2 * 10 * 16 * 32


def test_linear_with_autograd_is_f_linear_and_trains() -> None:
    layer = torch.nn.Linear(8, 6)
    x = torch.randn(5, 8, requires_grad=True)
    linear(x, layer, "relu").sum().backward()
    assert x.grad is not None and layer.weight.grad is not None
    with pytest.raises(ValueError, match="activation"):
        linear(x, layer, "tanh")


def test_dense_takes_slices_of_a_packed_weight() -> None:
    """The decoder's attention projects q, k and v with row slices of one packed (3C, C) weight."""
    torch.manual_seed(1)
    packed, bias = torch.randn(48, 16), torch.randn(48)
    x = torch.randn(3, 7, 16)
    with torch.inference_mode():
        for w, b in zip(packed.chunk(3), bias.chunk(3), strict=True):
            torch.testing.assert_close(linear_module.dense(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(linear_module.dense(x, packed, None, "relu"), F.linear(x, packed).relu())
