"""Tests of `engram_vision.hashing` and `engram_vision.code_map` against slow pure-Python references.

Covers: neighbour reads (2d and raster, PAD outside the image), rows in range, prefix invariance (prefill
and decode see the same ids), determinism across processes, DeepSeek's prime and multiplier scheme, the
raster mode as the language-model Engram, label hashing, and the code map. CPU only.
"""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import redirect_stdout
from dataclasses import replace
from io import StringIO
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engram_vision.code_map import fit_code_map
from engram_vision.config import EngramConfig, neighbor_offset
from engram_vision.hashing import hash_constants, hash_rows, hashable_id_bound, make_hash_params, neighbor_ids

REPO = Path(__file__).resolve().parents[2]


def layer_rows(history, positions, labels, grid, config, params, **kwargs) -> torch.Tensor:
    """One layer's row ids [B,P,heads]: `hash_rows` with that layer's constants alone."""
    return hash_rows(history, positions, labels, grid, config, hash_constants(config, [params]), **kwargs)[0]
CAUSAL_2D = [(dr, dc) for dr in (-2, -1, 0) for dc in (-2, -1, 0, 1, 2) if dr < 0 or dc < 0]
SETTINGS = settings(max_examples=40, deadline=None)


def _slow_is_prime(n: int) -> bool:
    return n >= 2 and all(n % d for d in range(2, int(n**0.5) + 1))


def _slow_neighbors(history: list[list[int]], positions: list[int], grid: tuple[int, int],
                    offsets: list, mode: str, pad_id: int) -> tuple[list, list]:
    """Loops: (ids [B][P][n], outside [P][n])."""
    width = grid[1]
    outside = []
    for p in positions:
        r, c = divmod(p, width)
        row_out = []
        for off in offsets:
            if mode == "2d":
                rr, cc = r + off[0], c + off[1]
                row_out.append(not (rr >= 0 and 0 <= cc < width))
            else:
                row_out.append(p - off < 0)
        outside.append(row_out)
    ids = []
    for seq in history:
        per_b = []
        for i, p in enumerate(positions):
            r, c = divmod(p, width)
            vals = []
            for j, off in enumerate(offsets):
                q = (r + off[0]) * width + c + off[1] if mode == "2d" else p - off
                vals.append(pad_id if outside[i][j] else seq[q])
            per_b.append(vals)
        ids.append(per_b)
    return ids, outside


@st.composite
def cases(draw: st.DrawFn) -> dict:
    """A random grid, vocabulary, batch of tokens (PAD included) and Engram config."""
    height, width = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    vocab = draw(st.integers(2, 20))
    batch = draw(st.integers(1, 3))
    mode = draw(st.sampled_from(["2d", "raster"]))
    pool = [f"{dr},{dc}" for dr, dc in CAUSAL_2D] if mode == "2d" else list(range(1, 9))
    orders = draw(st.lists(st.lists(st.sampled_from(pool), min_size=1, max_size=4, unique=True),
                           min_size=1, max_size=3))
    config = EngramConfig(
        layers=tuple(draw(st.lists(st.integers(0, 5), min_size=1, max_size=3, unique=True))), mode=mode,
        neighborhoods=tuple(tuple(o) for o in orders), heads_per_order=draw(st.integers(1, 3)),
        rows_per_head=draw(st.integers(1, 60)), hash_seed=draw(st.integers(0, 1000)),
        hash_label=draw(st.booleans()))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    tokens = torch.randint(0, vocab + 1, (batch, height * width), generator=gen)  # vocab = PAD included
    labels = torch.randint(0, 11, (batch,), generator=gen)
    return dict(grid=(height, width), vocab=vocab, config=config, tokens=tokens, labels=labels, gen=gen)


