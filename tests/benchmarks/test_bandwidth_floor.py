"""benchmarks/bandwidth_floor.py: the bytes a decode step must read (dense weights once, gathered rows of
the embedding tables, the KV cache so far), counted independently from parameter names."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from engram_vision.config import EngramConfig, model_config
from engram_vision.model import EngramGPT

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from bandwidth_floor import decode_step_bytes, generation_floor_bytes, measure_bandwidth  # noqa: E402

GATHERED = ("tok_embeddings.", "cls_embedding.", "engram.table.")


def _model(engram: bool) -> EngramGPT:
    memory = EngramConfig(layers=(1, 2), heads_per_order=2, head_dim=8, rows_per_head=101) if engram else None
    return EngramGPT(model_config("gpt-small", engram=memory, n_kv_head=2))


def test_step_bytes_count_dense_weights_once_and_only_the_gathered_rows():
    for engram in (False, True):
        model = _model(engram)
        config, rows = model.config, 6
        dense = sum(p.numel() for name, p in model.named_parameters() if not any(g in name for g in GATHERED))
        gathered = rows * config.dim + (2 * rows * config.engram.num_heads * 8 if engram else 0)
        weights, per_position = decode_step_bytes(model, rows, torch.bfloat16)
        assert weights == 2 * (dense + gathered)
        assert per_position == 2 * 2 * config.n_layer * rows * 2 * config.head_dim  # bf16 keys and values, 2 kv heads
    assert decode_step_bytes(_model(True), 6, torch.float32)[0] > decode_step_bytes(_model(False), 6, torch.float32)[0]


def test_generation_floor_sums_every_step_over_the_growing_cache():
    model = _model(True)
    weights, per_position = decode_step_bytes(model, 4, torch.float32)
    steps = model.config.block_size - 1
    # step s (1-based) attends to the class token and s image tokens
    expected = sum(weights + (s + 1) * per_position for s in range(1, steps + 1))
    assert generation_floor_bytes(model, 4, torch.float32) == expected


def test_measured_copy_bandwidth_is_a_plausible_rate():
    bandwidth = measure_bandwidth("cpu", mib=16, repeats=3)
    assert 1e8 < bandwidth < 1e13  # between 0.1 GB/s and 10 TB/s
