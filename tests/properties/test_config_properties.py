"""Property-based tests of the typed configs' validation (hypothesis, derandomized, CPU, seconds).

Covers `ModelConfig` and `EngramConfig` (engram_vision/config.py), `SamplingConfig` (sample/sampling.py),
`ProbeConfig` (engram_vision/probes.py) and `SamplePlan` (sample/job.py). Every valid config drawn from the
documented ranges builds, and survives the round trips a run makes (`to_dict`/`asdict` back into the
constructor, and through JSON, where tuples come back as lists) equal and with the same hash. Replacing one
field of a valid config by a value outside its documented range (negative or zero sizes, NaN and infinite
floats, probabilities outside their interval, unknown modes, non-causal or malformed neighbours, ...) raises
ValueError whose message names that field as `Class.field`.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engram_vision.config import NAMED_NEIGHBORS, EngramConfig, ModelConfig
from engram_vision.probes import DONOR_KINDS, INTERVENTIONS, ProbeConfig
from sample.job import SamplePlan
from sample.sampling import SamplingConfig

SETTINGS = settings(max_examples=100, deadline=None, derandomize=True, database=None)
NAN, INF = math.nan, math.inf
NAME_OF_OFFSET = {offset: name for name, offset in NAMED_NEIGHBORS.items()}


def _not_in(*allowed: str) -> st.SearchStrategy[str]:
    return st.text(max_size=8).filter(lambda s: s not in allowed)


def _bad_float(low: float, high: float, low_open: bool = False, high_open: bool = False) -> st.SearchStrategy[float]:
    """Floats outside [low, high] (an open end also rejects the end itself), NaN and the infinities."""
    outside = [st.just(NAN)]
    if low > -INF:
        outside += [st.floats(max_value=low, exclude_max=not low_open, allow_nan=False), st.just(-INF)]
    if high < INF:
        outside += [st.floats(min_value=high, exclude_min=not high_open, allow_nan=False), st.just(INF)]
    return st.one_of(outside)


# ---------------------------------------------------------------- valid configs

@st.composite
def neighborhoods(draw: st.DrawFn, mode: str) -> tuple[tuple[str | int, ...], ...]:
    """1-3 orders of distinct causal neighbours, each spelled as a name, 'dr,dc' or an int (raster)."""
    orders = []
    for _ in range(draw(st.integers(1, 3))):
        if mode == "2d":
            offset = st.one_of(st.tuples(st.integers(-5, -1), st.integers(-5, 5)),
                               st.tuples(st.just(0), st.integers(-5, -1)))
            offsets = draw(st.lists(offset, min_size=1, max_size=4, unique=True))
            orders.append(tuple(NAME_OF_OFFSET[o] if o in NAME_OF_OFFSET and draw(st.booleans())
                                else f"{o[0]},{o[1]}" for o in offsets))
        else:
            orders.append(tuple(draw(st.lists(st.integers(1, 64), min_size=1, max_size=4, unique=True))))
    return tuple(orders)


@st.composite
def engram_configs(draw: st.DrawFn, n_layer: int = 48) -> EngramConfig:
    mode = draw(st.sampled_from(["2d", "raster"]))
    return EngramConfig(
        layers=tuple(draw(st.lists(st.integers(0, n_layer - 1), min_size=1, max_size=min(n_layer, 4), unique=True))),
        mode=mode, neighborhoods=draw(neighborhoods(mode)), heads_per_order=draw(st.integers(1, 16)),
        head_dim=draw(st.integers(1, 128)), rows_per_head=draw(st.integers(1, 10**6)),
        hash_seed=draw(st.integers(0, 2**32)), hash_label=draw(st.booleans()),
        code_map=draw(st.one_of(st.none(), st.integers(2, 10**4))),
        gate=draw(st.one_of(st.sampled_from(["learned", "off"]), st.floats(0.0, 1.0))),
        signed_sqrt=draw(st.booleans()), use_conv=draw(st.booleans()), conv_kernel=draw(st.integers(1, 8)),
        conv_dilation=draw(st.integers(1, 32)), table=draw(st.sampled_from(["trainable", "frozen"])),
        table_lr_multiplier=draw(st.floats(1e-6, 1e3)), table_weight_decay=draw(st.floats(0.0, 10.0)),
        table_device=draw(st.sampled_from(["device", "host"])))


@st.composite
def model_configs(draw: st.DrawFn) -> ModelConfig:
    rows, cols = draw(st.integers(1, 16)), draw(st.integers(1, 16))
    grid = None if rows == cols and draw(st.booleans()) else (rows, cols)
    n_head = draw(st.integers(1, 8))
    # 2D RoPE splits a head in four (rows, columns; cos, sin); a one-row grid needs only an even head.
    head_dim = draw(st.integers(1, 16)) * (4 if rows > 1 else 2)
    n_layer = draw(st.integers(1, 48))
    divisors = [d for d in range(1, n_head + 1) if n_head % d == 0]
    probability = st.floats(0.0, 1.0, exclude_max=True)
    return ModelConfig(
        dim=n_head * head_dim, n_layer=n_layer, n_head=n_head,
        n_kv_head=draw(st.one_of(st.none(), st.sampled_from(divisors))), multiple_of=draw(st.integers(1, 256)),
        ffn_dim_multiplier=draw(st.one_of(st.none(), st.floats(0.25, 4.0))), norm_eps=draw(st.floats(1e-8, 1e-2)),
        rope_base=draw(st.floats(1.0, 1e6)), rope_zero_class=draw(st.booleans()),
        vocab_size=draw(st.integers(1, 70000)), num_classes=draw(st.integers(1, 2000)), block_size=rows * cols,
        grid=grid, class_dropout_prob=draw(probability), token_dropout_p=draw(probability),
        attn_dropout_p=draw(probability), resid_dropout_p=draw(probability), ffn_dropout_p=draw(probability),
        initializer_range=draw(st.floats(0.0, 1.0)),
        engram=draw(st.one_of(st.none(), engram_configs(n_layer=n_layer))))


@st.composite
def sampling_configs(draw: st.DrawFn) -> SamplingConfig:
    return SamplingConfig(
        temperature=draw(st.floats(0.0, 100.0)), top_k=draw(st.integers(0, 10**5)),
        top_p=draw(st.floats(0.0, 1.0, exclude_min=True)), greedy=draw(st.booleans()),
        cfg_scale=draw(st.floats(0.0, 50.0)), cfg_schedule=draw(st.sampled_from(["constant", "linear", "power-cosine"])),
        cfg_power=draw(st.floats(1e-3, 10.0)))


@st.composite
def probe_configs(draw: st.DrawFn) -> ProbeConfig:
    return ProbeConfig(
        gates=tuple(draw(st.lists(st.floats(0.0, 1.0), max_size=6))),
        donors=tuple(draw(st.lists(st.sampled_from([*DONOR_KINDS, "self"]), max_size=5, unique=True))),
        interventions=tuple(draw(st.lists(st.sampled_from(INTERVENTIONS), max_size=2, unique=True))),
        batch_size=draw(st.integers(1, 512)), bootstrap_samples=draw(st.integers(1, 10**4)),
        permutations=draw(st.integers(1, 10**5)), level=draw(st.floats(0.0, 1.0, exclude_min=True, exclude_max=True)),
        seed=draw(st.integers(0, 2**32)))


# ---------------------------------------------------------------- round trips

def _through_json(fields: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(fields))


@SETTINGS
@given(model_configs())
def test_model_config_round_trips(config: ModelConfig) -> None:
    fields = config.to_dict()
    assert isinstance(fields["engram"], dict | None)
    for rebuilt in (ModelConfig(**fields), ModelConfig(**_through_json(fields))):
        assert rebuilt == config and hash(rebuilt) == hash(config)
        assert rebuilt.to_dict() == fields
        assert (rebuilt.token_grid, rebuilt.ffn_hidden, rebuilt.seq_len) == (
            config.token_grid, config.ffn_hidden, config.seq_len)


@SETTINGS
@given(engram_configs())
def test_engram_config_round_trips(config: EngramConfig) -> None:
    fields = asdict(config)
    for rebuilt in (EngramConfig(**fields), EngramConfig(**_through_json(fields))):
        assert rebuilt == config and hash(rebuilt) == hash(config)
        assert (rebuilt.num_heads, rebuilt.memory_dim) == (config.num_heads, config.memory_dim)


@SETTINGS
@given(sampling_configs())
def test_sampling_config_round_trips(config: SamplingConfig) -> None:
    for rebuilt in (SamplingConfig(**asdict(config)), SamplingConfig(**_through_json(asdict(config)))):
        assert rebuilt == config and hash(rebuilt) == hash(config)


@SETTINGS
@given(probe_configs())
def test_probe_config_round_trips(config: ProbeConfig) -> None:
    rebuilt = ProbeConfig(**asdict(config))
    assert rebuilt == config and hash(rebuilt) == hash(config)


# ---------------------------------------------------------------- invalid values name their field

SIZE = st.integers(-10**6, 0)
DROPOUTS = ("class_dropout_prob", "token_dropout_p", "attn_dropout_p", "resid_dropout_p", "ffn_dropout_p")


@st.composite
def bad_model_fields(draw: st.DrawFn, config: ModelConfig) -> tuple[str, dict[str, Any]]:
    """(field named in the error, overrides) breaking exactly one documented constraint of `config`."""
    rows, cols = config.token_grid
    cases = {
        "dim": st.one_of(SIZE, st.integers(1, max(1, config.n_head - 1))  # not a multiple of n_head
                         .map(lambda r: config.dim + r if config.n_head > 1 else -r)).map(lambda v: {"dim": v}),
        "n_layer": SIZE.map(lambda v: {"n_layer": v, "engram": None}),
        "n_head": SIZE.map(lambda v: {"n_head": v}),
        "n_kv_head": st.one_of(SIZE, st.integers(config.n_head + 1, 64)).map(lambda v: {"n_kv_head": v}),
        "multiple_of": SIZE.map(lambda v: {"multiple_of": v}),
        "ffn_dim_multiplier": st.one_of(_bad_float(0.0, INF, low_open=True), st.floats(1e-300, 1e-12))
                              .map(lambda v: {"ffn_dim_multiplier": v}),
        "norm_eps": _bad_float(0.0, INF, low_open=True).map(lambda v: {"norm_eps": v}),
        "rope_base": _bad_float(0.0, INF, low_open=True).map(lambda v: {"rope_base": v}),
        "initializer_range": _bad_float(0.0, INF).map(lambda v: {"initializer_range": v}),
        "vocab_size": SIZE.map(lambda v: {"vocab_size": v}),
        "num_classes": SIZE.map(lambda v: {"num_classes": v}),
        "block_size": st.one_of(SIZE, st.integers(1, 10**4).filter(lambda n: math.isqrt(n) ** 2 != n))
                      .map(lambda v: {"block_size": v, "grid": None}),
        "grid": st.one_of(
            st.tuples(st.integers(-16, 0), st.integers(-16, 16)), st.tuples(st.integers(-16, 16), st.integers(-16, 0)),
            st.lists(st.integers(1, 8), min_size=3, max_size=4).map(tuple),
            st.tuples(st.integers(1, 32), st.integers(1, 32)).filter(lambda g: g[0] * g[1] != rows * cols),
        ).map(lambda g: {"grid": g}),
        "cls_token_num": st.integers(-4, 8).filter(lambda n: n != 1).map(lambda v: {"cls_token_num": v}),
        **{name: _bad_float(0.0, 1.0, high_open=True).map(lambda v, n=name: {n: v}) for name in DROPOUTS},
    }
    if config.engram is not None:  # an Engram layer beyond the depth
        cases["EngramConfig.layers"] = st.integers(config.n_layer, config.n_layer + 8).map(
            lambda layer: {"engram": replace(config.engram, layers=(*config.engram.layers[1:], layer))})
    field = draw(st.sampled_from(sorted(cases)))
    return field, draw(cases[field])


@SETTINGS
@given(st.data())
def test_model_config_names_the_bad_field(data: st.DataObject) -> None:
    config = data.draw(model_configs())
    field, overrides = data.draw(bad_model_fields(config))
    name = field if "." in field else f"ModelConfig.{field}"
    with pytest.raises(ValueError, match=re.escape(name)):
        replace(config, **overrides)


BAD_2D_NEIGHBOUR = st.one_of(
    st.tuples(st.integers(1, 5), st.integers(-5, 5)), st.tuples(st.just(0), st.integers(0, 5)),  # non-causal
).map(lambda o: f"{o[0]},{o[1]}") | st.sampled_from(["R", "D", "l", "1", "0,-1,2", "", "x,y"])
BAD_RASTER_NEIGHBOUR = st.one_of(st.integers(-64, 0), st.sampled_from(["L", "one", "1.5", "", "0"]))


@st.composite
def bad_engram_fields(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    """(field named in the error, overrides) breaking exactly one documented constraint of an EngramConfig."""
    neighbours = st.one_of(
        st.just({"neighborhoods": ()}), st.just({"neighborhoods": ((),)}),
        st.just({"neighborhoods": ("LU",)}), st.just({"neighborhoods": "LU"}),  # strings are not orders
        BAD_2D_NEIGHBOUR.map(lambda n: {"mode": "2d", "neighborhoods": (("L",), ("U", n))}),
        BAD_RASTER_NEIGHBOUR.map(lambda n: {"mode": "raster", "neighborhoods": ((1, 2), (n,))}),
        st.sampled_from([("L", "0,-1"), ("U", "(-1, 0)"), ("UL", "-1,-1")])  # the same cell twice
        .map(lambda order: {"mode": "2d", "neighborhoods": (order,)}),
        st.just({"mode": "raster", "neighborhoods": ((3, "3"),)}),
    )
    cases = {
        "layers": st.one_of(st.just(()), st.integers(0, 8).map(lambda n: (n, n)),
                            st.integers(-100, -1).map(lambda n: (0, n))).map(lambda v: {"layers": v}),
        "mode": _not_in("2d", "raster").map(lambda v: {"mode": v}),
        "neighborhoods": neighbours,
        **{name: SIZE.map(lambda v, n=name: {n: v})
           for name in ("heads_per_order", "head_dim", "rows_per_head", "conv_kernel", "conv_dilation")},
        "hash_seed": st.integers(-2**40, -1).map(lambda v: {"hash_seed": v}),
        "code_map": st.integers(-10**4, 1).map(lambda v: {"code_map": v}),
        "gate": st.one_of(_not_in("learned", "off"), _bad_float(0.0, 1.0)).map(lambda v: {"gate": v}),
        "table": _not_in("trainable", "frozen").map(lambda v: {"table": v}),
        "table_device": _not_in("device", "host").map(lambda v: {"table_device": v}),
        "table_lr_multiplier": _bad_float(0.0, INF, low_open=True).map(lambda v: {"table_lr_multiplier": v}),
        "table_weight_decay": _bad_float(0.0, INF).map(lambda v: {"table_weight_decay": v}),
    }
    field = draw(st.sampled_from(sorted(cases)))
    return field, draw(cases[field])


@SETTINGS
@given(engram_configs(), bad_engram_fields())
def test_engram_config_names_the_bad_field(config: EngramConfig, bad: tuple[str, dict[str, Any]]) -> None:
    field, overrides = bad
    with pytest.raises(ValueError, match=re.escape(f"EngramConfig.{field}")):
        replace(config, **overrides)
    # Nested in a ModelConfig (as a dict, the way a saved config comes back), the error is the same.
    with pytest.raises(ValueError, match=re.escape(f"EngramConfig.{field}")):
        ModelConfig(dim=64, n_layer=2, n_head=4, block_size=16, engram={**asdict(config), **overrides})


@st.composite
def bad_sampling_fields(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    cases = {
        "temperature": _bad_float(0.0, INF),
        "top_k": st.integers(-10**6, -1),
        "top_p": _bad_float(0.0, 1.0, low_open=True),
        "cfg_scale": _bad_float(0.0, INF),
        "cfg_schedule": _not_in("constant", "linear", "power-cosine"),
        "cfg_power": _bad_float(0.0, INF, low_open=True),
    }
    field = draw(st.sampled_from(sorted(cases)))
    return field, {field: draw(cases[field])}


@SETTINGS
@given(sampling_configs(), bad_sampling_fields())
def test_sampling_config_names_the_bad_field(config: SamplingConfig, bad: tuple[str, dict[str, Any]]) -> None:
    field, overrides = bad
    with pytest.raises(ValueError, match=re.escape(f"SamplingConfig.{field}")):
        replace(config, **overrides)


@st.composite
def bad_probe_fields(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    cases = {
        "gates": st.lists(_bad_float(0.0, 1.0), min_size=1, max_size=2).map(lambda bad: (0.5, *bad)),
        "donors": _not_in(*DONOR_KINDS, "self").map(lambda kind: (DONOR_KINDS[0], kind)),
        "interventions": _not_in(*INTERVENTIONS).map(lambda kind: (kind,)),
        "batch_size": SIZE, "bootstrap_samples": SIZE, "permutations": SIZE,
        "level": _bad_float(0.0, 1.0, low_open=True, high_open=True),
    }
    field = draw(st.sampled_from(sorted(cases)))
    return field, {field: draw(cases[field])}


@SETTINGS
@given(probe_configs(), bad_probe_fields())
def test_probe_config_names_the_bad_field(config: ProbeConfig, bad: tuple[str, dict[str, Any]]) -> None:
    field, overrides = bad
    with pytest.raises(ValueError, match=re.escape(f"ProbeConfig.{field}")):
        replace(config, **overrides)


@settings(SETTINGS, max_examples=10)
@given(probe_configs(), st.integers(-2**40, -1))
def test_probe_config_rejects_a_negative_seed(config: ProbeConfig, seed: int) -> None:
    try:
        replace(config, seed=seed)
    except ValueError as error:
        assert "ProbeConfig.seed" in str(error)
    else:
        raise AssertionError(f"ProbeConfig accepted seed={seed}")


@SETTINGS
@given(st.integers(1, 2000), st.integers(1, 3000), st.sampled_from(["num_samples", "batch_size"]), SIZE)
def test_sample_plan_names_the_bad_field(num_samples: int, batch_size: int, field: str, value: int) -> None:
    plan = SamplePlan(num_samples, batch_size)
    assert sum(len(plan.indices(k)) for k in range(plan.num_batches)) == num_samples
    with pytest.raises(ValueError, match=f"SamplePlan.{field}"):
        replace(plan, **{field: value})
