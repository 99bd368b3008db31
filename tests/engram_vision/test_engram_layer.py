"""EngramMemory's arithmetic against the spec written out with plain modules (docs/engram2d.md): the
fused gate score equals sigmoid(signed_sqrt(<RMSNorm_q(h), RMSNorm_k(W_K e)> / sqrt(dim))), the conv tail
equals a causal nn.Conv1d (values and gradients, both code paths of `causal_depthwise`), and RMSNorm's
one-call float32 path equals its written-out arithmetic."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engram_vision.config import EngramConfig, model_config
from engram_vision.engram import EngramMemory, causal_depthwise
from engram_vision.hashing import make_hash_params
from engram_vision.layers import RMSNorm


def _memory(signed_sqrt: bool = True, dilation: int = 2) -> EngramMemory:
    engram = EngramConfig(layers=(0,), heads_per_order=2, head_dim=8, rows_per_head=61, signed_sqrt=signed_sqrt,
                          conv_kernel=3, conv_dilation=dilation)
    config = model_config("gpt-small", engram=engram)
    torch.manual_seed(0)
    memory = EngramMemory(engram, config, make_hash_params(engram, config.vocab_size, config.num_classes)[0])
    with torch.no_grad():  # non-trivial norm scales and conv, so every term of the formula matters
        for norm in (memory.norm_query, memory.norm_key, memory.conv_norm):
            norm.weight.uniform_(0.5, 1.5)
        memory.conv.weight.normal_()
    return memory


def _spec_gate(memory: EngramMemory, h: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """The reference's gate with two explicit RMSNorms (LlamaGen's written-out order of operations)."""
    def rms_norm(x: torch.Tensor, norm: RMSNorm) -> torch.Tensor:
        x32 = x.float()
        return x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight

    score = (rms_norm(h, memory.norm_query) * rms_norm(keys, memory.norm_key)).sum(-1, keepdim=True)
    score = score / memory.dim ** 0.5
    if memory.config.signed_sqrt:
        score = score.abs().clamp_min(1e-6).sqrt() * score.sign()
    return torch.sigmoid(score)


@pytest.mark.parametrize("signed_sqrt", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_gate_equals_two_rms_norms(signed_sqrt: bool, dtype: torch.dtype):
    memory = _memory(signed_sqrt)
    generator = torch.Generator().manual_seed(1)
    h = (torch.randn(3, 5, memory.dim, generator=generator) * 4).to(dtype)
    keys = (torch.randn(3, 5, memory.dim, generator=generator) * 0.1).to(dtype)
    keys[0, 0] = h[0, 0]  # aligned: the gate near its top
    keys[0, 1] = -h[0, 1]  # opposed: near its bottom
    gate = memory.gate_values(h, keys).detach()
    expected = _spec_gate(memory, h, keys)
    assert gate.dtype == dtype and gate.shape == (3, 5, 1)
    torch.testing.assert_close(gate.float(), expected, atol=1e-6 if dtype == torch.float32 else 4e-3, rtol=0)
    assert float(gate[0, 0]) > 0.7 and float(gate[0, 1]) < 0.3


def test_gate_gradients_equal_the_spec():
    memory = _memory()
    h = torch.randn(2, 4, memory.dim, requires_grad=True)
    keys = torch.randn(2, 4, memory.dim, requires_grad=True)
    weights = torch.randn(2, 4, 1)
    grads = torch.autograd.grad((memory.gate_values(h, keys) * weights).sum(),
                                (h, keys, memory.norm_query.weight, memory.norm_key.weight))
    expected = torch.autograd.grad((_spec_gate(memory, h, keys) * weights).sum(),
                                   (h, keys, memory.norm_query.weight, memory.norm_key.weight))
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("dilation", [1, 2])
def test_forward_is_gated_values_plus_a_causal_conv_tail(dilation: int):
    memory = _memory(dilation=dilation)
    generator = torch.Generator().manual_seed(2)
    h = torch.randn(2, 7, memory.dim, generator=generator)
    rows = torch.randint(memory.table.num_embeddings, (2, 7, memory.config.num_heads), generator=generator)
    tail = torch.full((2, memory.tail_len, memory.dim), 7.0)  # overwritten in place, as a DecodeState's
    start = torch.zeros_like(tail)
    out = memory(h, rows, start)  # a zero tail: the sequence starts here
    assert torch.equal(out, memory(h, rows)) and not torch.equal(start, torch.zeros_like(start))
    memory(h, rows, tail)
    keys, values = memory.key_value_proj(memory.table(rows).flatten(-2)).split(memory.dim, dim=-1)
    y = _spec_gate(memory, h, keys) * values
    normed = memory.conv_norm(y).transpose(1, 2)  # [B, dim, T]
    conv = memory.conv(F.pad(normed, (memory.tail_len, 0))).transpose(1, 2)  # left zero padding: causal
    torch.testing.assert_close(out, y + F.silu(conv), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tail, normed.transpose(1, 2)[:, -memory.tail_len:])


@pytest.mark.parametrize("dilation", [1, 3])
def test_causal_depthwise_equals_grouped_conv1d_with_and_without_autograd(dilation: int):
    generator = torch.Generator().manual_seed(3)
    dim, kernel, length = 6, 3, 9
    window = torch.randn(2, (kernel - 1) * dilation + length, dim, generator=generator, requires_grad=True)
    weight = torch.randn(dim, kernel, generator=generator, requires_grad=True)
    expected = F.conv1d(window.transpose(1, 2), weight[:, None], dilation=dilation, groups=dim).transpose(1, 2)
    with torch.no_grad():  # the unfolded path
        torch.testing.assert_close(causal_depthwise(window, weight, dilation, length), expected.detach())
    got = causal_depthwise(window, weight, dilation, length)  # the shifted multiply-add path
    torch.testing.assert_close(got, expected)
    upstream = torch.randn(expected.shape, generator=generator)
    for want, have in zip(torch.autograd.grad((expected * upstream).sum(), (window, weight)),
                          torch.autograd.grad((got * upstream).sum(), (window, weight)), strict=True):
        torch.testing.assert_close(have, want)


@pytest.mark.parametrize("shape", [(8, 1, 16), (2, 5, 16)])
def test_rms_norm_one_call_path_is_the_written_out_arithmetic(shape: tuple[int, ...]):
    norm = RMSNorm(16, eps=1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(shape) * 3
    written_out = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps)) * norm.weight
    torch.testing.assert_close(norm(x), written_out, atol=1e-6, rtol=1e-6)
    bf16 = norm.to(torch.bfloat16)  # the cast-then-scale path (LlamaGen's order), unchanged
    x16 = x.bfloat16()
    expected16 = (x16.float() * torch.rsqrt(x16.float().pow(2).mean(-1, keepdim=True) + norm.eps)).bfloat16()
    assert torch.equal(bf16(x16), expected16 * bf16.weight)
