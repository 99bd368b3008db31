"""Parameter budgets for Engram studies: analytic counts, FLOPs/token and the rho solver (docs/engram2d.md).

rho = P_backbone / (P_backbone + P_memory), where P_memory is the Engram tables only (projections, norms and
conv are backbone). `count_parameters` and `flops_per_token` are closed forms over a `ModelConfig` (no model
is built; the tests check them against `EngramGPT` on the meta device). `solve_budget` picks, for a total
budget and a rho, a backbone from a `Family` and the `rows_per_head` that fills the rest with memory;
`budget_table` sweeps rho. `python -m study budget` prints the table (any size, budget, data and Engram
layout) and `python -m study configs` writes training configs from the solutions (study/configs.py).
Building the model is `model.py`; the table primes come from `hashing.make_hash_params`; training the
solved configs is `train/`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any, Literal

from engram_vision.config import EngramConfig, ModelConfig
from engram_vision.hashing import make_hash_params

BUDGET_TOLERANCE = 0.01
"""Largest relative gap |total - budget| / budget a solution may have."""
STUDY_ENGRAM = EngramConfig(layers=(1, 6), neighborhoods=(("L", "U"), ("L", "U", "UL", "UR")),
                            heads_per_order=8, head_dim=32)
"""The Engram layout the study sweeps rho with (rows_per_head is what the solver sets)."""
STUDY_RHOS = (0.17, 0.3, 0.5, 0.7, 0.9)


@dataclass(frozen=True)
class ParamCounts:
    """Parameters of a `ModelConfig`, split into backbone and Engram tables."""

    backbone: int
    """Everything but the Engram tables: embeddings, blocks, head and the Engram projections/norms/conv."""
    memory: int
    """Engram table parameters only (0 without Engram)."""

    @property
    def total(self) -> int:
        return self.backbone + self.memory

    @property
    def rho(self) -> float:
        """backbone / total (1.0 without Engram)."""
        return self.backbone / self.total


@dataclass(frozen=True)
class Family:
    """How `solve_budget` shapes the backbone: one coarse axis, then an optional fine SwiGLU trim."""

    vary: Literal["width", "depth"] = "width"
    """`width`: keep the base's depth and attention head dim, dim = n_head x head_dim; `depth`: keep the
    base's width, vary n_layer (at least one more than the deepest Engram layer)."""
    trim_ffn: bool = True
    """Fine-tune the SwiGLU hidden width (ffn_dim_multiplier, multiple_of=ffn_multiple_of) so the backbone
    lands on rho x total; without it one width step (about 16M parameters at GPT-B) bounds the rho error."""
    ffn_multiple_of: int = 32
    """Rounding of the trimmed SwiGLU hidden width."""

    def __post_init__(self) -> None:
        if self.vary not in ("width", "depth"):
            raise ValueError(f"Family.vary must be 'width' or 'depth', got {self.vary!r}")
        if self.ffn_multiple_of < 1:
            raise ValueError(f"Family.ffn_multiple_of must be >= 1, got {self.ffn_multiple_of}")


WIDTH = Family()
DEPTH = Family(vary="depth")


@dataclass(frozen=True)
class BudgetSolution:
    """A solved configuration and how close it lands."""

    config: ModelConfig
    """Backbone shape plus `engram` with rows_per_head set (engram None at rho = 1)."""
    counts: ParamCounts
    flops_per_token: float
    budget: int
    """The requested total parameters."""
    rho: float
    """The requested rho (the achieved one is counts.rho)."""

    @property
    def error(self) -> float:
        """Signed relative error of the total to the budget: (total - budget) / budget."""
        return (self.counts.total - self.budget) / self.budget


def _table_rows(config: ModelConfig) -> int:
    """Rows over all Engram tables: the real primes, as the model draws them."""
    if config.engram is None:
        return 0
    params = make_hash_params(config.engram, config.vocab_size, config.num_classes)
    return sum(p.total_rows for p in params.values())


def _backbone(config: ModelConfig) -> int:
    dim, n_kv = config.dim, config.n_kv_head or config.n_head
    embeddings = (config.vocab_size + config.num_classes + int(config.class_dropout_prob > 0)) * dim
    attention = dim * (config.n_head + 2 * n_kv) * config.head_dim + dim * dim
    block = attention + 3 * dim * config.ffn_hidden + 2 * dim  # + attention_norm, ffn_norm
    total = embeddings + config.n_layer * block + dim + dim * config.vocab_size  # + final norm, output head
    engram = config.engram
    if engram is not None:
        per_layer = 2 * engram.memory_dim * dim + 2 * dim  # key/value projections, query/key norms
        if engram.use_conv:
            per_layer += dim + dim * engram.conv_kernel  # conv_norm, depthwise conv (no bias)
        total += len(engram.layers) * per_layer
    return total


