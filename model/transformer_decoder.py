"""Masked-attention transformer decoder and its prediction heads.

Learned queries attend, layer by layer, to the 1/32, 1/16 and 1/8 features in turn. Each layer
is masked cross-attention -> self-attention -> FFN. Before the first layer and after every layer
the shared heads predict classes and masks; the mask, resized to the next layer's level and
thresholded at sigmoid 0.5, restricts that layer's cross-attention to the predicted foreground.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from m2f.model.linear import dense, linear
from m2f.model.position import sine_position_encoding
from m2f.model.resize import downsample


@dataclass
class Prediction:
    class_logits: Tensor  # (B, Q, K+1)
    mask_logits: Tensor  # (B, Q, H/4, W/4)


class Attention(nn.Module):
    """Multi-head attention with a packed in-projection (nn.MultiheadAttention's parameter layout),
    batch first, on `scaled_dot_product_attention`."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, allowed: Tensor | None = None) -> Tensor:
        """q (B, Lq, C), k/v (B, Lk, C); allowed (B, Lq, Lk) bool, True = may attend."""
        B, Lq, C = q.shape
        M = self.heads
        wq, wk, wv = self.in_proj_weight.chunk(3)
        bq, bk, bv = self.in_proj_bias.chunk(3)
        q = dense(q, wq, bq).view(B, Lq, M, C // M).transpose(1, 2)  # (B, M, Lq, D)
        k = dense(k, wk, bk).view(B, -1, M, C // M).transpose(1, 2)  # (B, M, Lk, D)
        v = dense(v, wv, bv).view(B, -1, M, C // M).transpose(1, 2)  # (B, M, Lk, D)
        mask = None if allowed is None else allowed[:, None]  # (B, 1, Lq, Lk)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return linear(out.transpose(1, 2).reshape(B, Lq, C), self.out_proj)


class DecoderLayer(nn.Module):
    def __init__(self, *, dim: int, heads: int, ffn_dim: int, dropout: float, pre_norm: bool) -> None:
        super().__init__()
        self.pre_norm = pre_norm
        self.cross_attn = Attention(dim, heads, dropout)
        self.cross_norm = nn.LayerNorm(dim)
        self.self_attn = Attention(dim, heads, dropout)
        self.self_norm = nn.LayerNorm(dim)
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.ffn_norm = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)

    def _block(self, x: Tensor, norm: nn.LayerNorm, fn) -> Tensor:
        if self.pre_norm:
            return x + self.drop(fn(norm(x)))
        return norm(x + self.drop(fn(x)))

    def forward(self, x: Tensor, query_pos: Tensor, memory: Tensor, memory_key: Tensor, allowed: Tensor) -> Tensor:
        """x (B, Q, C); memory (B, HW, C); memory_key (B, HW, C) = memory + its position encoding, the cross
        attention's keys before projection (added once per level: three layers share it); allowed (B, Q, HW)."""
        x = self._block(x, self.cross_norm, lambda t: self.cross_attn(t + query_pos, memory_key, memory, allowed))
        x = self._block(x, self.self_norm, lambda t: self.self_attn(t + query_pos, t + query_pos, t))
        return self._block(x, self.ffn_norm, lambda t: linear(self.drop(linear(t, self.linear1, "relu")), self.linear2))


class MLP(nn.Module):
    def __init__(self, dims: list[int]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else torch.relu(layer(x))
        return x


class TransformerDecoder(nn.Module):
    def __init__(
        self,
        *,
        in_channels: int,
        mask_dim: int,
        num_classes: int,
        hidden_dim: int,
        num_queries: int,
        num_heads: int,
        ffn_dim: int,
        num_layers: int,
        pre_norm: bool = False,
        enforce_input_projection: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_levels, self.num_heads = 3, num_heads
        self.query_feat = nn.Embedding(num_queries, hidden_dim)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.level_embed = nn.Embedding(self.num_levels, hidden_dim)
        project = in_channels != hidden_dim or enforce_input_projection
        self.input_proj = nn.ModuleList(
            nn.Conv2d(in_channels, hidden_dim, 1) if project else nn.Identity() for _ in range(self.num_levels)
        )
        self.layers = nn.ModuleList(
            DecoderLayer(dim=hidden_dim, heads=num_heads, ffn_dim=ffn_dim, dropout=dropout, pre_norm=pre_norm)
            for _ in range(num_layers)
        )
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.mask_embed = MLP([hidden_dim, hidden_dim, hidden_dim, mask_dim])

    def predict(
        self, x: Tensor, mask_features: Tensor, target: tuple[int, int] | None, projection: nn.Conv2d | None = None
    ) -> tuple[Prediction, Tensor | None]:
        """Shared heads on queries x (B, Q, C): the prediction, and where the next layer may attend
        (B, Q, h*w) bool at `target` resolution (None when no layer follows). `projection`: see `forward`."""
        h = self.decoder_norm(x)
        class_logits = self.class_embed(h)  # (B, Q, K+1)
        mask_logits = mask_product(self.mask_embed(h), mask_features, projection)  # (B, Q, H/4, W/4)
        if target is None:
            return Prediction(class_logits, mask_logits), None
        with torch.no_grad():
            small = downsample(mask_logits.detach(), target)  # (B, Q, h, w)
            allowed = small.flatten(2).sigmoid() >= 0.5  # (B, Q, h*w)
            # a query whose mask blocks everything attends everywhere instead
            allowed = allowed | ~allowed.any(-1, keepdim=True)
        return Prediction(class_logits, mask_logits), allowed

    def attention_mask(self, x: Tensor, features: Tensor, projection: nn.Conv2d | None = None) -> Tensor:
        """Where the next layer may attend, from queries x (B, Q, C) and mask features already resized to
        that layer's level (B, D, h, w): (B, Q, h*w) bool. Equals resizing the full 1/4 mask prediction,
        since bilinear resizing is linear and commutes with the channel contraction."""
        with torch.no_grad():
            logits = mask_product(self.mask_embed(self.decoder_norm(x)), features, projection)
            allowed = logits.flatten(2).sigmoid() >= 0.5
            return allowed | ~allowed.any(-1, keepdim=True)

    def forward(
        self, feats: list[Tensor], mask_features: Tensor, *, aux: bool = True, projection: nn.Conv2d | None = None
    ) -> list[Prediction]:
        """feats [(B, C, H/32, W/32), (H/16), (H/8)]; mask_features (B, D, H/4, W/4), or, with `projection`
        (the pixel decoder's final 1x1 convolution), the map before it (B, C', H/4, W/4).

        Returns num_layers + 1 predictions, the last one final. With aux=False (inference) only the
        final prediction is computed at full resolution: intermediate layers need nothing but the next
        attention mask, which is computed directly at that layer's (much smaller) resolution.
        """
        if projection is not None and aux:
            mask_features, projection = projection(mask_features), None  # every layer's mask at 1/4 anyway
        memory, memory_key, sizes = [], [], []
        for lvl, x in enumerate(feats[: self.num_levels]):
            B, _, h, w = x.shape
            sizes.append((h, w))
            pos = sine_position_encoding(h, w, self.query_feat.weight.shape[1], x.device)  # (C, h, w)
            proj = self.input_proj[lvl](x).flatten(2) + self.level_embed.weight[lvl][None, :, None]
            memory.append(proj.transpose(1, 2))  # (B, h*w, C)
            memory_key.append(memory[-1] + pos.flatten(1).transpose(0, 1)[None].to(proj.dtype))  # (B, h*w, C)
        B = mask_features.shape[0]
        x = self.query_feat.weight[None].expand(B, -1, -1)  # (B, Q, C)
        query_pos = self.query_embed.weight[None]  # (1, Q, C)
        if not aux:
            resized = [downsample(mask_features, size) for size in sizes]  # (B, D or C', h, w) per level

        def step(i: int, x: Tensor) -> Tensor:
            """Prediction i (0 = before the first layer); returns where layer i + 1 may attend."""
            last = i == len(self.layers)
            if aux or last:
                target = None if last else sizes[i % self.num_levels]
                pred, allowed = self.predict(x, mask_features, target, projection)
                preds.append(pred)
                return allowed
            return self.attention_mask(x, resized[i % self.num_levels], projection)

        preds: list[Prediction] = []
        allowed = step(0, x)
        for i, layer in enumerate(self.layers):
            lvl = i % self.num_levels
            x = layer(x, query_pos, memory[lvl], memory_key[lvl], allowed)
            allowed = step(i + 1, x)
        return preds


def mask_product(embed: Tensor, features: Tensor, projection: nn.Conv2d | None) -> Tensor:
    """Mask logits: query embeddings (B, Q, D) against per-pixel features (B, D, h, w) -> (B, Q, h, w).

    With `projection`, a 1x1 convolution C' -> D, `features` are its input (B, C', h, w), and it is folded
    into the embeddings: e . (W f + b) = (e W) . f + e . b. At inference that is a (Q x D)(D x C') product
    instead of the convolution over every pixel of the 1/4 map (2.1 GFLOP at 512 x 512, 8 at 800 x 1216).
    """
    if projection is None:
        return torch.einsum("bqc,bchw->bqhw", embed, features)
    logits = torch.einsum("bqc,bchw->bqhw", embed @ projection.weight.flatten(1), features)
    if projection.bias is None:
        return logits
    return logits.add_((embed @ projection.bias)[..., None, None])
