"""study/compare.py on made-up runs: which test each difference uses, pairing by images, and sentences that
claim a direction only when the interval excludes zero."""

from __future__ import annotations

import numpy as np
import pytest

from study.compare import compare, paired_nll, seed_difference, sentence
from study.results import Member, Run, Source


def _member(seed: int | None, fid: float, per_image: list[float], images: str = "abc") -> Member:
    probe = Source({"nll_bits": {"mean": float(np.mean(per_image))}, "nll_bits_per_image": per_image,
                    "settings": {"images_sha256": images, "level": 0.95, "bootstrap_samples": 500,
                                 "permutations": 500, "seed": 0}}, "p.json")
    return Member(seed, None, Source({"metrics": {"fid": fid}}, "s.json"), None, probe, None)


def _run(name: str, members: list[Member]) -> Run:
    first = members[0]
    return Run(name, None, {}, None, first.train, first.sample, first.probe, None, members)


def _nll(shift: float, seed: int) -> list[float]:
    return list(np.random.default_rng(seed).normal(5.0, 0.3, 50) + shift)


def test_seed_difference_pairs_equal_seeds_and_otherwise_uses_welch() -> None:
    base = _run("base", [_member(0, 10.0, _nll(0, 0)), _member(1, 12.0, _nll(0, 1))])
    same = _run("a", [_member(0, 11.0, _nll(0, 0)), _member(1, 13.5, _nll(0, 1))])
    other = _run("b", [_member(5, 11.0, _nll(0, 0)), _member(6, 13.5, _nll(0, 1)), _member(7, 12.0, _nll(0, 2))])
    fid = lambda m: m.sample.data["metrics"]["fid"]  # noqa: E731
    paired = seed_difference(same, base, fid, 0.95)
    assert paired["test"] == "paired t over seeds" and paired["mean"] == pytest.approx(1.25)
    # differences 1.0 and 1.5: t(0.975, 1) * std / sqrt(2) = 12.706 * 0.3536 / 1.414
    assert paired["high"] - paired["mean"] == pytest.approx(12.7062 * 0.35355 / 2 ** 0.5, rel=1e-3)
    welch = seed_difference(other, base, fid, 0.95)
    assert welch["test"] == "Welch t over seeds" and welch["mean"] == pytest.approx(12.1667 - 11.0, rel=1e-3)
    single = seed_difference(_run("c", [_member(0, 9.0, _nll(0, 0))]), base, fid, 0.95)
    assert single["low"] is None and single["mean"] == pytest.approx(-2.0)


def test_paired_nll_needs_the_same_images_and_detects_a_shift() -> None:
    base = _run("base", [_member(0, 10.0, _nll(0, 0))])
    shifted = _run("a", [_member(0, 10.0, [v + 0.05 for v in _nll(0, 0)])])
    settings = {"seed": 0, "bootstrap_samples": 500, "level": 0.95, "permutations": 500}
    result = paired_nll(shifted, base, settings)
    # a constant per-image shift: the interval collapses onto it and every sign flip is less extreme
    assert result["mean"] == pytest.approx(0.05) and result["low"] == pytest.approx(0.05)
    assert result["p_value"] == pytest.approx(1 / 501) and result["num_images"] == 50
    elsewhere = _run("b", [_member(0, 10.0, _nll(0.05, 0), images="other")])
    assert paired_nll(elsewhere, base, settings) is None


def test_sentences_claim_only_what_the_interval_shows() -> None:
    crossing = {"mean": 0.01, "low": -0.02, "high": 0.04}
    assert "no difference in FID from the baseline detected" in sentence("a", "FID", "", ".2f", True, crossing, "x")
    above = {"mean": 0.5, "low": 0.2, "high": 0.8}
    assert sentence("a", "FID", "", ".2f", True, above, "x").startswith("a trails the baseline on FID by 0.50")
    assert sentence("a", "IS", "", ".2f", False, above, "x").startswith("a beats the baseline on IS by 0.50")
    # a negative gap is stated as its size, with the interval flipped into the same sense
    below = {"mean": -1.1, "low": -1.3, "high": -0.9}
    assert sentence("a", "IS", "", ".2f", False, below, "x").startswith("a trails the baseline on IS by 1.10 [0.90, 1.30]")
    assert sentence("a's 3 models", "NLL", "", ".2f", True, above, "x").startswith("a's 3 models trail the baseline")
    assert "no claim is made" in sentence("a", "FID", "", ".2f", True, {"mean": 0.5, "low": None}, "x")


def test_compare_words_single_seed_results_as_about_those_models() -> None:
    base = _run("base", [_member(0, 10.0, _nll(0, 0))])
    run = _run("a", [_member(0, 12.0, [v + 0.1 for v in _nll(0, 0)])])
    result = compare(run, base)
    assert result["seeds"] == 1 and result["differences"]["fid"]["low"] is None
    nll_sentence, fid_sentence = result["sentences"][0], result["sentences"][1]
    assert nll_sentence.startswith("a's model trails the baseline's model on held-out NLL per image by 0.1000")
    assert "not of training runs" in nll_sentence
    assert fid_sentence.startswith("a: FID differs from the baseline's by +2.00") and "no claim" in fid_sentence
