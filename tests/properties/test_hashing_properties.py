"""Property-based tests of `engram_vision.hashing` (hypothesis, derandomized, CPU, seconds).

For any small grid, any neighbourhoods valid for the config (2d names, 'dr,dc' strings and raster offsets),
any tokens including PAD, with and without label hashing and a code map, `hash_rows` returns int64 row ids
inside each head's prime-sized slice of the layer's table, deterministically; the ids of a position depend
only on the tokens of its neighbourhood (strictly before it), so a longer history, other future tokens or
other non-neighbour tokens never change them. Hand-written reference comparisons live in
tests/engram_vision/test_hashing.py.
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engram_vision.config import NAMED_NEIGHBORS, EngramConfig, neighbor_offset
from engram_vision.hashing import HashParams, hash_constants, hash_rows, make_hash_params, neighbor_ids

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True, database=None)
NAME_OF_OFFSET = {offset: name for name, offset in NAMED_NEIGHBORS.items()}
NUM_CLASSES = 7


def _offset_2d() -> st.SearchStrategy[tuple[int, int]]:
    """A causal 2d offset (d_row < 0, or d_row == 0 and d_col < 0), some reaching past a small grid."""
    before = st.tuples(st.integers(-9, -1), st.integers(-9, 9))
    left = st.tuples(st.just(0), st.integers(-9, -1))
    return st.one_of(before, left)


@st.composite
def _spec_2d(draw: st.DrawFn, offset: tuple[int, int]) -> str:
    """One spelling of a 2d offset accepted by `neighbor_offset`: its name, 'dr,dc' or '(dr, dc)'."""
    spellings = [f"{offset[0]},{offset[1]}", f"({offset[0]}, {offset[1]})"]
    if offset in NAME_OF_OFFSET:
        spellings.append(NAME_OF_OFFSET[offset])
    return draw(st.sampled_from(spellings))


@st.composite
def _neighborhoods(draw: st.DrawFn, mode: str) -> tuple[tuple[str | int, ...], ...]:
    """1-3 orders of 1-4 distinct neighbours each, spelled in any accepted way."""
    orders = []
    for _ in range(draw(st.integers(1, 3))):
        if mode == "2d":
            offsets = draw(st.lists(_offset_2d(), min_size=1, max_size=4, unique=True))
            orders.append(tuple(draw(_spec_2d(offset)) for offset in offsets))
        else:
            backs = draw(st.lists(st.integers(1, 70), min_size=1, max_size=4, unique=True))
            orders.append(tuple(draw(st.sampled_from([back, str(back)])) for back in backs))
    return tuple(orders)


@st.composite
def cases(draw: st.DrawFn) -> dict:
    """Grid, vocabulary, Engram config, one layer's hash params, tokens [B, cells] (PAD = vocab included),
    labels [B] (null label included) and, when the config asks for one, a code map."""
    height, width = draw(st.integers(1, 8)), draw(st.integers(1, 8))
    vocab = draw(st.integers(1, 300))
    mode = draw(st.sampled_from(["2d", "raster"]))
    num_ids = draw(st.one_of(st.none(), st.integers(2, 12)))
    config = EngramConfig(
        layers=tuple(draw(st.lists(st.integers(0, 40), min_size=1, max_size=3, unique=True))), mode=mode,
        neighborhoods=draw(_neighborhoods(mode)), heads_per_order=draw(st.integers(1, 4)),
        rows_per_head=draw(st.integers(1, 5000)), hash_seed=draw(st.integers(0, 2**32)),
        hash_label=draw(st.booleans()), code_map=num_ids)
    params = make_hash_params(config, vocab, NUM_CLASSES)
    layer = draw(st.sampled_from(config.layers))
    batch, cells = draw(st.integers(1, 3)), height * width
    token = st.integers(0, vocab)  # vocab itself is PAD
    tokens = torch.tensor(draw(st.lists(st.lists(token, min_size=cells, max_size=cells),
                                        min_size=batch, max_size=batch)), dtype=torch.int64)
    labels = torch.tensor(draw(st.lists(st.integers(0, NUM_CLASSES), min_size=batch, max_size=batch)))
    code_map = None
    if num_ids is not None:  # codes -> canonical ids in [0, num_ids), PAD -> num_ids
        codes = draw(st.lists(st.integers(0, num_ids - 1), min_size=vocab, max_size=vocab))
        code_map = torch.tensor([*codes, num_ids], dtype=torch.int64)
    return dict(grid=(height, width), vocab=vocab, config=config, params=params[layer], tokens=tokens,
                labels=labels, code_map=code_map)


def _rows(case: dict, history: torch.Tensor, positions: torch.Tensor, labels: torch.Tensor | None = None,
          params: HashParams | None = None) -> torch.Tensor:
    params = case["params"] if params is None else params
    return hash_rows(history, positions, case["labels"] if labels is None else labels, case["grid"],
                     case["config"], hash_constants(case["config"], [params]), pad_id=case["vocab"],
                     code_map=case["code_map"])[0]


def _source(p: int, offset: tuple[int, int] | int, grid: tuple[int, int], mode: str) -> int | None:
    """History index the neighbour `offset` of target cell p reads, None when it lies outside the image."""
    height, width = grid
    if mode == "raster":
        return p - offset if p - offset >= 0 else None
    row, col = divmod(p, width)
    row, col = row + offset[0], col + offset[1]
    return row * width + col if 0 <= row < height and 0 <= col < width else None


def _positions(data: st.DataObject, cells: int) -> torch.Tensor:
    return torch.tensor(data.draw(st.lists(st.integers(0, cells - 1), min_size=1, max_size=10)))


@SETTINGS
@given(cases(), st.data())
def test_rows_are_int64_inside_each_heads_slice(case: dict, data: st.DataObject) -> None:
    config, params, tokens = case["config"], case["params"], case["tokens"]
    positions = _positions(data, tokens.shape[1])
    rows = _rows(case, tokens, positions)
    assert rows.dtype == torch.int64
    assert rows.shape == (tokens.shape[0], len(positions), config.num_heads)
    low, high = params.offsets, params.offsets + params.primes  # head k owns [offsets[k], offsets[k] + primes[k])
    assert bool((rows >= low).all()) and bool((rows < high).all())
    assert int(rows.min()) >= 0 and int(rows.max()) < params.total_rows
    # The slices tile the table: consecutive, starting at 0, ending at total_rows.
    assert int(params.offsets[0]) == 0 and int(high[-1]) == params.total_rows
    assert torch.equal(params.offsets[1:], high[:-1])


@SETTINGS
@given(cases(), st.data())
def test_rows_are_deterministic(case: dict, data: st.DataObject) -> None:
    tokens = case["tokens"]
    positions = _positions(data, tokens.shape[1])
    first = _rows(case, tokens, positions)
    assert torch.equal(first, _rows(case, tokens.clone(), positions.clone()))
    # Rebuilding the hash constants from the config gives the same constants and the same rows.
    rebuilt = make_hash_params(case["config"], case["vocab"], NUM_CLASSES)[case["params"].layer]
    for name in ("multipliers", "primes", "offsets"):
        assert torch.equal(getattr(rebuilt, name), getattr(case["params"], name)), name
    assert torch.equal(first, _rows(case, tokens, positions, params=rebuilt))
    # Hashing positions together or one at a time gives the same rows (no cross-position state).
    alone = torch.cat([_rows(case, tokens, positions[i:i + 1]) for i in range(len(positions))], dim=1)
    assert torch.equal(first, alone)


@SETTINGS
@given(cases(), st.data())
def test_rows_are_prefix_invariant(case: dict, data: st.DataObject) -> None:
    tokens = case["tokens"]
    cells = tokens.shape[1]
    full = _rows(case, tokens, torch.arange(cells))
    # A history of exactly t tokens, or t tokens followed by anything (a decode buffer), hashes positions
    # 0..t like the whole image does.
    t = data.draw(st.integers(0, cells - 1))
    tail = data.draw(st.lists(st.integers(-3, 10**9), max_size=4))
    for extra in ([], tail):
        garbage = torch.tensor(extra, dtype=torch.int64).expand(tokens.shape[0], len(extra))
        history = torch.cat([tokens[:, :t], garbage], dim=1)
        assert torch.equal(_rows(case, history, torch.arange(t + 1)), full[:, : t + 1])
        assert torch.equal(_rows(case, history, torch.tensor([t])), full[:, t : t + 1])  # one decode step


@SETTINGS
@given(cases(), st.data())
def test_rows_never_read_the_target_or_later_tokens(case: dict, data: st.DataObject) -> None:
    tokens, vocab = case["tokens"], case["vocab"]
    cells = tokens.shape[1]
    p = data.draw(st.integers(0, cells - 1))
    changed = tokens.clone()
    future = data.draw(st.lists(st.integers(0, vocab), min_size=cells - p, max_size=cells - p))
    changed[:, p:] = torch.tensor(future)
    assert torch.equal(_rows(case, changed, torch.tensor([p])), _rows(case, tokens, torch.tensor([p])))


@SETTINGS
@given(cases(), st.data())
def test_rows_depend_only_on_the_neighbourhood_and_label(case: dict, data: st.DataObject) -> None:
    """Two histories that agree on every neighbour of position p hash p alike, whatever else differs (earlier
    cells included); the label matters only when it is hashed."""
    tokens, vocab, config, grid = case["tokens"], case["vocab"], case["config"], case["grid"]
    cells = tokens.shape[1]
    p = data.draw(st.integers(0, cells - 1))
    read = {_source(p, neighbor_offset(spec, config.mode), grid, config.mode)
            for order in config.neighborhoods for spec in order} - {None}
    assert all(q < p for q in read)
    other = torch.tensor(data.draw(st.lists(st.integers(0, vocab), min_size=cells, max_size=cells)))
    other = other.expand_as(tokens).clone()
    for q in read:
        other[:, q] = tokens[:, q]
    position = torch.tensor([p])
    assert torch.equal(_rows(case, other, position), _rows(case, tokens, position))
    if not config.hash_label:
        labels = (case["labels"] + 1) % (NUM_CLASSES + 1)
        assert torch.equal(_rows(case, tokens, position, labels=labels), _rows(case, tokens, position))


@SETTINGS
@given(cases(), st.data())
def test_neighbours_outside_the_image_read_pad(case: dict, data: st.DataObject) -> None:
    """neighbor_ids returns int64 history tokens, and pad_id exactly where the neighbour leaves the grid."""
    tokens, config, grid = case["tokens"], case["config"], case["grid"]
    positions = _positions(data, tokens.shape[1])
    pad_id = -1  # no token equals it, so PAD marks exactly the outside cells
    for order in config.neighborhoods:
        offsets = [neighbor_offset(spec, config.mode) for spec in order]
        got = neighbor_ids(tokens, positions, grid, offsets, config.mode, pad_id)
        assert got.dtype == torch.int64 and got.shape == (tokens.shape[0], len(positions), len(offsets))
        for i, p in enumerate(positions.tolist()):
            for j, offset in enumerate(offsets):
                source = _source(p, offset, grid, config.mode)
                want = torch.full((tokens.shape[0],), pad_id) if source is None else tokens[:, source]
                assert torch.equal(got[:, i, j], want), (p, offset)
