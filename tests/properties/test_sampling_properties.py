"""Property-based tests of `sample.sampling`'s token choice (hypothesis, derandomized, CPU, seconds).

For any logits [B,V] with at least one finite entry per row (-inf masks, ties, all-equal rows, values up to
the dtype's range, in float32/float64/bfloat16/float16), any top_k >= 0 and top_p in (0, 1]:
`filter_logits` only masks (kept entries keep their value), never empties a row, keeps the row maximum,
keeps a top set, keeps exactly min(k, finite) under top-k (ties included: the implementation promises
exactly k), keeps the smallest sorted prefix reaching top_p under top-p (up to float32 rounding), applies
top-k before top-p and leaves its input alone; `sample_next` returns int64 ids of the support at any
temperature, the argmax when greedy, and the same ids for the same generator seed. Hand-computed cases
live in tests/sample/test_sampling.py.
"""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sample.sampling import SamplingConfig, filter_logits, sample_next

SETTINGS = settings(max_examples=150, deadline=None, derandomize=True, database=None)
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# Slack on probability masses: the implementation sums float32 softmax values (and allows 1e-6 itself).
MASS_TOLERANCE = 2e-5


@st.composite
def logits_rows(draw: st.DrawFn) -> torch.Tensor:
    """Logits [B,V] of a random dtype: mixtures of ordinary values, a few repeated ones (ties), -inf and the
    dtype's extremes; every row keeps at least one finite entry."""
    dtype = draw(st.sampled_from(DTYPES))
    big = float(torch.finfo(dtype).max)
    batch, vocab = draw(st.integers(1, 4)), draw(st.integers(1, 24))
    pool = draw(st.lists(st.floats(-30, 30), min_size=1, max_size=4))  # shared values make ties
    value = st.one_of(st.floats(-4, 4), st.floats(-1e4, 1e4), st.sampled_from(pool), st.just(-math.inf),
                      st.sampled_from([big, -big, big / 2, 0.0]))
    rows = []
    for _ in range(batch):
        if draw(st.booleans()):
            row = [draw(value)] * vocab  # all equal (possibly a single finite value repeated)
        else:
            row = draw(st.lists(value, min_size=vocab, max_size=vocab))
        if all(v == -math.inf for v in row):
            row[draw(st.integers(0, vocab - 1))] = draw(st.floats(-1e4, 1e4))
        rows.append(row)
    return torch.tensor(rows, dtype=torch.float64).to(dtype)


TOP_K = st.one_of(st.just(0), st.integers(1, 30))
TOP_P = st.one_of(st.just(1.0), st.floats(1e-9, 1.0),
                  st.sampled_from([1e-12, 0.5, 1.0 - 1e-7, math.nextafter(1.0, 0.0)]))


def _kept(filtered: torch.Tensor) -> torch.Tensor:
    return filtered > -math.inf


def _probs(logits: torch.Tensor) -> torch.Tensor:
    """Softmax in float64 (0 for -inf entries), the exact distribution the filters reason about."""
    return torch.softmax(logits.double(), dim=-1)


@SETTINGS
@given(logits_rows(), TOP_K, TOP_P)
def test_filter_only_masks_and_keeps_the_row_maximum(logits: torch.Tensor, top_k: int, top_p: float) -> None:
    before = logits.clone()
    out = filter_logits(logits, top_k, top_p)
    assert torch.equal(logits, before), "filter_logits wrote into its input"
    assert out.shape == logits.shape and out.dtype == logits.dtype
    kept = _kept(out)
    assert torch.equal(out[kept], logits[kept]) and bool((out[~kept] == -math.inf).all())
    assert bool(kept.any(dim=-1).all()), "a row lost its whole support"
    assert torch.equal(out.amax(dim=-1), logits.amax(dim=-1)), "the row maximum was dropped"
    # The kept set is a top set: nothing dropped is larger than anything kept.
    lowest_kept = torch.where(kept, logits.double(), math.inf).amin(dim=-1)
    highest_dropped = torch.where(kept, -math.inf, logits.double()).amax(dim=-1)
    assert bool((highest_dropped <= lowest_kept).all())


@SETTINGS
@given(logits_rows(), TOP_K)
def test_top_k_keeps_exactly_min_k_finite(logits: torch.Tensor, top_k: int) -> None:
    kept = _kept(filter_logits(logits, top_k, 1.0)).sum(dim=-1)
    finite = (logits > -math.inf).sum(dim=-1)
    want = finite if top_k == 0 else finite.clamp(max=top_k)
    assert torch.equal(kept, want)


