"""Linear layers at inference on a CPU: oneDNN's linear, with the bias and a ReLU or GELU inside the kernel.

`F.linear` on a CPU copies the bias into every output row and then runs the matrix product on top of it
(`addmm`), and a ReLU after it is another pass over the output; oneDNN's fused linear writes each output
once. For the pixel decoder's token-wise layers (5 376 tokens at 512 x 512, 19 000 at 800 x 1216) it
measured 1.04-1.15x faster per layer on 2 threads, the FFN's first layer with its ReLU the most; Swin's
MLP with its exact GELU 3x (`F.gelu` alone is slower than the product before it) (bench/NOTES.md).
Results differ from `F.linear` only by summation order (~1e-6 relative).

Only where nothing needs a gradient, in fp32, and where this torch build has the kernel; elsewhere (CUDA,
autocast, training) `F.linear`, so training and GPU inference are unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from m2f.model.grad_mode import records_grad

_FUSED: bool | None = None  # whether torch.ops.mkldnn._linear_pointwise works here; found on first use
_OFF = 0  # depth of `unfused()` contexts
ACTIVATIONS = ("none", "relu", "gelu")


def linear(x: Tensor, layer: nn.Linear, activation: str = "none") -> Tensor:
    """layer(x) for x (..., in_features), followed by a ReLU or the exact (erf) GELU when `activation` says so."""
    return dense(x, layer.weight, layer.bias, activation)


def dense(x: Tensor, weight: Tensor, bias: Tensor | None, activation: str = "none") -> Tensor:
    """`linear` for a weight (out_features, in_features) and bias that are not an nn.Linear's, e.g. the
    slices of a packed attention in-projection."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    if _fusable(x, weight, bias):
        out = _fused(x, weight, bias, activation)
        if out is not None:
            return out
    y = F.linear(x, weight, bias)
    if activation == "relu":
        return y.relu_()
    return F.gelu(y) if activation == "gelu" else y


@contextmanager
def unfused() -> Iterator[None]:
    """Use `F.linear` inside this context: `FlopCounterMode` counts aten's matrix products, not oneDNN's
    fused linear, so a FLOP count taken with it on would miss the pixel decoder's projections and FFN."""
    global _OFF
    _OFF += 1
    try:
        yield
    finally:
        _OFF -= 1


def _fusable(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    if _OFF or _FUSED is False or x.device.type != "cpu" or torch.is_autocast_enabled("cpu"):
        return False
    if x.dtype != torch.float32 or weight.dtype != torch.float32:
        return False
    return not records_grad(x, weight, bias)


def _fused(x: Tensor, weight: Tensor, bias: Tensor | None, activation: str) -> Tensor | None:
    global _FUSED
    try:
        algorithm = "none" if activation == "gelu" else ""  # gelu: erf, as nn.GELU()
        out = torch.ops.mkldnn._linear_pointwise(x, weight, bias, activation, [], algorithm)
    except (AttributeError, RuntimeError, NotImplementedError):  # a build without oneDNN's linear
        _FUSED = False
        return None
    _FUSED = True
    return out
