"""torchvision-style bottleneck ResNet returning res2..res5 (strides 4, 8, 16, 32).

The stride sits in the 3x3 convolution (detectron2's STRIDE_IN_1X1=False, as the official
Mask2Former configs use). Normalisation is frozen BatchNorm by default: fine-tuning at small batch
sizes keeps the pre-trained statistics, exactly as detectron2 does.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from m2f.model.grad_mode import records_grad


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine parameters (all buffers, none trained)."""

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: Tensor) -> Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.view(1, -1, 1, 1).to(x.dtype) + shift.view(1, -1, 1, 1).to(x.dtype)


def _norm(kind: str, channels: int) -> nn.Module:
    return FrozenBatchNorm2d(channels) if kind == "frozen_bn" else nn.BatchNorm2d(channels)


class ConvNorm(nn.Sequential):
    """Conv2d (no bias) followed by a norm: the unit every ResNet layer is built from.

    In fp32 inference (no gradients, no autocast) with the norm using its running statistics
    (frozen, or BatchNorm in eval mode), the norm is an affine map per channel and folds into the
    convolution: weight × scale and a bias. That removes one full pass over every activation map
    (two for the frozen norm's multiply and add). The folded pair is cached (a second copy of the
    backbone's convolution weights) and recomputed when any source tensor changes (a load, an
    optimiser step, a move to another device or dtype). Not under
    autocast: there the folded model's bf16 errors, though smaller per layer, came out twice the
    unfolded model's in the logits (tests/test_precision.py), for reasons not pinned down.
    """

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, norm: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False)
        self.norm = _norm(norm, cout)
        self._folded: tuple[tuple, Tensor, Tensor] | None = None

    def _uses_running_stats(self) -> bool:
        return isinstance(self.norm, FrozenBatchNorm2d) or (
            not self.norm.training and self.norm.track_running_stats and self.norm.running_var is not None
        )

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() or torch.is_autocast_enabled(x.device.type) or not self._uses_running_stats():
            return self.norm(self.conv(x))
        weight, bias = self._fold()
        conv = self.conv
        return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)

    def _fold(self) -> tuple[Tensor, Tensor]:
        n = self.norm
        sources = (self.conv.weight, n.weight, n.bias, n.running_mean, n.running_var)
        key = tuple((t.data_ptr(), t._version, t.dtype) for t in sources)
        if self._folded is None or self._folded[0] != key:
            scale = n.weight * (n.running_var + n.eps).rsqrt()  # (C,)
            bias = n.bias - n.running_mean * scale
            self._folded = (key, self.conv.weight * scale.view(-1, 1, 1, 1), bias)
        return self._folded[1], self._folded[2]


class Bottleneck(nn.Module):
    def __init__(self, *, cin: int, cout: int, stride: int, norm: str, stride_in_1x1: bool = False) -> None:
        super().__init__()
        mid = cout // 4
        s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = ConvNorm(cin, mid, 1, s1, norm)
        self.conv2 = ConvNorm(mid, mid, 3, s3, norm)
        self.conv3 = ConvNorm(mid, cout, 1, 1, norm)
        self.shortcut = ConvNorm(cin, cout, 1, stride, norm) if (cin != cout or stride != 1) else None

    def forward(self, x: Tensor) -> Tensor:
        # in place: no op here needs its input kept for the backward pass
        out = self.conv1(x).relu_()
        out = self.conv2(out).relu_()
        out = self.conv3(out)
        out += x if self.shortcut is None else self.shortcut(x)
        return out.relu_()


def max_pool_3x3_s2(x: Tensor) -> Tensor:
    """The stem's max-pool (3 x 3, stride 2, padding 1) of x (B, C, H, W), as the maximum of strided slices.

    Equal to `F.max_pool2d(x, 3, 2, 1)` bit for bit; on a CPU, aten's NCHW kernel took 16 ms for
    (1, 64, 256, 256) on 2 threads, this 3 ms (bench/NOTES.md). Inference only: on ties, autograd through
    `torch.maximum` would split the gradient where max-pool gives it to one input.
    """
    H, W = x.shape[-2:]
    Ho, Wo = (H - 1) // 2 + 1, (W - 1) // 2 + 1
    xp = F.pad(x, (1, 1, 1, 1), value=float("-inf"))  # (B, C, H + 2, W + 2)
    top, middle, bottom = (xp[:, :, k : k + 2 * Ho : 2] for k in range(3))  # (B, C, Ho, W + 2) each
    rows = torch.maximum(torch.maximum(top, middle), bottom)
    left, centre, right = (rows[..., k : k + 2 * Wo : 2] for k in range(3))  # (B, C, Ho, Wo) each
    return torch.maximum(torch.maximum(left, centre), right)


class ResNet(nn.Module):
    """Stem (7x7 conv, stride 2, max-pool) then one stage of bottlenecks per entry of `depths`.

    norm: "frozen_bn" (fixed statistics, official fine-tuning) or "bn" (trainable, for a backbone
    trained from scratch). stride_in_1x1: detectron2's STRIDE_IN_1X1 / HF's downsample_in_bottleneck.
    """

    def __init__(
        self,
        *,
        depths: tuple[int, ...],
        widths: tuple[int, ...],
        stem_channels: int = 64,
        norm: Literal["frozen_bn", "bn"] = "frozen_bn",
        stride_in_1x1: bool = False,
    ) -> None:
        super().__init__()
        if len(depths) != len(widths):
            raise ValueError(f"{len(depths)} stage depths for {len(widths)} widths")
        self.stem = ConvNorm(3, stem_channels, 7, 2, norm)
        self.pool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.stages = nn.ModuleList()
        cin = stem_channels
        for i, (depth, width) in enumerate(zip(depths, widths, strict=True)):
            blocks = [
                Bottleneck(
                    cin=cin if j == 0 else width,
                    cout=width,
                    stride=2 if (i > 0 and j == 0) else 1,
                    norm=norm,
                    stride_in_1x1=stride_in_1x1,
                )
                for j in range(depth)
            ]
            self.stages.append(nn.Sequential(*blocks))
            cin = width
        self.out_channels = tuple(widths)

    def forward(self, x: Tensor) -> list[Tensor]:
        """x (B, 3, H, W) -> [res2 (B, C2, H/4, W/4), res3 (H/8), res4 (H/16), res5 (H/32)]."""
        x = self.stem(x).relu_()
        x = self.pool(x) if records_grad(x) else max_pool_3x3_s2(x)
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats
