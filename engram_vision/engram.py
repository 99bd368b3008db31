"""`EngramMemory`: one Engram layer – hashed n-gram rows of one table, key/value projections, a context
gate and a causal depthwise conv – returning the residual update Y for a block (docs/engram2d.md).

Follows DeepSeek's Engram reference (arXiv 2601.07372): gate = sigmoid(signed_sqrt(<RMSNorm(h),
RMSNorm(W_K e)> / sqrt(d))), y = gate * W_V e, Y = y + SiLU(conv(RMSNorm(y))). Which rows to read is
`hashing.py` (the model hashes all layers at once and hands each its row ids); when decoding, the layer
writes its conv tail into the `DecodeState` slice it is handed, as attention writes its keys and values.
Where the layer sits is `model.py`; the tables themselves `table.py` (on the host: `host_table.py`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engram_vision.config import EngramConfig, ModelConfig
from engram_vision.hashing import HashParams
from engram_vision.host_table import HostTable, RowFetch
from engram_vision.layers import RMSNorm
from engram_vision.table import EngramTable


class EngramMemory(nn.Module):
    """Y [B,T,dim] for hidden states h [B,T,dim] given the table rows [B,T,heads] hashed for them."""

    def __init__(self, config: EngramConfig, model: ModelConfig, params: HashParams):
        super().__init__()
        self.config = config
        self.layer_id = params.layer
        self.grid = model.token_grid
        self.pad_id = model.vocab_size
        self.dim = model.dim
        self.gate: str | float = config.gate
        table_type = HostTable if config.table_device == "host" else EngramTable
        self.table = table_type(params.total_rows, config.head_dim)
        self.table.weight.requires_grad_(config.table == "trainable")
        # W_K and W_V as one matmul: rows [0, dim) are W_K, rows [dim, 2 dim) W_V. Checkpoints with separate
        # key_proj/value_proj weights are fused on load (`_fuse_key_value`).
        self.key_value_proj = nn.Linear(config.memory_dim, 2 * model.dim, bias=False)
        self.register_load_state_dict_pre_hook(_fuse_key_value)
        self.norm_query = RMSNorm(model.dim, model.norm_eps)
        self.norm_key = RMSNorm(model.dim, model.norm_eps)
        # Identity on the gate values [B,T,1]: a place for forward hooks (training logs gate statistics)
        # without the module recording anything itself.
        self.gate_probe = nn.Identity()
        self.tail_len = (config.conv_kernel - 1) * config.conv_dilation if config.use_conv else 0
        if config.use_conv:
            self.conv_norm = RMSNorm(model.dim, model.norm_eps)
            self.conv = nn.Conv1d(model.dim, model.dim, config.conv_kernel, dilation=config.conv_dilation,
                                  groups=model.dim, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Tables N(0,1); conv zero (Y = y at init); projections keep the model's N(0, std) init."""
        nn.init.normal_(self.table.weight, std=1.0)
        if self.config.use_conv:
            nn.init.zeros_(self.conv.weight)

    def prefetch(self, rows: Tensor) -> Tensor | RowFetch:
        """What `forward` should get as `rows`: the ids themselves, or for a host table a fetch started now
        (so the host gathers the rows while earlier blocks run)."""
        return self.table.fetch(rows) if isinstance(self.table, HostTable) and self.gate != "off" else rows

    def gate_values(self, h: Tensor, keys: Tensor) -> Tensor:
        """alpha [B,T,1] in [0,1]."""
        if not isinstance(self.gate, str):
            return h.new_full((*h.shape[:-1], 1), float(self.gate))
        # <RMSNorm_q(h), RMSNorm_k(keys)> / sqrt(dim) without building either normalised tensor: the scales
        # factor out of the sum. With sums of squares s = sum(x^2) and a = eps * dim,
        #   score = sum(h k g_q g_k) * sqrt(dim) * rsqrt((s_h + a) (s_k + a)),
        # in float32 from a few dot products (half the calls of two RMSNorms: at a decode step the number
        # of calls is the cost).
        h32, k32 = h.float(), keys.float()
        weight = self.norm_query.weight * self.norm_key.weight * self.dim ** 0.5
        dot = torch.linalg.vecdot(h32 * weight, k32)
        eps_h, eps_k = self.norm_query.eps * self.dim, self.norm_key.eps * self.dim
        scale = torch.rsqrt((torch.linalg.vecdot(h32, h32) + eps_h) * (torch.linalg.vecdot(k32, k32) + eps_k))
        score = (dot * scale)[..., None]
        if self.config.signed_sqrt:
            score = score.abs().clamp_min(1e-6).sqrt() * score.sign()
        return torch.sigmoid(score).to(h.dtype)

    def forward(self, h: Tensor, rows: Tensor | RowFetch, conv_tail: Tensor | None = None) -> Tensor:
        """Y [B,T,dim]. rows: this layer's table rows [B,T,heads] (`hashing.hash_rows`), or `prefetch(rows)`.
        conv_tail: when decoding, this layer's tail in the `DecodeState` [B,tail,dim] (the normalised values
        of the positions just before these; zeros at the start of a sequence), which this call overwrites
        with the tail after these positions, as attention writes its keys and values into the state's
        cache; None without a state (the sequence starts here and nothing is carried on)."""
        batch, length, _ = h.shape
        if self.gate == "off":
            values = h.new_zeros(batch, length, self.dim)
        else:
            memory = self.table(rows).flatten(-2).to(h.dtype)  # [B,T,d_mem]: one gather for all heads
            keys, values = self.key_value_proj(memory).split(self.dim, dim=-1)
            values = self.gate_probe(self.gate_values(h, keys)) * values
        if not self.config.use_conv:
            return values
        normed = self.conv_norm(values)
        previous = normed.new_zeros(batch, self.tail_len, self.dim) if conv_tail is None else conv_tail
        window = torch.cat([previous.to(normed.dtype), normed], dim=1)  # [B, tail + T, dim]
        weight = self.conv.weight[:, 0].to(window.dtype)  # [dim, kernel]
        mixed = causal_depthwise(window, weight, self.config.conv_dilation, length)
        if conv_tail is not None:
            conv_tail.copy_(window[:, window.shape[1] - self.tail_len:])
        return values + F.silu(mixed)


