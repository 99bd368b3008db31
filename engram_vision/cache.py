"""`DecodeState`: what incremental decoding carries between calls of `EngramGPT.forward(..., state=...)`.

Per attention layer the keys and values of every processed position; the image tokens so far (Engram
hashes cells up to W+1 back); per Engram layer the tail of normalised values its causal conv needs
((kernel - 1) x dilation positions); and the number of positions filled, as a device tensor. The model
writes into the state; the state never computes anything.

The cache is static: every tensor is preallocated at full length and a decode step writes at its position
(a device tensor) and attends over the whole cache under a mask, so every step has the same shapes, reads
no host value, and can run as one compiled graph (CUDA graphs on GPU; `sample/generate.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from engram_vision.config import ModelConfig


@dataclass
class DecodeState:
    """Caches for a batch of sequences being decoded; `pos` positions are filled (0 = nothing yet)."""

    keys: list[Tensor]
    """Per block [B, n_kv_head, seq_len, head_dim]."""
    values: list[Tensor]
    """Per block [B, n_kv_head, seq_len, head_dim]."""
    tokens: Tensor
    """[B, block_size] int64 image tokens; entries at and beyond pos - 1 are not yet written."""
    conv_tails: dict[int, Tensor] = field(default_factory=dict)
    """Per Engram layer id [B, (kernel-1)*dilation, dim] of the most recent normalised gated values."""
    position: Tensor | None = None
    """int64 scalar on the caches' device: positions processed so far (position 0 is the class token)."""
    started: bool = False
    """Whether the class token has been processed (the first call with this state adds it)."""

    def __post_init__(self) -> None:
        if self.position is None:
            self.position = torch.zeros((), dtype=torch.long, device=self.tokens.device)

    @classmethod
    def allocate(cls, config: ModelConfig, batch_size: int, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32) -> DecodeState:
        """Empty caches for `batch_size` sequences of up to `config.seq_len` positions."""
        kv_heads = config.n_kv_head or config.n_head
        shape = (batch_size, kv_heads, config.seq_len, config.head_dim)
        keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        tokens = torch.zeros(batch_size, config.block_size, dtype=torch.long, device=device)
        tails = {}
        engram = config.engram
        if engram is not None and engram.use_conv:
            tail = (engram.conv_kernel - 1) * engram.conv_dilation
            tails = {layer: torch.zeros(batch_size, tail, config.dim, device=device, dtype=dtype)
                     for layer in engram.layers}
        return cls(keys, values, tokens, tails)

    @property
    def pos(self) -> int:
        """Positions processed so far, read back to the host (a synchronisation: not for decode loops)."""
        return int(self.position)

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    @property
    def capacity(self) -> int:
        """Most positions the state can hold."""
        return self.keys[0].shape[2] if self.keys else self.tokens.shape[1]