def count_parameters(config: ModelConfig) -> ParamCounts:
    """Analytic parameter counts of `EngramGPT(config)` (equal to counting the built model's parameters)."""
    memory = 0 if config.engram is None else _table_rows(config) * config.engram.head_dim
    return ParamCounts(backbone=_backbone(config), memory=memory)


def flops_per_token(config: ModelConfig) -> float:
    """Forward FLOPs per token, averaged over one causal sequence of `seq_len` positions:

        2 x (n_layer x (|wqkv| + |wo| + 3 dim ffn_hidden) + dim vocab + n_engram x 2 d_mem dim)
        + 2 x 2 x n_layer x dim x (seq_len + 1) / 2

    The first term is one multiply-add per matmul weight (attention, SwiGLU, output head, Engram key/value
    projections); embedding and table lookups are gathers (0). The second is QK^T and AV: position i sees
    i + 1 keys, so the mean context is (seq_len + 1) / 2. Norms, gates, softmax and the depthwise conv are
    O(dim) per token and left out.
    """
    dim, n_kv = config.dim, config.n_kv_head or config.n_head
    per_layer = dim * (config.n_head + 2 * n_kv) * config.head_dim + dim * dim + 3 * dim * config.ffn_hidden
    matmul = config.n_layer * per_layer + dim * config.vocab_size
    if config.engram is not None:
        matmul += len(config.engram.layers) * 2 * config.engram.memory_dim * dim
    mean_context = (config.seq_len + 1) / 2
    return 2.0 * matmul + 2.0 * 2.0 * config.n_layer * dim * mean_context


def _candidates(base: ModelConfig, family: Family, min_depth: int) -> Iterable[ModelConfig]:
    """Backbones of the family in increasing size (each a valid ModelConfig)."""
    if family.vary == "depth":
        for n_layer in range(max(1, min_depth), 100_000):
            yield replace(base, n_layer=n_layer)
        return
    head_dim = base.head_dim
    # Grouped-query attention keeps its group size, so n_head must stay a multiple of it.
    group = base.n_head // (base.n_kv_head or base.n_head)
    for n_head in range(group, 100_000, group):
        n_kv = None if base.n_kv_head is None else n_head // group
        yield replace(base, dim=n_head * head_dim, n_head=n_head, n_kv_head=n_kv)


def _nearest_backbone(target: float, base: ModelConfig, family: Family,
                      min_depth: int) -> tuple[ModelConfig, float, float]:
    """The family member whose backbone count is nearest `target` (counts grow with width and depth), and
    the backbone range a trim may move it to: halfway to each neighbouring member (the step to the one
    neighbour at the low end), so a trim never stands in for a coarse step the family does not have."""
    members: list[tuple[ModelConfig, int]] = []
    for config in _candidates(base, family, min_depth):
        members.append((config, _backbone(config)))
        if len(members) >= 2 and members[-2][1] >= target:
            break
    else:
        raise ValueError(f"solve_budget: no {family.vary} up to the search limit reaches {target:.0f} parameters")
    first_above = next(i for i, (_, count) in enumerate(members) if count >= target)
    pick = first_above
    if first_above > 0 and target - members[first_above - 1][1] < members[first_above][1] - target:
        pick = first_above - 1
    config, count = members[pick]
    up = (members[pick + 1][1] - count) / 2
    down = (count - members[pick - 1][1]) / 2 if pick > 0 else up
    return config, count - down, count + up


def _trim_ffn(config: ModelConfig, target: float, low: float, high: float, multiple_of: int) -> ModelConfig:
    """Set the SwiGLU hidden width (a multiple of `multiple_of`, >= it) whose backbone is nearest target
    within [low, high]."""
    per_unit = 3 * config.dim * config.n_layer  # backbone parameters per unit of hidden width
    fixed = _backbone(config) - per_unit * config.ffn_hidden
    smallest = max(multiple_of, math.ceil((low - fixed) / per_unit / multiple_of) * multiple_of)
    largest = max(smallest, math.floor((high - fixed) / per_unit / multiple_of) * multiple_of)
    hidden = min(largest, max(smallest, round((target - fixed) / per_unit / multiple_of) * multiple_of))
    # ffn_hidden = ceil(int(mult x int(8 dim / 3)) / multiple_of) x multiple_of; the + 0.5 makes int() land
    # on `hidden` exactly despite float rounding.
    multiplier = (hidden + 0.5) / int(2 * 4 * config.dim / 3)
    trimmed = replace(config, multiple_of=multiple_of, ffn_dim_multiplier=multiplier)
    assert trimmed.ffn_hidden == hidden, (trimmed.ffn_hidden, hidden)
    return trimmed


