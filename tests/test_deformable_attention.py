"""The fused deformable-attention sampler equals one grid_sample per level, values and gradients."""

from __future__ import annotations

import pytest
import torch

from m2f.model.deformable_attention import ms_deform_attn_sample, ms_deform_attn_sample_grid, softmax_last


@pytest.mark.parametrize("batch", [1, 2])
def test_sampler_matches_grid_sample_reference(batch):
    torch.manual_seed(batch)
    shapes = [(3, 5), (6, 10), (12, 20)]  # non-square, odd sizes
    S = sum(h * w for h, w in shapes)
    M, D, L, P, Lq = 4, 8, 3, 4, 37
    value = torch.randn(batch, S, M, D, dtype=torch.float64)
    # locations reach outside [0, 1] on every side: those corners must weigh zero, as in grid_sample
    locations = torch.rand(batch, Lq, M, L, P, 2, dtype=torch.float64) * 1.6 - 0.3
    locations[0, 0, 0, 0, 0] = torch.tensor([0.0, 1.0])  # exact borders
    locations[0, 1, 0, 2, 1] = torch.tensor([1.5, -0.7])  # wholly outside
    weights = torch.rand(batch, Lq, M, L, P, dtype=torch.float64).softmax(-1)
    inputs = [t.clone().requires_grad_() for t in (value, locations, weights)]
    refs = [t.clone().requires_grad_() for t in (value, locations, weights)]
    got = ms_deform_attn_sample(inputs[0], shapes, inputs[1], inputs[2])
    want = ms_deform_attn_sample_grid(refs[0], shapes, refs[1], refs[2])
    assert got.shape == (batch, Lq, M * D)
    torch.testing.assert_close(got, want.to(got.dtype), rtol=1e-5, atol=1e-5)
    probe = torch.randn_like(want)
    grads = torch.autograd.grad((got * probe).sum(), inputs)
    ref_grads = torch.autograd.grad((want * probe).sum(), refs)
    for name, g, r in zip(("value", "locations", "weights"), grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r.to(g.dtype), rtol=1e-4, atol=1e-4, msg=f"gradient of {name}")


def test_softmax_without_autograd_equals_torch_softmax() -> None:
    x = torch.randn(3, 50, 8, 12) * 30  # large logits: the max is subtracted first
    with torch.no_grad():
        torch.testing.assert_close(softmax_last(x), x.softmax(-1), rtol=1e-6, atol=1e-7)
    y = x.clone().requires_grad_()
    softmax_last(y)[..., 0].sum().backward()  # with autograd: torch's own, gradients flow
    assert y.grad is not None and torch.isfinite(y.grad).all()
