"""Causal multi-head self-attention with 2D RoPE and an optional key/value cache (grouped-query capable).

Follows LlamaGen's Attention (one fused `wqkv`, `wo`, residual dropout) so checkpoints load strictly.
The cache tensors belong to `cache.DecodeState`; this module only writes its new keys/values into them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engram_vision.config import ModelConfig
from engram_vision.layers import apply_rotary


class Attention(nn.Module):
    """x [B,T,dim] -> [B,T,dim]; queries at positions start..start+T-1 see keys 0..their own position."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head or config.n_head
        self.head_dim = config.head_dim
        self.dim = config.dim
        self.wqkv = nn.Linear(config.dim, (self.n_head + 2 * self.n_kv_head) * self.head_dim, bias=False)
        self.wo = nn.Linear(config.dim, config.dim, bias=False)
        self.attn_dropout_p = config.attn_dropout_p
        self.resid_dropout = nn.Dropout(config.resid_dropout_p)

    def forward(self, x: Tensor, rope: Tensor, cache: tuple[Tensor, Tensor] | None = None,
                positions: Tensor | None = None) -> Tensor:
        """rope [T, hd/2, 2] for these positions; cache (keys, values) [B, kv_heads, capacity, hd] or None;
        positions [T] (device int64) where this chunk sits in the cache (needed with a cache)."""
        batch, length, _ = x.shape
        kv_size = self.n_kv_head * self.head_dim
        q, k, v = self.wqkv(x).split([self.dim, kv_size, kv_size], dim=-1)
        q = apply_rotary(q.view(batch, length, self.n_head, self.head_dim), rope).transpose(1, 2)
        k = apply_rotary(k.view(batch, length, self.n_kv_head, self.head_dim), rope).transpose(1, 2)
        v = v.view(batch, length, self.n_kv_head, self.head_dim).transpose(1, 2)
        mask = None
        if cache is not None:
            # Static cache: write at `positions`, attend over the whole cache with a causal mask, so shapes
            # never change between decode steps and no host value is read (compile / CUDA-graph friendly).
            key_cache, value_cache = cache
            key_cache.index_copy_(2, positions, k.to(key_cache.dtype))
            value_cache.index_copy_(2, positions, v.to(value_cache.dtype))
            k, v = key_cache.to(q.dtype), value_cache.to(q.dtype)
            slots = torch.arange(key_cache.shape[2], device=x.device)
            mask = slots[None, :] <= positions[:, None]  # [T, capacity]
        if self.n_kv_head != self.n_head:
            k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
            v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=cache is None and length > 1,
            dropout_p=self.attn_dropout_p if self.training else 0.0)
        return self.resid_dropout(self.wo(out.transpose(1, 2).reshape(batch, length, self.dim)))
