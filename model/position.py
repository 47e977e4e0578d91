"""Sine positional encoding (DETR style, normalised, scale 2π, temperature 10000).

Always computed in fp32 — under bf16 the high-frequency terms would lose all precision — and
cached per (height, width, channels, device), since every image of a batch, and every batch of
the same padded size, gets the very same encoding.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_CACHE: dict[tuple, Tensor] = {}
_CACHE_LIMIT = 64


def _build(h: int, w: int, channels: int, device: torch.device, temperature: float) -> Tensor:
    feats = channels // 2
    eps, scale = 1e-6, 2 * math.pi
    y = torch.arange(1, h + 1, dtype=torch.float32, device=device)
    x = torch.arange(1, w + 1, dtype=torch.float32, device=device)
    y = y / (y[-1] + eps) * scale
    x = x / (x[-1] + eps) * scale
    dim_t = torch.arange(feats, dtype=torch.float32, device=device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / feats)
    px = x[:, None] / dim_t  # (W, F)
    py = y[:, None] / dim_t  # (H, F)
    px = torch.stack((px[:, 0::2].sin(), px[:, 1::2].cos()), dim=2).flatten(1)  # (W, F) interleaved
    py = torch.stack((py[:, 0::2].sin(), py[:, 1::2].cos()), dim=2).flatten(1)  # (H, F)
    pos = torch.cat((py[:, None, :].expand(h, w, feats), px[None, :, :].expand(h, w, feats)), dim=2)
    return pos.permute(2, 0, 1).contiguous()  # (C, H, W)


def sine_position_encoding(h: int, w: int, channels: int, device: torch.device, temperature: float = 10000.0) -> Tensor:
    """(C, H, W) fp32 encoding: first C/2 channels encode y, the rest x."""
    key = (h, w, channels, str(device), temperature)
    pos = _CACHE.get(key)
    if pos is None:
        if len(_CACHE) >= _CACHE_LIMIT:
            _CACHE.clear()
        with torch.autocast(device_type=torch.device(device).type, enabled=False):
            pos = _build(h, w, channels, torch.device(device), temperature)
        if not torch.compiler.is_compiling():
            _CACHE[key] = pos
    return pos