def causal_depthwise(window: Tensor, weight: Tensor, dilation: int, length: int) -> Tensor:
    """The 'valid' depthwise conv [B, length, dim] of window [B, tail + length, dim] with weight [dim, kernel]
    (what nn.Conv1d computes with groups=dim): over tail + chunk it is the causal conv of the whole
    sequence at the chunk's positions.

    Without autograd (prefill, decode, evaluation) one multiply-sum over an unfolded view: fewest ops,
    which is what a one-position decode step pays for. With autograd `kernel` shifted multiply-adds,
    whose backward is about twice as fast as the unfolded view's (measured on CPU) and far cheaper than a
    grouped conv call for short chunks.
    """
    kernel = weight.shape[1]
    if not (torch.is_grad_enabled() and (window.requires_grad or weight.requires_grad)):
        span = (kernel - 1) * dilation + 1
        return (window.unfold(1, span, 1)[..., ::dilation] * weight).sum(dim=-1)
    mixed = window[:, :length] * weight[:, 0]
    for tap in range(1, kernel):
        mixed = mixed + window[:, tap * dilation:tap * dilation + length] * weight[:, tap]
    return mixed


def _fuse_key_value(module: EngramMemory, state_dict: dict, prefix: str, *args) -> None:
    """Load hook: checkpoints written before the fused projection hold `key_proj.weight` and
    `value_proj.weight`; stack them into `key_value_proj.weight` (W_K rows first)."""
    key, value = state_dict.get(prefix + "key_proj.weight"), state_dict.get(prefix + "value_proj.weight")
    if key is not None and value is not None and prefix + "key_value_proj.weight" not in state_dict:
        state_dict[prefix + "key_value_proj.weight"] = torch.cat([state_dict.pop(prefix + "key_proj.weight"),
                                                                  state_dict.pop(prefix + "value_proj.weight")])