@SETTINGS
@given(cases(), st.data())
def test_neighbor_ids_match_reference_and_pad_outside(case: dict, data: st.DataObject) -> None:
    grid, vocab, config, tokens = case["grid"], case["vocab"], case["config"], case["tokens"]
    cells = grid[0] * grid[1]
    positions = data.draw(st.lists(st.integers(0, cells - 1), min_size=1, max_size=8))
    for order in config.neighborhoods:
        offsets = [neighbor_offset(spec, config.mode) for spec in order]
        got = neighbor_ids(tokens, torch.tensor(positions), grid, offsets, config.mode, vocab)
        want, outside = _slow_neighbors(tokens.tolist(), positions, grid, offsets, config.mode, vocab)
        assert got.dtype == torch.int64 and got.shape == (tokens.shape[0], len(positions), len(offsets))
        assert got.tolist() == want
        # Without PAD among the tokens, PAD appears exactly at the cells outside the image.
        clean = tokens.clamp(max=vocab - 1)
        got_clean = neighbor_ids(clean, torch.tensor(positions), grid, offsets, config.mode, vocab)
        assert ((got_clean == vocab) == torch.tensor(outside)[None]).all()


@SETTINGS
@given(cases(), st.data())
def test_rows_in_range_and_prefix_invariant(case: dict, data: st.DataObject) -> None:
    grid, vocab, config, tokens, labels = (case[k] for k in ("grid", "vocab", "config", "tokens", "labels"))
    cells = grid[0] * grid[1]
    for layer, params in make_hash_params(config, vocab, num_classes=10).items():
        full = layer_rows(tokens, torch.arange(cells), labels, grid, config, params, pad_id=vocab)
        assert full.dtype == torch.int64 and full.shape == (tokens.shape[0], cells, config.num_heads)
        assert (full >= params.offsets).all() and (full < params.offsets + params.primes).all(), layer
        assert int(full.max()) < params.total_rows
        # Prefill of t tokens (plus garbage beyond, as in a decode buffer) sees the same rows as the full
        # sequence at positions 0..t, and so does decoding position t alone.
        t = data.draw(st.integers(0, cells - 1))
        garbage = torch.randint(-5, 10**6, (tokens.shape[0], data.draw(st.integers(0, 3))), generator=case["gen"])
        prefix = torch.cat([tokens[:, :t], garbage], dim=1)
        rows = layer_rows(prefix, torch.arange(t + 1), labels, grid, config, params, pad_id=vocab)
        assert torch.equal(rows, full[:, : t + 1])
        step = layer_rows(prefix, torch.tensor([t]), labels, grid, config, params, pad_id=vocab)
        assert torch.equal(step, full[:, t : t + 1])


def test_history_and_positions_are_validated() -> None:
    tokens = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="history"):
        neighbor_ids(tokens, torch.tensor([4]), (2, 3), [(0, -1)], "2d", 9)
    with pytest.raises(ValueError, match="outside"):
        neighbor_ids(tokens, torch.tensor([6]), (2, 3), [(0, -1)], "2d", 9)
    with pytest.raises(ValueError, match="before the target"):
        neighbor_ids(tokens, torch.tensor([2]), (2, 3), [(0, 1)], "2d", 9)
    with pytest.raises(ValueError, match="k >= 1"):
        neighbor_ids(tokens, torch.tensor([2]), (2, 3), [0], "raster", 9)
    # Position 0 reads nothing, so even an empty history works.
    assert neighbor_ids(tokens[:, :0], torch.tensor([0]), (2, 3), [1, 2], "raster", 9).tolist() == [[[9, 9]]]


_DIGEST_SCRIPT = """
import hashlib, torch
from engram_vision.config import EngramConfig
from engram_vision.hashing import hash_constants, hash_rows, make_hash_params
config = EngramConfig(layers=(0, 3), neighborhoods=(("L", "U"), ("L", "U", "UL", "UR")), heads_per_order=4,
                      rows_per_head=1009, hash_seed=7, hash_label=True)
tokens = (torch.arange(2 * 20).reshape(2, 20) * 7919) % 65
digest = hashlib.sha256()
for layer, params in make_hash_params(config, vocab_size=64, num_classes=10).items():
    constants = hash_constants(config, [params])
    rows = hash_rows(tokens, torch.arange(20), torch.tensor([3, 10]), (4, 5), config, constants, pad_id=64)[0]
    digest.update(str(layer).encode() + params.multipliers.numpy().tobytes() + rows.numpy().tobytes())
print(digest.hexdigest())
"""


