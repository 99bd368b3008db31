"""Engram-2D hashing: image tokens -> row ids of each Engram layer's table (docs/engram2d.md).

Pure functions on torch int64 tensors (on the input's device, no state, deterministic across processes):

- `neighbor_ids` reads the causal neighbourhood of each target cell (2d grid offsets or raster offsets),
  with `pad_id` for cells outside the image;
- `make_hash_params` draws the per-layer odd multipliers and the distinct per-head primes, and
  `hash_constants` lays the layers' draws out once for hashing (the model keeps that as its buffers);
- `hash_rows`, the one entry point the model calls, mixes the neighbour ids (optionally through a code
  map and with the class label) into one global row id per head of each layer's single table, for all
  Engram layers at once.

Sequence convention: model position p (0 = class token, p >= 1 = image token p-1) predicts image token p at
grid cell divmod(p, W), so the neighbourhood of position p only reads image tokens q < p. Holding the tables,
the lookup and the fusion is `engram.py`; keeping the `HashConstants` in the checkpoint is the model's job; fitting
the code map is `code_map.py`.
"""

# Follows DeepSeek's Engram reference (arXiv 2601.07372): odd multipliers from
# numpy default_rng(seed + 10007 * layer) bounded so products never overflow int64, XOR mixing, and
# distinct primes found by a "next unused prime" search per head.

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from engram_vision.config import EngramConfig, neighbor_offset

_LAYER_SEED_STRIDE = 10007  # DeepSeek's PRIME_1: decorrelates the multipliers of different layers
_INT64_MAX = np.iinfo(np.int64).max


@dataclass(frozen=True, eq=False)
class HashParams:
    """Hash constants of one Engram layer (CPU tensors from `make_hash_params`; `.to(device)` to move)."""

    layer: int
    """0-indexed Transformer block of this Engram layer."""
    multipliers: torch.Tensor
    """int64 [max_slots + 1]: odd multiplier per neighbour slot; the last one is the class label's."""
    primes: torch.Tensor
    """int64 [num_heads]: rows of each head, order-major (order 0's heads first); distinct over all layers."""
    offsets: torch.Tensor
    """int64 [num_heads]: first row of each head in the layer's single table (exclusive cumsum of primes)."""
    total_rows: int
    """Rows of the layer's table (sum of primes)."""

    def to(self, device: torch.device | str) -> HashParams:
        """The same constants with the tensors on `device` (a new object; this one is unchanged)."""
        return HashParams(self.layer, self.multipliers.to(device), self.primes.to(device),
                          self.offsets.to(device), self.total_rows)


def _is_prime(n: int) -> bool:
    """Deterministic Miller-Rabin, exact for every n < 3.3e24 (far beyond any table size)."""
    if n < 2:
        return False
    small = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41)
    for p in small:
        if n % p == 0:
            return n == p
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for a in small:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def _next_unused_prime(start: int, used: set[int]) -> int:
    """Smallest prime > start that is not in `used`."""
    candidate = start + 1
    while not (_is_prime(candidate) and candidate not in used):
        candidate += 1
    return candidate


def hashable_id_bound(config: EngramConfig, vocab_size: int, num_classes: int) -> int:
    """V' = largest id that can be hashed + 1: the (canonical) codes, PAD, and the labels when hashed."""
    num_ids = config.code_map if config.code_map is not None else vocab_size
    return max(num_ids + 1, num_classes + 1 if config.hash_label else 0)


