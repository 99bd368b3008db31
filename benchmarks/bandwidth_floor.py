"""The memory-bandwidth floor of cached decoding: the least time a generation can take if every decode
step must read the weights it uses and the KV cache written so far, at the device's measured bandwidth.

Imported by `decode_cache.py` (as `bandwidth_floor`, like `common`); prints and measures nothing itself
except `measure_bandwidth`. A decode step of a batch is bandwidth-bound: each weight matrix is read once
for all rows, each row reads its own cache. Bytes per step at prefix length n (positions already cached):

    weights:  every parameter except the embedding tables, which are gathered (the token embedding's rows
              for the batch, each Engram layer's rows: rows x heads x head_dim), at the decode dtype;
    KV cache: 2 (keys, values) x layers x rows x kv_heads x head_dim x n, at the decode dtype.

The floor of a generation sums that over its steps (n = 1 .. tokens - 1 after the prefill). Our static
cache reads all positions of the preallocated cache under a mask, so its KV traffic is up to twice the
floor's; that is part of what the fraction shows.
"""

from __future__ import annotations

import time

import torch

from engram_vision.model import EngramGPT


def decode_step_bytes(model: EngramGPT, rows: int, dtype: torch.dtype) -> tuple[int, int]:
    """(weight bytes, KV-cache bytes per cached position) one decode step of `rows` sequences reads."""
    config = model.config
    item = torch.empty((), dtype=dtype).element_size()
    gathered = {id(model.tok_embeddings.weight), id(model.cls_embedding.embedding_table.weight)}
    read_rows = rows * config.dim  # the token embedding's rows
    for memory in model.engram_layers():
        gathered.add(id(memory.table.weight))
        read_rows += rows * memory.config.num_heads * memory.config.head_dim
    dense = sum(p.numel() for p in model.parameters() if id(p) not in gathered)
    kv_heads = config.n_kv_head or config.n_head
    per_position = 2 * config.n_layer * rows * kv_heads * config.head_dim
    return (dense + read_rows) * item, per_position * item


def generation_floor_bytes(model: EngramGPT, rows: int, dtype: torch.dtype) -> int:
    """Bytes a whole cached generation must read after its prefill: every decode step's weights, plus the
    KV cache of the positions before it (class token included)."""
    weights, per_position = decode_step_bytes(model, rows, dtype)
    steps = model.config.block_size - 1  # the prefill samples the first token
    cached_positions = sum(range(2, steps + 2))  # step s attends to s + 1 cached positions (class + s tokens)
    return steps * weights + cached_positions * per_position


def measure_bandwidth(device: str, mib: int, repeats: int = 10) -> float:
    """Bytes per second of a large device-to-device copy (read plus write), the fastest of `repeats`."""
    numel = mib * 2 ** 20 // 4
    source = torch.empty(numel, dtype=torch.float32, device=device).uniform_()
    target = torch.empty_like(source)
    best = float("inf")
    for attempt in range(repeats + 1):  # the first copy warms up
        if source.device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        target.copy_(source)
        if source.device.type == "cuda":
            torch.cuda.synchronize(device)
        if attempt:
            best = min(best, time.perf_counter() - start)
    return 2 * source.numel() * source.element_size() / best