def test_deterministic_across_processes() -> None:
    namespace: dict = {}
    with redirect_stdout(StringIO()) as here:
        exec(_DIGEST_SCRIPT, namespace)  # noqa: S102  this file's own constant script
    # Another process with another string-hash seed must agree (no set/dict-order or RNG-state leaks).
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(REPO)}
    there = subprocess.run([sys.executable, "-c", _DIGEST_SCRIPT], cwd=REPO, env=env, capture_output=True,
                           text=True, check=True, timeout=120)
    assert here.getvalue().strip() == there.stdout.strip() and len(there.stdout.strip()) == 64


@SETTINGS
@given(cases())
def test_primes_follow_deepseek_scheme_and_are_distinct(case: dict) -> None:
    config = case["config"]
    params = make_hash_params(config, case["vocab"], num_classes=10)
    assert list(params) == list(config.layers)
    used: list[int] = []
    for layer in config.layers:
        expected = []
        for _ in range(config.num_orders):  # slow reference of the next-unused-prime search
            start = config.rows_per_head - 1
            for _ in range(config.heads_per_order):
                start += 1
                while not _slow_is_prime(start) or start in used:
                    start += 1
                used.append(start)
                expected.append(start)
        p = params[layer]
        assert p.primes.tolist() == expected and p.layer == layer
        assert p.offsets.tolist() == [sum(expected[:k]) for k in range(len(expected))]
        assert p.total_rows == sum(expected)
    assert len(set(used)) == len(used) and min(used) >= config.rows_per_head


