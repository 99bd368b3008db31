"""Autoregressive generation with a KV cache: `prefill`, `decode_one_token`, `generate`.

Classifier-free guidance runs the conditional and unconditional halves as one batch of 2B and mixes their
logits once per step (`sampling.cfg_mix`); token choice is `sampling.sample_next` with an explicit
generator. Follows LlamaGen's generate (c2i, CFG on raw logits) and gpt-fast's prefill/decode split.

With `compile=True` the decode step's forward is `torch.compile`d once (fixed shapes: the cache is
static, `engram_vision.cache`; CUDA graphs on GPU via mode "reduce-overhead"); sampling stays eager so the
explicit generator is honoured. Nothing in the loop reads a device value back to the host.
The model and its cache are `engram_vision`; writing images is `sample/job.py`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from engram_vision.cache import DecodeState
from engram_vision.model import EngramGPT
from sample.sampling import SamplingConfig, cfg_mix, cfg_scale_at, sample_next


def guided_labels(model: EngramGPT, labels: Tensor, sampling: SamplingConfig) -> Tensor:
    """labels [B] -> [2B] (conditional, then the null label) under CFG, else unchanged."""
    if not sampling.uses_cfg:
        return labels
    if not model.cls_embedding.has_null:
        raise ValueError("cfg_scale != 1 needs a null label, but the model has none (class_dropout_prob = 0)")
    return torch.cat([labels, torch.full_like(labels, model.config.num_classes)])


def _next_token(logits: Tensor, step: int, num_steps: int, sampling: SamplingConfig,
                rng: torch.Generator) -> Tensor:
    """Last-position logits [B or 2B, V] -> tokens [B], mixing the CFG halves when present."""
    if sampling.uses_cfg:
        cond, uncond = logits.chunk(2, dim=0)
        logits = cfg_mix(cond, uncond, cfg_scale_at(step, num_steps, sampling))
    return sample_next(logits, sampling, rng)


@torch.no_grad()
def prefill(model: EngramGPT, labels: Tensor, state: DecodeState, sampling: SamplingConfig,
            rng: torch.Generator, num_steps: int) -> Tensor:
    """Run the class token (position 0) into a fresh `state`; returns the first image tokens [B].

    num_steps: tokens the whole generation will sample (the CFG schedule's length)."""
    batch_labels = guided_labels(model, labels, sampling)
    empty = torch.zeros(batch_labels.shape[0], 0, dtype=torch.long, device=labels.device)
    logits = model(empty, batch_labels, state)
    return _next_token(logits[:, -1], 0, num_steps, sampling, rng)


@torch.no_grad()
def decode_one_token(model: EngramGPT, token: Tensor, labels: Tensor, state: DecodeState, step: int,
                     num_steps: int, sampling: SamplingConfig, rng: torch.Generator,
                     forward: Callable[..., Tensor] | None = None) -> Tensor:
    """Feed image token `step - 1` ([B]) at the state's next position; returns image token `step` [B].

    forward: what runs the model (default the model itself; `compiled_decoder(model)` for speed)."""
    batch_labels = guided_labels(model, labels, sampling)
    inputs = token[:, None].repeat(batch_labels.shape[0] // token.shape[0], 1)
    logits = (model if forward is None else forward)(inputs, batch_labels, state)
    return _next_token(logits[:, -1], step, num_steps, sampling, rng)


def compiled_decoder(model: EngramGPT, device_type: str) -> Callable[..., Tensor]:
    """The model's forward compiled for one-token decode steps with a static state (fixed shapes); on
    CUDA with CUDA graphs ("reduce-overhead"). Compiled code is cached by torch per model."""
    engram = model.config.engram
    if engram is not None and engram.table_device == "host":
        raise ValueError("EngramConfig.table_device='host' reads rows through the host every step and cannot "
                         "be compiled; decode eagerly (compile=False) or keep the tables on the device")
    mode = "reduce-overhead" if device_type == "cuda" else None
    return torch.compile(model, mode=mode, dynamic=False, fullgraph=True)


def decode_setup(model: EngramGPT, labels: Tensor, sampling: SamplingConfig,
                 compile: bool) -> tuple[DecodeState, Callable[..., Tensor] | None]:
    """A fresh static state for generating `labels` (2B rows under CFG) and the `forward` that
    `decode_one_token` should use: None (eager) or `compiled_decoder(model)`."""
    rows = labels.shape[0] * (2 if sampling.uses_cfg else 1)
    dtype = next(model.parameters()).dtype
    state = DecodeState.allocate(model.config, rows, device=labels.device, dtype=dtype)
    if not compile:
        return state, None
    if labels.device.type == "cuda":  # CUDA graphs replay on fixed addresses: the caches must not move
        for tensor in [*state.keys, *state.values, state.tokens, state.position, *state.conv_tails.values()]:
            torch._dynamo.mark_static_address(tensor)
    return state, compiled_decoder(model, labels.device.type)


@torch.no_grad()
def generate(model: EngramGPT, labels: Tensor, sampling: SamplingConfig, rng: torch.Generator,
             num_tokens: int | None = None, compile: bool = False) -> Tensor:
    """Sample image tokens [B, num_tokens] (default: the whole grid) for class `labels` [B].

    compile: run decode steps through `compiled_decoder` (the first call per shape pays the compile)."""
    config = model.config
    num_tokens = config.block_size if num_tokens is None else num_tokens
    if not 1 <= num_tokens <= config.block_size:
        raise ValueError(f"num_tokens must be in [1, {config.block_size}], got {num_tokens}")
    state, forward = decode_setup(model, labels, sampling, compile)
    out = torch.empty(labels.shape[0], num_tokens, dtype=torch.long, device=labels.device)
    out[:, 0] = prefill(model, labels, state, sampling, rng, num_tokens)  # eager: runs once per batch
    for step in range(1, num_tokens):
        out[:, step] = decode_one_token(model, out[:, step - 1], labels, state, step, num_tokens, sampling, rng,
                                        forward)
    return out
