"""Swin's window order as indices: the same tokens, in the same places, as padding the map to whole windows,
rolling it by the shift and cutting it into windows."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from m2f.model.swin import take_tokens, window_order, window_partition


@pytest.mark.parametrize("H,W,shift", [(14, 21, 0), (16, 9, 3), (7, 7, 3), (5, 12, 3)])
def test_window_order_matches_pad_roll_partition(H, W, shift) -> None:
    window, B, C = 7, 2, 4
    x = torch.randn(B, H * W, C)
    Hp, Wp = H + (-H) % window, W + (-W) % window
    padded = F.pad(x.view(B, H, W, C), (0, 0, 0, Wp - W, 0, Hp - H))  # zeros where the padding goes
    rolled = torch.roll(padded, shifts=(-shift, -shift), dims=(1, 2)) if shift else padded
    want = window_partition(rolled, window).view(B, -1, C)  # (B, nW*w*w, C)

    gather, scatter = window_order(H, W, window, shift, x.device)
    got = take_tokens(F.pad(x, (0, 0, 0, 1)), gather)  # the extra zero token stands for the padding
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert int((gather == H * W).sum()) == Hp * Wp - H * W
    torch.testing.assert_close(take_tokens(got, scatter), x, rtol=0, atol=0)  # and back to image order
