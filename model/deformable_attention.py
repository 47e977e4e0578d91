"""Multi-scale deformable attention (Deformable DETR) in plain PyTorch.

No compiled extension: the bilinear sampling of all heads, queries and points is one
`embedding_bag` gather per level (see `ms_deform_attn_sample`); `ms_deform_attn_sample_grid` is the
same thing with `grid_sample`, kept as the reference the tests compare against. Sampling locations are computed
and used in fp32 under autocast: an offset of a fraction of a pixel is below bf16's resolution at
these magnitudes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from m2f.model.grad_mode import records_grad
from m2f.model.linear import linear


def ms_deform_attn_sample(value: Tensor, shapes: list[tuple[int, int]], locations: Tensor, weights: Tensor) -> Tensor:
    """Bilinear sampling of every level, weighted by the attention and summed, as gathers.

    value (B, S, M, D) with S = Σ H_l*W_l; locations (B, Lq, M, L, P, 2) in [0, 1] (x, y);
    weights (B, Lq, M, L, P). Returns (B, Lq, M*D).

    Each output is Σ over levels, points and the 4 bilinear corners of (attention × corner weight) ×
    a row of `value`: exactly `embedding_bag(mode="sum")` with per-sample weights, one call per
    level. To match `grid_sample(align_corners=False, padding_mode="zeros")` without masks, every
    level gets a one-pixel zero border and coordinates are clamped into it: a corner outside the map
    reads a zero. The index and weight arithmetic runs level by level on contiguous (B, Lq, M, P)
    tensors with scalar per-level constants: broadcasting a (L, 1, 2) constant against the
    checkpoint's (…, L, P, 2) layout left TensorIterator with inner loops of length 2, and those
    elementwise ops cost more than the gathers (bench/NOTES.md). Gradients reach the values, the
    locations and the weights alike.
    """
    ct = torch.promote_types(value.dtype, torch.float32)  # at least fp32, whatever autocast made of value
    loc = locations.to(ct).permute(3, 5, 0, 1, 2, 4).contiguous()  # (L, 2, B, Lq, M, P)
    pixels = [(loc[lvl, 0] * w, loc[lvl, 1] * h) for lvl, (h, w) in enumerate(shapes)]
    return sample_pixels(value, shapes, pixels, weights)


def sample_pixels(
    value: Tensor, shapes: list[tuple[int, int]], pixels: list[tuple[Tensor, Tensor]], weights: Tensor
) -> Tensor:
    """`ms_deform_attn_sample` with the locations given per level in that level's pixels: (x, y) each
    (B, Lq, M, P), x in [0, w] across the map (0: its left edge). MSDeformAttn builds these from the
    reference points and the offsets (already in pixels) without normalising and scaling back."""
    B, _, M, D = value.shape
    _, Lq, _, _, P = weights.shape
    dev = value.device
    ct = torch.promote_types(value.dtype, torch.float32)
    att = weights.to(ct).permute(3, 0, 1, 2, 4).contiguous()  # (L, B, Lq, M, P)
    out = None
    for lvl, ((h, w), v) in enumerate(zip(shapes, value.split([h * w for h, w in shapes], dim=1), strict=True)):
        n = (h + 2) * (w + 2)  # pixels of the padded level
        table = (
            F.pad(v.reshape(B, h, w, M, D), (0, 0, 0, 0, 1, 1, 1, 1)).to(ct).reshape(B * n * M, D)
        )  # rows (b, y, x, m)
        it = torch.int32 if B * n * M < 2**31 else torch.int64
        # pixel coordinates in the padded map (+1 for the border), clamped so that far-away points sit on zeros
        px = pixels[lvl][0].to(ct).add(0.5).clamp_(0, w + 1)  # (B, Lq, M, P)
        py = pixels[lvl][1].to(ct).add(0.5).clamp_(0, h + 1)
        x0, y0 = px.floor().clamp_(max=w), py.floor().clamp_(max=h)
        fx, fy = px - x0, py - y0
        bm = torch.arange(B, device=dev).view(B, 1, 1, 1) * (n * M) + torch.arange(M, device=dev).view(1, 1, M, 1)
        top_left = (y0.to(it) * (w + 2) + x0.to(it)) * M + bm.to(it)  # (B, Lq, M, P)
        corners = torch.tensor([0, M, (w + 2) * M, (w + 3) * M], device=dev, dtype=it)  # TL, TR, BL, BR
        rows = top_left.unsqueeze(-1) + corners  # (B, Lq, M, P, 4)
        a = att[lvl]
        wy1 = a * fy
        wy0 = a - wy1
        tr, br = wy0 * fx, wy1 * fx
        corner = torch.stack((wy0 - tr, tr, wy1 - br, br), -1)  # (B, Lq, M, P, 4)
        sampled = F.embedding_bag(rows.view(-1, P * 4), table, per_sample_weights=corner.view(-1, P * 4), mode="sum")
        if out is None:
            out = sampled  # (B*Lq*M, D)
        elif records_grad(out):
            out = out + sampled
        else:
            out.add_(sampled)  # no fresh 1-5 M element tensor per level
    return out.view(B, Lq, M * D).to(value.dtype)


def softmax_last(x: Tensor) -> Tensor:
    """Softmax over the last dimension. Without autograd, as exp(x - max) / sum in three passes: the
    attention weights' last dimension is levels x points (12), and `Tensor.softmax` over so short a row
    took 4.9 ms for (1, 5376, 8, 12) on 2 CPU threads where this takes 0.8 (bench/NOTES.md)."""
    if records_grad(x):
        return x.softmax(-1)
    e = (x - x.amax(-1, keepdim=True)).exp_()
    return e.div_(e.sum(-1, keepdim=True))


def ms_deform_attn_sample_grid(
    value: Tensor, shapes: list[tuple[int, int]], locations: Tensor, weights: Tensor
) -> Tensor:
    """The same computation with one `grid_sample` per level: the slow, obviously-correct reference."""
    B, _, M, D = value.shape
    _, Lq, _, L, P, _ = locations.shape
    ct = torch.promote_types(value.dtype, torch.float32)
    values = value.split([h * w for h, w in shapes], dim=1)
    grids = (2 * locations - 1).to(ct)
    out = value.new_zeros((B * M, D, Lq, P), dtype=ct)
    for lvl, (h, w) in enumerate(shapes):
        v = values[lvl].permute(0, 2, 3, 1).reshape(B * M, D, h, w).to(ct)  # (B*M, D, H, W)
        g = grids[:, :, :, lvl].transpose(1, 2).reshape(B * M, Lq, P, 2)  # (B*M, Lq, P, 2)
        s = F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False)  # (B*M, D, Lq, P)
        a = weights[:, :, :, lvl].transpose(1, 2).reshape(B * M, 1, Lq, P).to(ct)
        out = out + s * a
    return out.sum(-1).view(B, M * D, Lq).transpose(1, 2).to(value.dtype)


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
        v = linear(value, self.value_proj).view(B, value.shape[1], M, C // M)  # (B, S, M, D)
        offsets = linear(query, self.sampling_offsets).view(B, Lq, M, L, P, 2)  # in pixels of each level
        weights = softmax_last(linear(query, self.attention_weights).view(B, Lq, M, L * P).float()).view(B, Lq, M, L, P)
        with torch.autocast(device_type=query.device.type, enabled=False):
            # Location (x, y) in level l's pixels: reference * (w, h) + offset, the official code's
            # (reference + offset / (w, h)) * (w, h) without the broadcast division and the scaling back.
            off = offsets.float().permute(3, 5, 0, 1, 2, 4).contiguous()  # (L, 2, B, Lq, M, P)
            ref = reference.float()[:, :, None, None, :]  # (B, Lq, 1, 1, 2)
            x, y = ref[..., 0], ref[..., 1]
            pixels = [(off[lvl, 0] + x * w, off[lvl, 1] + y * h) for lvl, (h, w) in enumerate(shapes)]
            out = sample_pixels(v, shapes, pixels, weights)  # (B, Lq, C)
        return linear(out, self.output_proj)
