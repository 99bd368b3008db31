"""Inference-time interventions on Engram memory: gate clamp, table collapse (every row -> the layer's mean
row) and table randomisation (fresh N(0,1)). The donor intervention is
`EngramGPT.forward(..., engram_tokens=donor)`.

Two forms of each: `with_gate`, `collapse_tables` and `randomize_tables` return a modified copy (to save or
sample from); `gate_clamped` (a context manager that restores the gates) and `collapsed_tables` /
`random_tables` (replacement tables for `torch.func.functional_call`) let the probes score many
interventions on one model without a copy of it per intervention. The probes themselves are `probes.py`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

import torch
from torch import Tensor

from engram_vision.model import EngramGPT


def _copy_with_engram(model: EngramGPT) -> EngramGPT:
    if model.config.engram is None:
        raise ValueError("this model has no Engram layers to intervene on")
    return copy.deepcopy(model)


def _set_gate(model: EngramGPT, gate: str | float) -> None:
    engram = replace(model.config.engram, gate=gate)  # validates the value
    model.config = replace(model.config, engram=engram)
    for memory in model.engram_layers():
        memory.config, memory.gate = engram, engram.gate


def with_gate(model: EngramGPT, gate: str | float) -> EngramGPT:
    """A copy whose Engram gates are `learned`, `off` or clamped to a constant in [0, 1]."""
    clone = _copy_with_engram(model)
    _set_gate(clone, gate)
    return clone


@contextmanager
def gate_clamped(model: EngramGPT, gate: str | float) -> Iterator[EngramGPT]:
    """`model` with its gates set to `gate` inside the block, restored afterwards (even on error)."""
    if model.config.engram is None:
        raise ValueError("this model has no Engram layers to intervene on")
    previous = model.config.engram.gate
    _set_gate(model, gate)
    try:
        yield model
    finally:
        _set_gate(model, previous)


def table_names(model: EngramGPT) -> list[str]:
    """Parameter names of the Engram tables, in layer order."""
    return [name for name, _ in model.named_parameters() if name.endswith("engram.table.weight")]


@torch.no_grad()
def collapsed_tables(model: EngramGPT) -> dict[str, Tensor]:
    """Replacement tables (name -> tensor) whose rows all equal the layer's mean row; views, so they cost
    one row per layer."""
    params = dict(model.named_parameters())
    return {name: params[name].mean(dim=0, keepdim=True).expand_as(params[name]) for name in table_names(model)}


@torch.no_grad()
def random_tables(model: EngramGPT, rng: torch.Generator) -> dict[str, Tensor]:
    """Replacement tables (name -> tensor) drawn from N(0,1) with `rng` (on the tables' device)."""
    params = dict(model.named_parameters())
    return {name: torch.randn(params[name].shape, generator=rng, device=params[name].device,
                              dtype=params[name].dtype) for name in table_names(model)}


@torch.no_grad()
def collapse_tables(model: EngramGPT) -> EngramGPT:
    """A copy where every row of every Engram table equals that table's mean row."""
    clone = _copy_with_engram(model)
    params = dict(clone.named_parameters())
    for name, table in collapsed_tables(clone).items():
        params[name].copy_(table)
    return clone


@torch.no_grad()
def randomize_tables(model: EngramGPT, rng: torch.Generator) -> EngramGPT:
    """A copy whose Engram tables are redrawn from N(0,1) with `rng` (on the tables' device)."""
    clone = _copy_with_engram(model)
    params = dict(clone.named_parameters())
    for name, table in random_tables(clone, rng).items():
        params[name].copy_(table)
    return clone