@SETTINGS
@given(logits_rows(), TOP_P, TOP_P)
def test_top_p_keeps_the_smallest_prefix_reaching_top_p(logits: torch.Tensor, top_p: float, other_p: float) -> None:
    out = filter_logits(logits, 0, top_p)
    kept = _kept(out)
    probs = _probs(logits)
    mass = (probs * kept).sum(dim=-1)
    if top_p == 1.0:
        assert torch.equal(kept, logits > -math.inf)
        return
    assert bool((mass >= top_p - MASS_TOLERANCE).all()), "the kept set does not reach top_p"
    # Minimal: without its least likely member the kept set falls short of top_p.
    least = torch.where(kept, probs, math.inf).amin(dim=-1)
    assert bool((mass - least < top_p + MASS_TOLERANCE).all()), "a smaller set already reaches top_p"
    # Nested in p: a larger top_p keeps a superset (same sorted order, longer prefix).
    small, large = sorted((top_p, other_p))
    assert bool((_kept(filter_logits(logits, 0, small)) <= _kept(filter_logits(logits, 0, large))).all())


@SETTINGS
@given(logits_rows(), TOP_K, TOP_P)
def test_top_k_applies_before_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> None:
    both = filter_logits(logits, top_k, top_p)
    assert torch.equal(both, filter_logits(filter_logits(logits, top_k, 1.0), 0, top_p))
    assert bool((_kept(both) <= _kept(filter_logits(logits, top_k, 1.0))).all())


TEMPERATURE = st.one_of(st.just(0.0), st.just(1.0), st.floats(1e-30, 1e-5), st.floats(1e-5, 1e6))


@SETTINGS
@given(logits_rows(), TOP_K, TOP_P, TEMPERATURE, st.integers(0, 2**32))
def test_sample_next_draws_from_the_support(logits: torch.Tensor, top_k: int, top_p: float, temperature: float,
                                            seed: int) -> None:
    config = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p)
    ids = sample_next(logits, config, torch.Generator().manual_seed(seed))
    assert ids.dtype == torch.int64 and ids.shape == (logits.shape[0],)
    assert torch.equal(ids, sample_next(logits, config, torch.Generator().manual_seed(seed)))
    picked = logits.double().gather(-1, ids[:, None])
    if temperature == 0:
        assert torch.equal(ids, logits.argmax(dim=-1))
        return
    assert bool((picked > -math.inf).all()), "sampled a masked token"
    # Exactly: the id lies in the support of filter_logits on the documented scaled logits,
    # (logits - row max) / max(temperature, 1e-5) in float32 (float64 for float64 logits).
    wide = logits.to(torch.promote_types(logits.dtype, torch.float32))
    scaled = ((wide - wide.amax(dim=-1, keepdim=True)) / max(temperature, 1e-5)).float()
    support = _kept(filter_logits(scaled, top_k, top_p))
    assert bool(support.gather(-1, ids[:, None]).all()), "sampled outside the filtered support"
    # top-k: fewer than k tokens are strictly more likely than the sampled one.
    if top_k > 0:
        assert bool(((logits.double() > picked).sum(dim=-1) < top_k).all())
    # top-p: the tokens strictly more likely than the sampled one do not already reach top_p (else the
    # sampled token lies outside the smallest prefix). Masses of the temperature-scaled, top-k-filtered
    # distribution, computed in float64 from the row maximum so no scale overflows.
    if top_p < 1.0:
        shifted = logits.double() - logits.double().amax(dim=-1, keepdim=True)
        scaled = filter_logits(shifted / max(temperature, 1e-5), top_k, 1.0)
        above = (_probs(scaled) * (logits.double() > picked)).sum(dim=-1)
        assert bool((above < top_p + MASS_TOLERANCE).all())


@SETTINGS
@given(logits_rows(), TOP_K, TOP_P, st.integers(0, 2**32))
def test_greedy_takes_the_argmax(logits: torch.Tensor, top_k: int, top_p: float, seed: int) -> None:
    config = SamplingConfig(greedy=True, temperature=0.7, top_k=top_k, top_p=top_p)
    assert torch.equal(sample_next(logits, config, torch.Generator().manual_seed(seed)), logits.argmax(dim=-1))