@SETTINGS
@given(cases(), st.integers(1, 2000), st.sampled_from([None, 2, 5]))
def test_multipliers_odd_bounded_and_reproducible(case: dict, num_classes: int, code_map: int | None) -> None:
    config = replace(case["config"], code_map=code_map)
    bound = hashable_id_bound(config, case["vocab"], num_classes)
    m_max = np.iinfo(np.int64).max // bound
    for layer, params in make_hash_params(config, case["vocab"], num_classes).items():
        m = params.multipliers.tolist()
        assert len(m) == max(len(o) for o in config.neighborhoods) + 1
        assert all(x % 2 == 1 and 1 <= x <= m_max and x * (bound - 1) <= np.iinfo(np.int64).max for x in m)
        rng = np.random.default_rng(config.hash_seed + 10007 * layer)
        assert m == (rng.integers(0, max(1, m_max // 2), size=len(m), dtype=np.int64) * 2 + 1).tolist()


@pytest.mark.parametrize("orders", [((1,),), ((1,), (1, 2), (1, 2, 3))])
def test_raster_mode_is_the_language_model_engram(orders: tuple) -> None:
    """Raster offsets k = 1..n at position p hash the model inputs x_p, x_{p-1}, ... (x_0 = the class token,
    read as PAD), i.e. DeepSeek's 1D n-gram hash over the input sequence, crossing row ends."""
    grid, vocab = (4, 5), 50
    config = EngramConfig(layers=(2,), mode="raster", neighborhoods=orders, heads_per_order=3,
                          rows_per_head=997)
    params = make_hash_params(config, vocab, num_classes=10)[2]
    tokens = torch.randint(0, vocab, (2, 20))
    rows = layer_rows(tokens, torch.arange(20), None, grid, config, params, pad_id=vocab)
    inputs = torch.cat([torch.full((2, 1), vocab), tokens[:, :-1]], dim=1)  # x_p = image token p-1
    m = params.multipliers
    for o, order in enumerate(orders):
        mix = torch.zeros_like(inputs)
        for slot in range(len(order)):  # slot j reads x_{p-j}: a shift by j with PAD in front
            shifted = torch.cat([torch.full((2, slot), vocab), inputs[:, : 20 - slot]], dim=1)
            mix ^= shifted * m[slot]
        heads = slice(o * 3, (o + 1) * 3)
        assert torch.equal(rows[..., heads], mix[..., None] % params.primes[heads] + params.offsets[heads])
    # Crossing the row end: at the first cell of row 1, raster "1 back" is the last token of row 0, 2d L is PAD.
    assert neighbor_ids(tokens, torch.tensor([5]), grid, [1], "raster", vocab)[:, 0, 0].tolist() == tokens[:, 4].tolist()
    assert neighbor_ids(tokens, torch.tensor([5]), grid, [(0, -1)], "2d", vocab).flatten().tolist() == [vocab] * 2


def test_hash_label_changes_rows_only_with_the_label() -> None:
    grid, vocab = (4, 4), 64
    tokens = torch.randint(0, vocab, (1, 16)).expand(3, 16)
    labels = torch.tensor([3, 3, 7])
    for hash_label in (True, False):
        config = EngramConfig(layers=(0,), heads_per_order=4, rows_per_head=100_003, hash_label=hash_label)
        params = make_hash_params(config, vocab, num_classes=10)[0]
        rows = layer_rows(tokens, torch.arange(16), labels, grid, config, params, pad_id=vocab)
        assert torch.equal(rows[0], rows[1])
        assert torch.equal(rows[0], rows[2]) is not hash_label
        assert (rows[0] != rows[2]).float().mean() > 0.9 or not hash_label  # large primes: nearly all move


@SETTINGS
@given(cases(), st.integers(2, 6))
def test_mapped_hashing_equals_hashing_mapped_tokens(case: dict, num_ids: int) -> None:
    vocab, grid, tokens, labels = case["vocab"], case["grid"], case["tokens"], case["labels"]
    mapped_cfg = replace(case["config"], code_map=num_ids)
    code_map = torch.cat([torch.randint(0, num_ids, (vocab,), generator=case["gen"]), torch.tensor([num_ids])])
    # The mapped tokens live in a vocabulary of num_ids codes (PAD = num_ids): same V', same constants.
    plain = make_hash_params(case["config"], num_ids, num_classes=10)
    for layer, params in make_hash_params(mapped_cfg, vocab, num_classes=10).items():
        assert torch.equal(params.multipliers, plain[layer].multipliers)
        positions = torch.arange(grid[0] * grid[1])
        got = layer_rows(tokens, positions, labels, grid, mapped_cfg, params, pad_id=vocab, code_map=code_map)
        want = layer_rows(code_map[tokens], positions, labels, grid, case["config"], plain[layer], pad_id=num_ids)
        assert torch.equal(got, want)
    with pytest.raises(ValueError, match="code_map"):
        layer_rows(tokens, positions, labels, grid, mapped_cfg, params, pad_id=vocab)


def test_fit_code_map_clusters_separated_vectors() -> None:
    gen = torch.Generator().manual_seed(0)
    centres = torch.eye(8)[:3] * torch.tensor([[1.0], [5.0], [0.2]])  # scale is irrelevant under cosine
    group = torch.arange(30) % 3
    codebook = centres[group] * (1 + torch.rand(30, 1, generator=gen)) + 0.01 * torch.randn(30, 8, generator=gen)
    code_map = fit_code_map(codebook, num_ids=3, seed=1)
    assert code_map.dtype == torch.int64 and code_map.shape == (31,)
    assert code_map[-1] == 3 and sorted(set(code_map[:-1].tolist())) == [0, 1, 2]
    for g in range(3):  # one canonical id per group, different groups apart; ids numbered by first code
        assert set(code_map[:-1][group == g].tolist()) == {g}
    assert torch.equal(code_map, fit_code_map(codebook, num_ids=3, seed=1))


@pytest.mark.parametrize("num_ids", [1, 4, 17])
def test_fit_code_map_surjective_and_deterministic(num_ids: int) -> None:
    codebook = torch.randn(40, 6, generator=torch.Generator().manual_seed(num_ids))
    first = fit_code_map(codebook, num_ids, seed=3)
    assert torch.equal(first, fit_code_map(codebook, num_ids, seed=3))
    assert sorted(set(first[:-1].tolist())) == list(range(num_ids)) and first[-1] == num_ids
    raw = fit_code_map(codebook, num_ids, seed=3, normalize=False)
    assert sorted(set(raw[:-1].tolist())) == list(range(num_ids)) and raw[-1] == num_ids


def test_fit_code_map_rejects_impossible_requests() -> None:
    with pytest.raises(ValueError, match="num_ids"):
        fit_code_map(torch.randn(5, 3), num_ids=6)
    with pytest.raises(ValueError, match="empty"):
        fit_code_map(torch.ones(6, 3), num_ids=2)
