"""sample.sampling: seeds reproduce, greedy/temperature/top-k/top-p keep the right tokens, CFG mixing and
schedules give hand-computed numbers, configs and generators are validated. CPU only, seconds."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sample.sampling import SamplingConfig, cfg_mix, cfg_scale_at, filter_logits, sample_next

PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05])


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _draw(logits: torch.Tensor, config: SamplingConfig, seed: int = 0) -> torch.Tensor:
    return sample_next(logits, config, _gen(seed))


def test_same_seed_same_tokens_different_seed_different():
    logits = torch.randn(64, 100)
    config = SamplingConfig(temperature=1.0, top_k=50, top_p=0.95)
    first = _draw(logits, config, seed=1)
    assert first.dtype == torch.int64 and first.shape == (64,)
    assert torch.equal(first, _draw(logits, config, seed=1))
    assert not torch.equal(first, _draw(logits, config, seed=2))


@pytest.mark.parametrize("config", [SamplingConfig(greedy=True, temperature=5.0, top_k=3),
                                    SamplingConfig(temperature=0.0), SamplingConfig(temperature=1e-6),
                                    SamplingConfig(top_k=1)])
def test_greedy_like_settings_equal_argmax(config):
    logits = torch.randn(32, 50)
    assert torch.equal(_draw(logits, config), logits.argmax(-1))


def test_bfloat16_logits_sample_in_range():
    tokens = _draw(torch.randn(8, 20, dtype=torch.bfloat16), SamplingConfig(top_p=0.9))
    assert tokens.dtype == torch.int64 and bool(((tokens >= 0) & (tokens < 20)).all())


def test_top_k_never_leaves_the_top_k():
    logits = torch.randn(4, 30).repeat(500, 1)  # 2000 draws over 4 distinct rows
    tokens = _draw(logits, SamplingConfig(top_k=5, temperature=2.0))
    top5 = logits.topk(5, dim=-1).indices
    assert bool((top5 == tokens[:, None]).any(-1).all())


def test_top_k_keeps_exactly_k_under_ties():
    kept = torch.isfinite(filter_logits(torch.zeros(3, 10), top_k=4))
    assert kept.sum(-1).tolist() == [4, 4, 4]


@pytest.mark.parametrize(("top_p", "kept"), [(0.8, 2), (0.5, 1), (0.1, 1), (0.81, 3), (0.95, 3), (0.96, 4)])
def test_top_p_keeps_the_smallest_prefix_reaching_top_p(top_p, kept):
    # Shuffled so that the kept set is found by probability, not by position.
    perm = torch.tensor([2, 0, 3, 1])
    filtered = filter_logits(PROBS.log()[perm][None], top_p=top_p)[0]
    assert set(torch.isfinite(filtered).nonzero().flatten().tolist()) == set(perm.argsort()[:kept].tolist())


def test_top_p_boundary_survives_float32_rounding():
    # In float32 the softmax mass of the first two is 0.69999993 < 0.7: still exactly two are kept.
    filtered = filter_logits(torch.tensor([[0.38, 0.32, 0.3]]).log(), top_p=0.7)[0]
    assert torch.isfinite(filtered).tolist() == [True, True, False]


def test_top_k_then_top_p():
    # top-k=3 renormalises to [0.526, 0.316, 0.158]; top-p 0.8 then keeps two tokens.
    filtered = filter_logits(PROBS.log()[None], top_k=3, top_p=0.8)[0]
    assert torch.isfinite(filtered).tolist() == [True, True, False, False]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-8, 8), min_size=2, max_size=40), st.floats(0.01, 0.99))
def test_top_p_set_is_minimal_and_reaches_top_p(values, top_p):
    logits = torch.tensor(values)
    probs = logits.softmax(-1)
    kept = torch.isfinite(filter_logits(logits[None], top_p=top_p)[0])
    mass = float(probs[kept].sum())
    assert mass >= top_p - 1e-5
    # Dropping the least likely kept token falls below top_p (else the set was not the smallest).
    assert kept.sum() == 1 or mass - float(probs[kept].min()) < top_p + 1e-5
    # Nothing dropped is more likely than anything kept.
    assert kept.all() or float(probs[~kept].max()) <= float(probs[kept].min())


def test_top_p_frequencies_match_renormalised_probabilities():
    n = 40_000
    tokens = _draw(PROBS.log().expand(n, 4), SamplingConfig(top_p=0.9), seed=3)
    counts = torch.bincount(tokens, minlength=4).double()
    assert counts[3] == 0
    expected = PROBS[:3].double() / PROBS[:3].sum() * n
    chi2 = float(((counts[:3] - expected) ** 2 / expected).sum())
    assert chi2 < 13.8  # 99.9% quantile of chi-square with 2 degrees of freedom


def test_temperature_sharpens_and_flattens():
    logits = PROBS.log().expand(20_000, 4)
    hot = torch.bincount(_draw(logits, SamplingConfig(temperature=100.0)), minlength=4) / 20_000
    cold = torch.bincount(_draw(logits, SamplingConfig(temperature=0.5)), minlength=4) / 20_000
    assert float((hot - 0.25).abs().max()) < 0.02
    assert abs(float(cold[0]) - 0.25 / (0.25 + 0.09 + 0.0225 + 0.0025)) < 0.02  # p**2 renormalised


def test_cfg_mix_endpoints_and_hand_value():
    cond, uncond = torch.randn(3, 17), torch.randn(3, 17)
    assert torch.equal(cfg_mix(cond, uncond, 1.0), cond)
    assert torch.equal(cfg_mix(cond, uncond, 0.0), uncond)
    mixed = cfg_mix(torch.tensor([[1.0, -2.0, 0.5]]), torch.tensor([[0.0, 1.0, 0.5]]), 2.0)
    assert torch.equal(mixed, torch.tensor([[2.0, -5.0, 0.5]]))


@pytest.mark.parametrize("schedule", ["constant", "linear", "power-cosine"])
@pytest.mark.parametrize("power", [0.5, 1.0, 3.0])
def test_schedule_endpoints_and_monotone(schedule, power):
    config = SamplingConfig(cfg_scale=4.0, cfg_schedule=schedule, cfg_power=power)
    values = [cfg_scale_at(step, 256, config) for step in range(256)]
    assert values[0] == (4.0 if schedule == "constant" else 1.0)
    assert values[-1] == pytest.approx(4.0, abs=1e-12)
    assert all(b >= a for a, b in zip(values, values[1:], strict=False))
    assert cfg_scale_at(0, 1, config) == 4.0  # a single step is the last step


def test_schedule_midpoints():
    linear = SamplingConfig(cfg_scale=3.0, cfg_schedule="linear")
    assert cfg_scale_at(2, 5, linear) == pytest.approx(2.0)
    assert cfg_scale_at(1, 5, linear) == pytest.approx(1.5)
    cosine = SamplingConfig(cfg_scale=3.0, cfg_schedule="power-cosine", cfg_power=2.0)
    assert cfg_scale_at(2, 5, cosine) == pytest.approx(1 + 2 * (1 - math.cos(math.pi / 4)) / 2)
    with pytest.raises(ValueError, match="step"):
        cfg_scale_at(5, 5, linear)


@pytest.mark.parametrize(("field", "value"), [("temperature", -0.1), ("temperature", math.nan), ("top_k", -1),
                                              ("top_p", 0.0), ("top_p", 1.5), ("cfg_scale", -1.0),
                                              ("cfg_schedule", "cosine"), ("cfg_power", 0.0)])
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=f"SamplingConfig.{field}"):
        SamplingConfig(**{field: value})


def test_rng_must_be_a_generator_on_the_logits_device():
    with pytest.raises(TypeError, match="torch.Generator"):
        sample_next(torch.randn(2, 5), SamplingConfig(), 0)  # type: ignore[arg-type]
    # Meta tensors carry a device without needing an accelerator, so the mismatch is testable on CPU.
    with pytest.raises(ValueError, match="rng is on cpu"):
        sample_next(torch.empty(2, 5, device="meta"), SamplingConfig(), _gen(0))


@pytest.mark.gpu
def test_cpu_generator_with_cuda_logits_errors_and_cuda_generator_works():
    logits = torch.randn(4, 10, device="cuda")
    with pytest.raises(ValueError, match="rng is on cpu"):
        sample_next(logits, SamplingConfig(), _gen(0))
    rng = torch.Generator(device="cuda").manual_seed(0)
    assert sample_next(logits, SamplingConfig(top_k=3), rng).device.type == "cuda"
