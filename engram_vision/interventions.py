"""Inference-time interventions on Engram memory, each returning a modified copy (the input model is left
untouched): gate clamp (`with_gate`), table collapse (every row -> the layer's mean row) and table
randomisation (fresh N(0,1)). The donor intervention is `EngramGPT.forward(..., engram_tokens=donor)`.

The probes that score these (KL of next-token distributions, bootstrap intervals) are `probes.py`.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import torch

from engram_vision.model import EngramGPT


def _copy_with_engram(model: EngramGPT) -> EngramGPT:
    if model.config.engram is None:
        raise ValueError("this model has no Engram layers to intervene on")
    return copy.deepcopy(model)


def with_gate(model: EngramGPT, gate: str | float) -> EngramGPT:
    """A copy whose Engram gates are `learned`, `off` or clamped to a constant in [0, 1]."""
    clone = _copy_with_engram(model)
    engram = replace(clone.config.engram, gate=gate)  # validates the value
    clone.config = replace(clone.config, engram=engram)
    for memory in clone.engram_layers():
        memory.config, memory.gate = engram, engram.gate
    return clone


@torch.no_grad()
def collapse_tables(model: EngramGPT) -> EngramGPT:
    """A copy where every row of every Engram table equals that table's mean row."""
    clone = _copy_with_engram(model)
    for memory in clone.engram_layers():
        weight = memory.table.weight
        weight.copy_(weight.mean(dim=0, keepdim=True).expand_as(weight))
    return clone


@torch.no_grad()
def randomize_tables(model: EngramGPT, rng: torch.Generator) -> EngramGPT:
    """A copy whose Engram tables are redrawn from N(0,1) with `rng` (on the tables' device)."""
    clone = _copy_with_engram(model)
    for memory in clone.engram_layers():
        weight = memory.table.weight
        weight.copy_(torch.randn(weight.shape, generator=rng, device=weight.device, dtype=weight.dtype))
    return clone
