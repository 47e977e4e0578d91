"""Multi-scale deformable attention (Deformable DETR) in plain PyTorch, via `grid_sample`.

No compiled extension: each level is sampled with one bilinear `grid_sample` over all heads,
queries and points at once. Sampling locations are computed and used in fp32 under autocast:
an offset of a fraction of a pixel is below bf16's resolution at these magnitudes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def ms_deform_attn_sample(value: Tensor, shapes: list[tuple[int, int]], locations: Tensor, weights: Tensor) -> Tensor:
    """Bilinear sampling of every level, weighted and summed.

    value (B, S, M, D) with S = Σ H_l*W_l; locations (B, Lq, M, L, P, 2) in [0, 1] (x, y);
    weights (B, Lq, M, L, P). Returns (B, Lq, M*D).
    """
    B, _, M, D = value.shape
    _, Lq, _, L, P, _ = locations.shape
    values = value.split([h * w for h, w in shapes], dim=1)
    grids = 2 * locations - 1
    out = value.new_zeros((B * M, D, Lq, P), dtype=torch.float32)
    for lvl, (h, w) in enumerate(shapes):
        v = values[lvl].permute(0, 2, 3, 1).reshape(B * M, D, h, w).float()  # (B*M, D, H, W)
        g = grids[:, :, :, lvl].transpose(1, 2).reshape(B * M, Lq, P, 2)  # (B*M, Lq, P, 2)
        s = F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False)  # (B*M, D, Lq, P)
        a = weights[:, :, :, lvl].transpose(1, 2).reshape(B * M, 1, Lq, P).float()
        out = out + s * a
    out = out.sum(-1).view(B, M * D, Lq)  # (B, M*D, Lq)
    return out.transpose(1, 2).to(value.dtype)


class MSDeformAttn(nn.Module):
    def __init__(self, *, dim: int, heads: int, levels: int, points: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads, self.levels, self.points = heads, levels, points
        self.sampling_offsets = nn.Linear(dim, heads * levels * points * 2)
        self.attention_weights = nn.Linear(dim, heads * levels * points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Deformable DETR's init: offsets start on a ring of directions, 1..P pixels out."""
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.heads, dtype=torch.float32) * (2.0 * math.pi / self.heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(self.heads, 1, 1, 2)
        grid = grid.repeat(1, self.levels, self.points, 1)
        grid = grid * torch.arange(1, self.points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.view(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(self, query: Tensor, reference: Tensor, value: Tensor, shapes: list[tuple[int, int]]) -> Tensor:
        """query (B, Lq, C) with positions added; reference (B, Lq, 2) in [0, 1] (x, y);
        value (B, S, C). Returns (B, Lq, C)."""
        B, Lq, C = query.shape
        M, L, P = self.heads, self.levels, self.points
        v = self.value_proj(value).view(B, value.shape[1], M, C // M)  # (B, S, M, D)
        offsets = self.sampling_offsets(query).view(B, Lq, M, L, P, 2)
        weights = self.attention_weights(query).view(B, Lq, M, L * P)
        weights = weights.float().softmax(-1).view(B, Lq, M, L, P)
        with torch.autocast(device_type=query.device.type, enabled=False):
            # (x, y) normaliser per level: offsets are in pixels of that level
            norm = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float32, device=query.device)
            loc = reference.float()[:, :, None, None, None, :] + offsets.float() / norm[None, None, None, :, None, :]
            out = ms_deform_attn_sample(v, shapes, loc, weights)  # (B, Lq, C)
        return self.output_proj(out)
