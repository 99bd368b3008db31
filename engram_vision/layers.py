"""Small Transformer layers with LlamaGen's arithmetic: RMSNorm, SwiGLU, 2D RoPE, the label embedder.

Follows LlamaGen (autoregressive/models/gpt.py): same parameter names and rounding, so its c2i checkpoints
load strictly. Attention is `attention.py`; the block and model are `model.py`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RMSNorm(nn.Module):
    """x / rms(x) in float32, cast back, times a learned scale (LlamaGen's order of operations)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # The same float32 arithmetic as the lines below (bitwise equal in tests), in one call instead
            # of six (at a decode step the number of calls is the cost).
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x), then dropout."""

    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.ffn_dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.ffn_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


def rope_2d_table(grid: tuple[int, int], head_dim: int, base: float, cls_token_num: int,
                  zero_class: bool) -> Tensor:
    """(cos, sin) per position and rotary pair: [cls_token_num + H*W, head_dim // 2, 2].

    The first half of each head's pairs encodes the row, the second half the column; class positions get
    cos = sin = 0 when `zero_class` (LlamaGen's quirk: their q and k become zero), else no rotation.
    Follows LlamaGen's precompute_freqs_cis_2d.
    """
    rows, cols = grid
    half = head_dim // 2
    freqs = 1.0 / (base ** (torch.arange(0, half, 2)[: half // 2].float() / half))  # [head_dim // 4]
    row_angles = torch.outer(torch.arange(rows).float(), freqs)  # [H, hd/4]
    col_angles = torch.outer(torch.arange(cols).float(), freqs)  # [W, hd/4]
    angles = torch.cat([row_angles[:, None, :].expand(rows, cols, -1),
                        col_angles[None, :, :].expand(rows, cols, -1)], dim=-1).flatten(0, 1)  # [H*W, hd/2]
    table = torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)
    cls = torch.zeros(cls_token_num, half, 2)
    if not zero_class:
        cls[..., 0] = 1.0
    return torch.cat([cls, table])


def apply_rotary(x: Tensor, rope: Tensor) -> Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of x [B,T,heads,hd] by rope [T, hd/2, 2], in float32."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    cos, sin = rope[None, :, None, :, 0], rope[None, :, None, :, 1]
    rotated = torch.stack([pairs[..., 0] * cos - pairs[..., 1] * sin,
                           pairs[..., 1] * cos + pairs[..., 0] * sin], dim=-1)
    return rotated.flatten(3).type_as(x)


class LabelEmbedder(nn.Module):
    """Class label -> embedding [B,1,dim]; row `num_classes` is the null label when dropout is on."""

    def __init__(self, num_classes: int, dim: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), dim)

    @property
    def has_null(self) -> bool:
        return self.embedding_table.num_embeddings > self.num_classes

    def forward(self, labels: Tensor, drop: bool) -> Tensor:
        """labels [B] int64 in [0, num_classes] (num_classes = null); `drop` applies label dropout."""
        if drop and self.dropout_prob > 0:
            dropped = torch.rand(labels.shape, device=labels.device) < self.dropout_prob
            labels = torch.where(dropped, torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels).unsqueeze(1)