def make_hash_params(config: EngramConfig, vocab_size: int, num_classes: int) -> dict[int, HashParams]:
    """Multipliers and primes of every Engram layer, keyed by layer id (in `config.layers` order).

    Multipliers of layer l: default_rng(hash_seed + 10007 l), odd, < (2**63 - 1) // V'. Primes: per layer,
    order and head the smallest unused prime above a search start that begins at rows_per_head - 1 per
    order and moves to each found prime, so all primes are distinct over heads and layers.
    """
    if vocab_size < 1 or num_classes < 1:
        raise ValueError(f"make_hash_params: vocab_size={vocab_size} and num_classes={num_classes} must be >= 1")
    m_max = _INT64_MAX // hashable_id_bound(config, vocab_size, num_classes)
    half_bound = max(1, m_max // 2)
    num_slots = max(len(order) for order in config.neighborhoods) + 1  # + the class-label slot
    used: set[int] = set()
    params: dict[int, HashParams] = {}
    for layer in config.layers:
        rng = np.random.default_rng(config.hash_seed + _LAYER_SEED_STRIDE * layer)
        multipliers = rng.integers(0, half_bound, size=num_slots, dtype=np.int64) * 2 + 1
        primes: list[int] = []
        for _ in range(config.num_orders):
            search_start = config.rows_per_head - 1
            for _ in range(config.heads_per_order):
                search_start = _next_unused_prime(search_start, used)
                used.add(search_start)
                primes.append(search_start)
        offsets = np.concatenate([[0], np.cumsum(primes)[:-1]]).astype(np.int64)
        params[layer] = HashParams(layer=layer, multipliers=torch.from_numpy(multipliers),
                                   primes=torch.tensor(primes, dtype=torch.int64),
                                   offsets=torch.from_numpy(offsets), total_rows=int(sum(primes)))
    return params


def _check_positions(history: torch.Tensor, positions: torch.Tensor, grid: tuple[int, int]) -> None:
    """Targets must be grid cells and the history must hold every token before them (q <= p - 1)."""
    if history.dim() != 2 or positions.dim() != 1:
        raise ValueError(f"neighbor_ids: history must be [B,N] and positions [P], got "
                         f"{tuple(history.shape)} and {tuple(positions.shape)}")
    if positions.numel() == 0 or positions.device.type == "meta":
        return
    cells, length = grid[0] * grid[1], history.shape[1]
    if positions.device.type == "cpu" and not torch.compiler.is_compiling():
        low, high = int(positions.min()), int(positions.max())
        if low < 0 or high >= cells:
            raise ValueError(f"neighbor_ids: positions span [{low}, {high}], outside the {grid} grid's cells")
        if high > length:
            raise ValueError(f"neighbor_ids: position {high} needs {high} tokens of history, got {length}")
    else:
        # No host sync on accelerators or in compiled code (it would stall every decode step); a violation
        # is a programming error and surfaces at the next kernel launch.
        ok = (positions.min() >= 0) & (positions.max() < cells) & (positions.max() <= length)
        torch._assert_async(ok, "neighbor_ids: positions outside the grid or beyond the history")


def _build_slot_table(grid: tuple[int, int], orders: tuple[tuple, ...], mode: str) -> torch.Tensor:
    """int64 [cells, orders, max_slots]: for each target cell and neighbour slot, 1 + the history index it
    reads, 0 for "outside the image" (the pad column) and for the padding of shorter orders. A pure
    function of the layout: hashing a step is then one gather, not a loop."""
    height, width = grid
    cells = torch.arange(height * width)
    rows, cols = cells // width, cells % width
    width_slots = max(len(order) for order in orders)
    table = torch.zeros(height * width, len(orders), width_slots, dtype=torch.int64)
    for o, order in enumerate(orders):
        for j, offset in enumerate(order):
            if mode == "2d":
                d_row, d_col = offset
                if not (d_row < 0 or (d_row == 0 and d_col < 0)):  # a later cell would break prefix invariance
                    raise ValueError(f"neighbor_ids: 2d offset {offset} is not strictly before the target")
                row, col = rows + d_row, cols + d_col
                inside = (row >= 0) & (col >= 0) & (col < width)
                table[:, o, j] = torch.where(inside, row * width + col + 1, 0)
            elif mode == "raster":
                if isinstance(offset, tuple) or int(offset) < 1:
                    raise ValueError(f"neighbor_ids: raster offset {offset} must be an int k >= 1")
                source = cells - int(offset)
                table[:, o, j] = torch.where(source >= 0, source + 1, 0)
            else:
                raise ValueError(f"neighbor_ids: mode must be '2d' or 'raster', got {mode!r}")
    return table


_LAYOUTS: dict[tuple, torch.Tensor] = {}


def _slot_layout(grid: tuple[int, int], orders: tuple[tuple, ...], mode: str, device: torch.device) -> torch.Tensor:
    """The slot table [cells, orders, max_slots] on `device`, built once per layout and device (not per
    decode step)."""
    key = (grid, orders, mode, str(device))
    if key not in _LAYOUTS:
        _LAYOUTS[key] = _build_slot_table(grid, orders, mode).to(device)
    return _LAYOUTS[key]


_OFFSETS: dict[tuple, tuple[tuple, ...]] = {}


def _offsets_of(neighborhoods: tuple[tuple, ...], mode: str) -> tuple[tuple, ...]:
    """The neighbour offsets of every order (`neighbor_offset`), parsed once per layout, not per step (a
    plain dict, like `_LAYOUTS`: torch.compile traces through functools caches without using them)."""
    key = (neighborhoods, mode)
    if key not in _OFFSETS:
        _OFFSETS[key] = tuple(tuple(neighbor_offset(spec, mode) for spec in order) for order in neighborhoods)
    return _OFFSETS[key]


def _gather_slots(history: torch.Tensor, positions: torch.Tensor, grid: tuple[int, int],
                  orders: tuple[tuple, ...], mode: str, pad_id: int) -> torch.Tensor:
    """Tokens at every neighbour slot: int64 [B, P, orders, max_slots] (pad_id outside the image); the
    caller validates `positions` (`_check_positions`)."""
    table = _slot_layout(grid, orders, mode, history.device)
    # A leading pad column turns "outside" into an ordinary read and also serves an empty history.
    padded = F.pad(history.long(), (1, 0), value=pad_id)  # [B,N+1]
    return padded[:, table[positions.to(history.device).long()]]


def neighbor_ids(history: torch.Tensor, positions: torch.Tensor, grid: tuple[int, int],
                 offsets: Sequence[tuple[int, int]] | Sequence[int], mode: str, pad_id: int) -> torch.Tensor:
    """Tokens of the causal neighbourhood of each target cell.

    history: int [B,N] image tokens (entries at index >= max(positions) are never read, so a partly filled
    decode buffer is fine); positions: int [P] target cells p (cell (r, c) = divmod(p, W)); offsets: (dr, dc)
    per neighbour in `2d` mode, k >= 1 (index p - k, crossing row ends) in `raster` mode.
    Returns int64 [B,P,n]: the token at each neighbour, `pad_id` where it lies outside the image.
    """
    _check_positions(history, positions, grid)
    return _gather_slots(history, positions, grid, (tuple(offsets),), mode, pad_id)[:, :, 0]


@dataclass(frozen=True, eq=False)
class HashConstants:
    """The hash constants of a model's L Engram layers, laid out for broadcasting against the gathered
    neighbour ids [B,P,orders,max_slots]: what `hash_rows` multiplies by, XORs and divides by. The model
    keeps them as its checkpointed buffers, the one copy it hashes with; `hash_constants` lays them out
    from `make_hash_params`' per-layer draws."""

    slot_multipliers: torch.Tensor
    """int64 [L,1,1,orders,max_slots]: multiplier j for slot j of every order, 0 for padding slots."""
    label_multipliers: torch.Tensor
    """int64 [L,1]: the class label's multiplier."""
    primes: torch.Tensor
    """int64 [L,1,1,orders,heads_per_order]: rows of each head."""
    offsets: torch.Tensor
    """int64 [L,1,1,orders,heads_per_order]: first row of each head in its layer's table."""


def hash_constants(config: EngramConfig, params: Sequence[HashParams]) -> HashConstants:
    """`HashConstants` of the layers in `params` (in that order), on the device of their tensors."""
    multipliers = torch.stack([p.multipliers for p in params])  # [L, max_slots + 1]
    width = max(len(order) for order in config.neighborhoods)
    valid = torch.tensor([[j < len(order) for j in range(width)] for order in config.neighborhoods],
                         device=multipliers.device)
    grouped = (len(params), 1, 1, config.num_orders, config.heads_per_order)
    return HashConstants(slot_multipliers=(multipliers[:, None, None, None, :width] * valid),
                         label_multipliers=multipliers[:, -1:].clone(),
                         primes=torch.stack([p.primes for p in params]).reshape(grouped),
                         offsets=torch.stack([p.offsets for p in params]).reshape(grouped))


def hash_rows(tokens_history: torch.Tensor, positions: torch.Tensor, labels: torch.Tensor | None,
              grid: tuple[int, int], config: EngramConfig, constants: HashConstants, pad_id: int,
              code_map: torch.Tensor | None = None, check_positions: bool = True) -> torch.Tensor:
    """Global table row ids of every Engram layer for each target position and head: int64
    [L,B,P,num_heads], head k of order o (k counted over all orders, order-major) in
    [offsets[k], offsets[k] + primes[k]) of its layer's table.

    tokens_history: int [B,N] image tokens (raw codes, PAD = pad_id; entries at index >= max(positions)
    are never read); positions: int [P] target cells; labels: int [B] class ids (num_classes = null label),
    used only when `config.hash_label`; constants: `hash_constants` of the L layers, on the tokens' device;
    code_map: int [num_codes + 1] raw id (pad_id included) -> canonical id (PAD -> config.code_map),
    required exactly when `config.code_map` is set. check_positions=False skips validating `positions`
    (callers that built them from a checked length).

    Every layer hashes the same neighbourhood, so a forward needs one gather of every neighbour slot of
    every order; then one multiply by all layers' multipliers, an XOR over the few slots (shorter orders
    are padded with multiplier 0, and x ^ 0 = x) and one modulus by every head's prime. A handful of ops
    whatever the number of layers: at a decode step their count, not their size, is the cost.
    check_positions=False skips validating `positions` (callers that built them from a checked length).
    """
    if (code_map is None) != (config.code_map is None):
        raise ValueError(f"hash_rows: config.code_map={config.code_map} needs a code_map tensor exactly when "
                         f"set (got {'none' if code_map is None else 'one'}); unmapped ids would break the "
                         f"multiplier bound")
    device = tokens_history.device
    orders = _offsets_of(config.neighborhoods, config.mode)
    if check_positions:
        _check_positions(tokens_history, positions, grid)
    ids = _gather_slots(tokens_history, positions, grid, orders, config.mode, pad_id)  # [B,P,O,S]
    if code_map is not None:
        ids = code_map.to(device)[ids]
    first, *others = (ids * constants.slot_multipliers).unbind(-1)  # S views [L,B,P,O] from one call
    mix = first
    for product in others:  # XOR-reduce over the few neighbour slots
        mix = mix ^ product
    if config.hash_label:
        if labels is None:
            raise ValueError("hash_rows: config.hash_label is set but labels is None")
        label_terms = labels.to(device).long()[None, :] * constants.label_multipliers  # [L,B]
        mix = mix ^ label_terms[:, :, None, None]
    # The products are non-negative and below 2**63, so the XOR is too and `%` is the plain modulus.
    # [L,B,P,O,1] against [L,1,1,O,heads_per_order]: heads order-major, as the table is laid out.
    return (mix[..., None] % constants.primes + constants.offsets).flatten(-2)


__all__ = ["HashConstants", "HashParams", "hash_constants", "hash_rows", "hashable_id_bound", "make_hash_params",
           "neighbor_ids"]
