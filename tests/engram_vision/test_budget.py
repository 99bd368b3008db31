"""Tests of `engram_vision.budget`: analytic counts against `EngramGPT` built on the meta device, FLOPs/token
against hand calculations, and the rho solver at the study's rhos for GPT-B's budget. CPU only, no weights.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from engram_vision.budget import (
    DEPTH,
    STUDY_ENGRAM,
    STUDY_RHOS,
    WIDTH,
    Family,
    ParamCounts,
    budget_table,
    count_parameters,
    flops_per_token,
    solve_budget,
)
from engram_vision.config import EngramConfig, ModelConfig, model_config
from engram_vision.model import EngramGPT

GPT_B_TOTAL = 110_888_448  # LlamaGen's GPT-B c2i at vocab 16384, 1000 classes
ENGRAMS = {
    "study": STUDY_ENGRAM,
    "no-conv": EngramConfig(layers=(0,), neighborhoods=(("L",),), heads_per_order=3, head_dim=16,
                            rows_per_head=97, use_conv=False),
    "conv-k3-d2": EngramConfig(layers=(0, 1), heads_per_order=2, head_dim=8, rows_per_head=50, conv_kernel=3,
                               conv_dilation=2, hash_label=True),
    "raster-code-map": EngramConfig(layers=(1,), mode="raster", neighborhoods=((1, 2), (1, 2, 3)),
                                    heads_per_order=4, head_dim=24, rows_per_head=1000, code_map=16),
}


def meta_counts(config: ModelConfig) -> ParamCounts:
    """Count the parameters of the real model, built without memory on the meta device."""
    with torch.device("meta"):
        model = EngramGPT(config)
    backbone = memory = 0
    for name, parameter in model.named_parameters():
        if name.endswith("engram.table.weight"):
            memory += parameter.numel()
        else:
            backbone += parameter.numel()
    return ParamCounts(backbone=backbone, memory=memory)


@pytest.mark.parametrize("size", ["gpt-tiny", "gpt-b"])
@pytest.mark.parametrize("engram", [None, *ENGRAMS], ids=str)
def test_counts_match_meta_model(size: str, engram: str | None) -> None:
    config = model_config(size)
    if engram is not None:  # the study's layer 6 is beyond gpt-tiny's 2 blocks: take the last one there
        layers = tuple(sorted({min(layer, config.n_layer - 1) for layer in ENGRAMS[engram].layers}))
        config = replace(config, engram=replace(ENGRAMS[engram], layers=layers))
    counts = count_parameters(config)
    assert counts == meta_counts(config)
    assert counts.total == counts.backbone + counts.memory
    assert (counts.memory == 0) == (engram is None)
    assert counts.rho == (1.0 if engram is None else counts.backbone / counts.total)


@pytest.mark.parametrize("overrides", [{"n_kv_head": 2}, {"class_dropout_prob": 0.0}, {"ffn_dim_multiplier": 1.3}])
def test_counts_match_meta_model_variants(overrides: dict) -> None:
    config = model_config("gpt-tiny", engram=ENGRAMS["conv-k3-d2"], **overrides)
    assert count_parameters(config) == meta_counts(config)


def test_gpt_b_baseline_total() -> None:
    counts = count_parameters(model_config("gpt-b"))
    assert (counts.total, counts.backbone, counts.memory, counts.rho) == (GPT_B_TOTAL, GPT_B_TOTAL, 0, 1.0)


def test_flops_per_token_by_hand() -> None:
    # gpt-tiny: dim 64, 2 layers, ffn_hidden ceil(170 / 32) * 32 = 192, vocab 64, 16 positions.
    tiny = model_config("gpt-tiny")
    assert tiny.ffn_hidden == 192 and tiny.seq_len == 16
    per_layer = 64 * 3 * 64 + 64 * 64 + 3 * 64 * 192  # wqkv + wo + SwiGLU = 53,248
    matmul = 2 * per_layer + 64 * 64  # + output head = 110,592
    attention = 2 * 2 * 2 * 64 * (16 + 1) / 2  # QK^T and AV over a mean context of 8.5 keys = 4,352
    assert flops_per_token(tiny) == 2 * matmul + attention == 225_536
    # Engram adds its key/value projections only (table lookups are gathers).
    engram = ENGRAMS["study"]
    with_engram = replace(tiny, engram=replace(engram, layers=(0, 1)))
    assert flops_per_token(with_engram) - flops_per_token(tiny) == 2 * 2 * (2 * engram.memory_dim * 64)
    # gpt-b: 12 x 7,077,888 + 768 x 16384 = 97,517,568 matmul weights; mean context 128.5 keys.
    gpt_b = flops_per_token(model_config("gpt-b"))
    assert gpt_b == 2 * 97_517_568 + 4 * 12 * 768 * 128.5 == 199_772_160
    assert 1.8 * GPT_B_TOTAL < gpt_b < 2 * GPT_B_TOTAL  # about 2 x parameters minus the embeddings


@pytest.mark.parametrize("rho", STUDY_RHOS)
def test_solve_gpt_b_budget(rho: float) -> None:
    solution = solve_budget(GPT_B_TOTAL, rho, model_config("gpt-b"), STUDY_ENGRAM)
    config, counts = solution.config, solution.counts
    assert abs(counts.total - GPT_B_TOTAL) <= 0.01 * GPT_B_TOTAL
    assert abs(solution.error) <= 0.01 and solution.error == (counts.total - GPT_B_TOTAL) / GPT_B_TOTAL
    assert abs(counts.rho - rho) <= 0.01
    # The width family: GPT-B's depth and attention head dim, the study's Engram layout with rows set.
    assert config.n_layer == 12 and config.head_dim == 64 and config.dim == 64 * config.n_head
    assert config.engram == replace(STUDY_ENGRAM, rows_per_head=config.engram.rows_per_head)
    assert counts == meta_counts(config) == count_parameters(config)
    assert solution.flops_per_token == flops_per_token(config)


def test_solve_rho_one_is_the_baseline() -> None:
    solution = solve_budget(GPT_B_TOTAL, 1.0, model_config("gpt-b"), STUDY_ENGRAM)
    assert solution.config.engram is None and solution.counts.memory == 0
    assert (solution.config.dim, solution.config.ffn_hidden, solution.counts.total) == (768, 2048, GPT_B_TOTAL)
    narrow = solve_budget(50_000_000, 1.0, model_config("gpt-b"))
    assert narrow.config.engram is None and abs(narrow.error) <= 0.01


def test_solve_depth_family() -> None:
    base = model_config("gpt-b")
    for rho in (0.7, 0.9):
        solution = solve_budget(GPT_B_TOTAL, rho, base, STUDY_ENGRAM, DEPTH)
        assert solution.config.dim == 768 and solution.config.n_layer > max(STUDY_ENGRAM.layers)
        assert abs(solution.counts.rho - rho) <= 0.01 and abs(solution.error) <= 0.01
        assert solution.counts == meta_counts(solution.config)
    # Engram layer 6 needs 7 blocks of width 768: already rho ~ 0.67 of GPT-B's budget.
    with pytest.raises(ValueError, match=r"rho=0\.3 .*nearest depth"):
        solve_budget(GPT_B_TOTAL, 0.3, base, STUDY_ENGRAM, DEPTH)


def test_untrimmed_width_is_coarse() -> None:
    base = model_config("gpt-b")
    # One width step (64) is ~16M parameters at GPT-B, so without the FFN trim rho 0.5 lands at ~0.53.
    with pytest.raises(ValueError, match="trim_ffn=True"):
        solve_budget(GPT_B_TOTAL, 0.5, base, STUDY_ENGRAM, Family(trim_ffn=False))
    loose = solve_budget(GPT_B_TOTAL, 0.5, base, STUDY_ENGRAM, Family(trim_ffn=False), rho_tolerance=0.05)
    assert loose.config.multiple_of == 256 and loose.config.ffn_dim_multiplier is None  # LlamaGen's SwiGLU
    assert abs(loose.error) <= 0.01


@pytest.mark.parametrize("rho", [0.0, -0.2, 1.01, math.nan])
def test_rho_outside_range(rho: float) -> None:
    with pytest.raises(ValueError, match="rho"):
        solve_budget(GPT_B_TOTAL, rho, model_config("gpt-b"), STUDY_ENGRAM)


def test_impossible_budgets() -> None:
    base = model_config("gpt-b")
    with pytest.raises(ValueError, match="more than the whole budget"):
        solve_budget(10_000, 0.5, base, STUDY_ENGRAM)
    with pytest.raises(ValueError, match="rho=0.01"):  # even the narrowest backbone is 2.3% of the budget
        solve_budget(GPT_B_TOTAL, 0.01, base, STUDY_ENGRAM)
    huge_rows = EngramConfig(layers=(1, 6), heads_per_order=32, head_dim=512)  # 128 distinct primes x 512
    with pytest.raises(ValueError, match="less than one row per head"):
        solve_budget(GPT_B_TOTAL, 0.9, base, huge_rows)
    with pytest.raises(ValueError, match="needs an EngramConfig"):
        solve_budget(GPT_B_TOTAL, 0.5, base)
    with pytest.raises(ValueError, match="beyond the model depth"):
        solve_budget(GPT_B_TOTAL, 0.5, model_config("gpt-tiny"), STUDY_ENGRAM)
    with pytest.raises(ValueError, match="Family.vary"):
        Family(vary="heads")  # type: ignore[arg-type]


def test_budget_table() -> None:
    rows = budget_table(GPT_B_TOTAL, (0.3, 0.9), model_config("gpt-b"), STUDY_ENGRAM, WIDTH)
    assert [row["rho"] for row in rows] == [0.3, 0.9]
    for row in rows:
        assert row["total"] == row["backbone"] + row["memory"] and abs(row["error"]) <= 0.01
        assert abs(row["achieved_rho"] - row["rho"]) <= 0.01

