"""Point sampling for the matcher and the mask losses (PointRend's procedure, as Mask2Former uses it).

Coordinates are normalised to [0, 1] as (x, y) over the whole map, so one set of points reads the
same places on a 1/4-resolution prediction and on a full-resolution target mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def rand_points(n: int, num_points: int, device: torch.device, generator: torch.Generator | None = None) -> Tensor:
    """(n, P, 2) uniform points in [0, 1]; drawn on the generator's device, then moved to `device`."""
    if generator is None:
        return torch.rand(n, num_points, 2, device=device)
    return torch.rand(n, num_points, 2, generator=generator, device=generator.device).to(device)


def point_sample(input: Tensor, coords: Tensor) -> Tensor:
    """Bilinear values of `input` at normalised points.

    input (N, C, H, W), coords (N, P, 2) in [0, 1] as (x, y) -> (N, C, P).
    Points outside a pixel centre's reach read zero padding (grid_sample, align_corners=False).
    """
    if input.ndim != 4 or coords.ndim != 3 or coords.shape[-1] != 2 or coords.shape[0] != input.shape[0]:
        raise ValueError(
            f"expected input (N, C, H, W) and coords (N, P, 2), got {tuple(input.shape)} and {tuple(coords.shape)}"
        )
    grid = (2.0 * coords - 1.0).unsqueeze(2)  # (N, P, 1, 2) in [-1, 1]
    out = F.grid_sample(input, grid.to(input.dtype), mode="bilinear", align_corners=False)  # (N, C, P, 1)
    return out.squeeze(3)  # (N, C, P)


@torch.no_grad()
def uncertain_point_coords(
    logits: Tensor,
    num_points: int,
    oversample_ratio: float = 3.0,
    importance_sample_ratio: float = 0.75,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Points biased towards where the mask is least certain (|logit| near 0).

    logits (N, 1, H, W) -> coords (N, P, 2), P = num_points. Draws P * oversample_ratio uniform
    points, keeps the importance_sample_ratio * P with the highest uncertainty -|logit|, and fills
    the rest with fresh uniform points.
    """
    if logits.ndim != 4 or logits.shape[1] != 1:
        raise ValueError(f"logits must be (N, 1, H, W), got {tuple(logits.shape)}")
    if num_points < 1:
        raise ValueError(f"num_points must be >= 1, got {num_points}")
    if oversample_ratio < 1:
        raise ValueError(f"oversample_ratio must be >= 1, got {oversample_ratio}")
    if not 0 <= importance_sample_ratio <= 1:
        raise ValueError(f"importance_sample_ratio must be in [0, 1], got {importance_sample_ratio}")
    n = logits.shape[0]
    num_sampled = int(num_points * oversample_ratio)
    num_uncertain = int(importance_sample_ratio * num_points)
    num_random = num_points - num_uncertain

    candidates = rand_points(n, num_sampled, logits.device, generator)  # (N, S, 2)
    uncertainty = -point_sample(logits.float(), candidates).abs()[:, 0]  # (N, S)
    top = uncertainty.topk(num_uncertain, dim=1).indices  # (N, P_u)
    chosen = candidates.gather(1, top[..., None].expand(-1, -1, 2))  # (N, P_u, 2)
    if num_random == 0:
        return chosen
    return torch.cat([chosen, rand_points(n, num_random, logits.device, generator)], dim=1)  # (N, P, 2)
