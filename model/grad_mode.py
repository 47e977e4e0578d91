"""Whether autograd is recording: the test behind the inference-only fast paths of the linear layers,
deformable attention and ResNet's max-pool. ResNet's conv + norm fold keeps its own, stricter test (grad
mode off, no autocast, running statistics: `model.resnet.ConvNorm.forward`)."""

from __future__ import annotations

import torch
from torch import Tensor


def records_grad(*tensors: Tensor | None) -> bool:
    """True when an op on these tensors would be recorded for backward: grad mode is on and one of them
    requires grad. Where it is False, in-place sums, fused oneDNN kernels and the slice-based max-pool are
    safe to use; where it is True, the layers keep the plain ops autograd differentiates as the reference does."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