def _fill_memory(config: ModelConfig, engram: EngramConfig, target: int) -> ModelConfig:
    """Set rows_per_head so the tables hold about `target` parameters, correcting with the real primes."""
    unit = len(engram.layers) * engram.num_heads * engram.head_dim  # parameters per row per head
    smallest = count_parameters(replace(config, engram=replace(engram, rows_per_head=1))).memory
    if target < smallest:
        raise ValueError(f"solve_budget: {target} parameters left for memory is less than one row per head "
                         f"({smallest}); raise rho or the budget")
    rows = max(1, round(target / unit))
    best, best_gap = rows, math.inf
    # Primes lie just above rows_per_head (the gap grows with the head count), so step by the residual.
    for _ in range(20):
        memory = count_parameters(replace(config, engram=replace(engram, rows_per_head=rows))).memory
        if abs(memory - target) < best_gap:
            best, best_gap = rows, abs(memory - target)
        corrected = max(1, rows + round((target - memory) / unit))
        if corrected == rows:
            break
        rows = corrected
    return replace(config, engram=replace(engram, rows_per_head=best))


def solve_budget(total_params: int, rho: float, base: ModelConfig, engram: EngramConfig | None = None,
                 family: Family = WIDTH, rho_tolerance: float = 0.01) -> BudgetSolution:
    """Backbone shape and rows_per_head for `total_params` at backbone share `rho` in (0, 1].

    The family member nearest rho x total_params is picked (then FFN-trimmed when `family.trim_ffn`), and
    the tables take the rest. rho = 1 returns the backbone nearest the budget with engram=None. Raises
    ValueError for rho outside (0, 1], a missing `engram` below rho = 1, or a budget that cannot be met:
    total off by more than 1 %, achieved rho off by more than `rho_tolerance`, or less than a row per head.
    """
    if not 0.0 < rho <= 1.0:
        raise ValueError(f"solve_budget: rho must lie in (0, 1], got rho={rho}")
    if total_params < 1:
        raise ValueError(f"solve_budget: total_params must be >= 1, got {total_params}")
    if rho < 1.0 and engram is None:
        raise ValueError(f"solve_budget: rho={rho} < 1 needs an EngramConfig (engram=None is the baseline)")
    engram = engram if rho < 1.0 else None
    base = replace(base, engram=engram)  # Engram projections are backbone, so they shape the choice
    target = rho * total_params
    min_depth = 1 if engram is None else max(engram.layers) + 1
    config, low, high = _nearest_backbone(target, base, family, min_depth)
    if family.trim_ffn:
        config = _trim_ffn(config, target, low, high, family.ffn_multiple_of)
    backbone = _backbone(config)
    # Memory fills the rest, so the achieved rho is backbone / budget up to the 1 % total tolerance.
    if abs(backbone / total_params - rho) > rho_tolerance:
        raise ValueError(f"solve_budget: cannot reach rho={rho} (within {rho_tolerance}) of {total_params:,} "
                         f"parameters: the nearest {family.vary} (dim={config.dim}, n_layer={config.n_layer}, "
                         f"ffn_hidden={config.ffn_hidden}) has a backbone of {backbone:,} "
                         f"(rho={backbone / total_params:.4f}"
                         f"{', more than the whole budget' if backbone > total_params else ''})"
                         f"{'' if family.trim_ffn else '; Family(trim_ffn=True) gives finer steps'}")
    if engram is not None:
        config = _fill_memory(config, engram, total_params - backbone)
    counts = count_parameters(config)
    solution = BudgetSolution(config, counts, flops_per_token(config), total_params, rho)
    if abs(solution.error) > BUDGET_TOLERANCE or abs(counts.rho - rho) > rho_tolerance:
        raise ValueError(f"solve_budget: cannot meet {total_params:,} parameters at rho={rho}: the nearest "
                         f"{family.vary} gives {counts.total:,} ({solution.error:+.2%}, tolerance 1%) at "
                         f"rho={counts.rho:.4f}")
    return solution


def budget_table(total_params: int, rhos: Iterable[float], base: ModelConfig, engram: EngramConfig,
                 family: Family = WIDTH, rho_tolerance: float = 0.01) -> list[dict[str, Any]]:
    """One row per rho: requested and achieved shape, counts, FLOPs/token and relative error (each solved by
    `solve_budget` with `rho_tolerance`)."""
    rows = []
    for rho in rhos:
        s = solve_budget(total_params, rho, base, engram, family, rho_tolerance)
        c = s.config
        rows.append({"rho": rho, "dim": c.dim, "n_layer": c.n_layer, "n_head": c.n_head,
                     "ffn_hidden": c.ffn_hidden, "rows_per_head": None if c.engram is None else c.engram.rows_per_head,
                     "backbone": s.counts.backbone, "memory": s.counts.memory, "total": s.counts.total,
                     "achieved_rho": round(s.counts.rho, 4), "flops_per_token": s.flops_per_token,
                     "error": round(s.error, 6)})
    return rows


__all__ = ["DEPTH", "STUDY_ENGRAM", "STUDY_RHOS", "WIDTH", "BudgetSolution", "Family", "ParamCounts",
           "budget_table", "count_parameters", "flops_per_token", "solve_budget"]
