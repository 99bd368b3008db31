"""Probes (engram_vision.probes) and their statistics (engram_vision.stats) on tiny models."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from engram_vision.interventions import collapsed_tables, gate_clamped, with_gate
from engram_vision.probes import (
    Probe,
    ProbeConfig,
    choose_donors,
    hamming_distances,
    run_probes,
    score_probes,
)
from engram_vision.stats import bootstrap_mean, bootstrap_ratio, paired_permutation_test

GRID = 16  # gpt-tiny: 4x4 grid of 64 codes, 10 classes


def _images(count: int = 24, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 64, (count, GRID), generator=generator), torch.arange(count) % 4


def test_identical_inputs_and_self_donor_give_zero_kl(random_model, tiny_config):
    model = random_model(tiny_config())
    tokens, labels = _images()
    donors, distance = choose_donors(tokens, labels, "self", torch.Generator())
    probes = {"same": Probe(), "self": Probe(donor_tokens=tokens[donors], donor_labels=labels[donors]),
              "other": Probe(donor_tokens=tokens.roll(1, 0))}
    nll, scores = score_probes(model, tokens, labels, probes, batch_size=5)
    assert torch.equal(scores["same"]["kl"], torch.zeros(24, dtype=torch.float64))
    assert torch.equal(scores["self"]["kl"], torch.zeros(24, dtype=torch.float64))
    assert torch.equal(distance, torch.zeros(24, dtype=torch.int64))
    assert torch.equal(scores["same"]["nll"], nll)
    assert (scores["other"]["kl"] > 1e-6).all()  # a real swap moves every image
    # the batched NLL is the plain cross-entropy of the full forward
    with torch.no_grad():
        logits = model(tokens[:, :-1], labels)
    expected = torch.nn.functional.cross_entropy(logits.transpose(1, 2), tokens, reduction="none").mean(1)
    assert torch.allclose(nll, expected.double(), atol=1e-5)


def test_gate_clamp_zero_equals_the_gate_switched_off_and_restores_the_model(random_model, tiny_config):
    model = random_model(tiny_config())
    tokens, labels = _images(8)
    _, scores = score_probes(model, tokens, labels, {"g0": Probe(context=lambda: gate_clamped(model, 0.0))})
    off, _ = score_probes(with_gate(model, "off"), tokens, labels, {})
    assert torch.allclose(scores["g0"]["nll"], off, atol=1e-6)
    assert model.config.engram.gate == "learned" and all(m.gate == "learned" for m in model.engram_layers())
    with pytest.raises(RuntimeError), gate_clamped(model, 0.5):
        assert all(m.gate == 0.5 for m in model.engram_layers())
        raise RuntimeError("boom")
    assert all(m.gate == "learned" for m in model.engram_layers())  # restored after an error too


def test_donors_are_the_nearest_farthest_and_random_exemplars():
    tokens, labels = _images(30, seed=3)
    distances = hamming_distances(tokens, tokens)
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(30, dtype=torch.bool)
    for kind in ("nearest", "farthest", "random_same", "random_other"):
        donors, distance = choose_donors(tokens, labels, kind, torch.Generator().manual_seed(0))
        assert not (donors == torch.arange(30)).any()
        assert torch.equal(distance, distances[torch.arange(30), donors])
        assert torch.equal(labels[donors] == labels, torch.full((30,), kind != "random_other"))
        if kind == "nearest":
            assert torch.equal(distance, distances.masked_fill(~same | eye, 99).min(1).values)
        if kind == "farthest":
            assert torch.equal(distance, distances.masked_fill(~same | eye, -1).max(1).values)
    # a separate pool (e.g. training images) may contain the image itself: then it is its own nearest donor
    donors, distance = choose_donors(tokens[:5], labels[:5], "nearest", torch.Generator(), tokens, labels)
    assert torch.equal(distance, torch.zeros(5, dtype=torch.int64))
    with pytest.raises(ValueError, match="class 3 has no other candidate"):
        choose_donors(tokens[:8], labels[:8].clamp_max(2).index_fill(0, torch.tensor([3]), 3), "nearest",
                      torch.Generator())


@pytest.fixture
def memory_driven_model(random_model, tiny_config, tiny_engram) -> torch.nn.Module:
    """A model whose next-token distribution is dominated by its Engram rows: gate clamped at 1, value
    projection large, memory at the first block."""
    engram = replace(tiny_engram, layers=(0,), gate=1.0, use_conv=False)
    model = random_model(tiny_config(engram))
    with torch.no_grad():
        memory = model.engram_layers()[0]
        memory.key_value_proj.weight[memory.dim:].mul_(200.0)  # W_V rows
    return model


def test_collapse_moves_the_distribution_more_than_a_near_donor(memory_driven_model):
    model = memory_driven_model
    # Each class: one prototype, its images differ from it in one random cell (near neighbours exist).
    generator = torch.Generator().manual_seed(1)
    prototypes = torch.randint(0, 64, (4, GRID), generator=generator)
    labels = torch.arange(40) % 4
    tokens = prototypes[labels].clone()
    cells = torch.randint(0, GRID, (40,), generator=generator)
    tokens[torch.arange(40), cells] = torch.randint(0, 64, (40,), generator=generator)
    config = ProbeConfig(gates=(0.0, 1.0), bootstrap_samples=500, permutations=2000)
    result = run_probes(model, tokens, labels, config)
    near, collapse = result["donors"]["nearest"]["kl"], result["interventions"]["collapse"]["kl"]
    assert result["donors"]["nearest"]["hamming"] <= 2.0
    assert collapse["low"] > 2 * near["high"]  # on a 4x4 grid one changed cell still feeds up to 4 of 16 positions
    ratio = result["interventions"]["collapse"]["ratio_to_donors"]["nearest"]
    assert ratio["low"] > 2 and ratio["low"] <= ratio["mean"] <= ratio["high"]
    test = next(t for t in result["permutation_tests"] if (t["a"], t["b"]) == ("collapse", "nearest"))
    assert test["p_value"] < 0.01 and test["mean_difference"] > 0
    # gate 1 is how the model was trained: its sweep entry is the model itself
    sweep = {entry["gate"]: entry for entry in result["gate_sweep"]}
    assert sweep[1.0]["nll_bits"]["mean"] == pytest.approx(result["nll_bits"]["mean"], abs=1e-9)
    assert sweep[1.0]["kl"]["mean"] == 0.0
    assert sweep[0.0]["kl"]["mean"] > 0.1
    assert "learned" not in sweep  # the gate was constant in training
    json.dumps(result, allow_nan=False)  # JSON-ready


def test_run_probes_on_a_learned_gate_model_and_on_a_baseline(random_model, tiny_config):
    tokens, labels = _images(16)
    model = random_model(tiny_config())
    config = ProbeConfig(donors=("self", "random_same"), interventions=("randomize",), bootstrap_samples=200,
                         permutations=200)
    result = run_probes(model, tokens, labels, config)
    assert [e["gate"] for e in result["gate_sweep"]] == [0.0, 0.05, 0.1, 0.25, 0.5, 1.0, "learned"]
    assert result["gate_sweep"][-1]["nll_bits"] == result["nll_bits"]
    assert result["donors"]["self"]["kl"] == {"mean": 0.0, "low": 0.0, "high": 0.0}
    assert result["interventions"]["randomize"]["kl"]["mean"] > 0
    assert result["interventions"]["randomize"]["ratio_to_donors"]["self"]["mean"] is None  # x / 0
    json.dumps(result, allow_nan=False)
    assert [(t["a"], t["b"]) for t in result["permutation_tests"]] == [
        ("self", "random_same"), ("randomize", "self"), ("randomize", "random_same")]
    # the same seed reproduces every number; the model's tables are untouched
    before = [t.clone() for t in collapsed_tables(model).values()]
    assert run_probes(model, tokens, labels, config) == result
    assert all(torch.equal(a, b) for a, b in zip(before, collapsed_tables(model).values(), strict=True))

    baseline = random_model(tiny_config(engram=None))
    plain = run_probes(baseline, tokens, labels, config)
    assert plain["gate_sweep"] == [] and plain["donors"] == {} and plain["interventions"] == {}
    assert plain["nll_bits"]["low"] <= plain["nll_bits"]["mean"] <= plain["nll_bits"]["high"]
    # per-image NLLs average to the reported mean; the images hash pairs them with other runs'
    assert len(plain["nll_bits_per_image"]) == len(labels)
    assert np.mean(plain["nll_bits_per_image"]) == pytest.approx(plain["nll_bits"]["mean"], rel=1e-12)
    assert plain["settings"]["images_sha256"] == result["settings"]["images_sha256"]
    assert run_probes(baseline, tokens, labels.flip(0), config)["settings"]["images_sha256"] != \
        result["settings"]["images_sha256"]
    with pytest.raises(ValueError, match="unknown kinds"):
        ProbeConfig(donors=("closest",))


def test_donor_labels_matter_only_for_class_hashed_memory(random_model, tiny_config, tiny_engram):
    tokens, labels = _images(4)
    others = (labels + 1) % 4
    for hash_label in (False, True):
        model = random_model(tiny_config(replace(tiny_engram, hash_label=hash_label)))
        with torch.no_grad():
            reference = model(tokens[:, :-1], labels)
            swapped = model(tokens[:, :-1], labels, engram_tokens=tokens[:, :-1], engram_labels=others)
        assert torch.equal(swapped, reference) != hash_label


def test_bootstrap_intervals_cover_and_shrink():
    rng = np.random.default_rng(0)
    small = bootstrap_mean(rng.normal(1.0, 1.0, 50), np.random.default_rng(1))
    large = bootstrap_mean(rng.normal(1.0, 1.0, 5000), np.random.default_rng(1))
    for interval in (small, large):
        assert interval["low"] < interval["mean"] < interval["high"]
        assert interval["low"] < 1.0 < interval["high"] or abs(interval["mean"] - 1.0) < 0.3
    assert (large["high"] - large["low"]) < 0.25 * (small["high"] - small["low"])
    ratio = bootstrap_ratio([2.0, 4.0, 6.0], [1.0, 2.0, 3.0], np.random.default_rng(0))
    assert ratio == {"mean": 2.0, "low": 2.0, "high": 2.0}
    with pytest.raises(ValueError, match="no values"):
        bootstrap_mean([], rng)


def test_permutation_test_separates_shifted_from_equal_means():
    rng = np.random.default_rng(0)
    a = rng.normal(0.0, 1.0, 200)
    shifted = paired_permutation_test(a + 0.5, a + rng.normal(0, 0.5, 200), np.random.default_rng(1), 2000)
    null = paired_permutation_test(a, a + rng.normal(0, 0.5, 200), np.random.default_rng(1), 2000)
    tie = paired_permutation_test(a, a, np.random.default_rng(1), 500)
    assert shifted["p_value"] < 0.01 and shifted["mean_difference"] > 0.3
    assert null["p_value"] > 0.05
    assert tie["p_value"] == 1.0 and tie["mean_difference"] == 0.0
    assert shifted["p_value"] >= 1 / 2001  # never exactly 0
