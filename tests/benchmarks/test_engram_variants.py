"""benchmarks/engram_variants.py on the small preset: each plain variant really takes its plain path and gives
the optimised model's logits, the check catches a variant that does different work, the conv patch does
not outlive its calls, and the script prints one JSON line with the expected keys and positive times."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

import engram_vision.engram as engram_module

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and jsonargparse look the module up by name
    spec.loader.exec_module(module)
    return module


engram_variants = _script("engram_variants")
SMALL = ["--size", "gpt-small", "--engram", "small", "--grid", "4"]


@pytest.fixture(scope="module")
def models():
    optimised = engram_variants.build_model(engram_variants.parse(SMALL))
    return {"optimised": optimised, **{name: engram_variants.plain_variant(optimised, name)
                                       for name in engram_variants.OPTIMISATIONS.values()}}


def test_plain_variants_give_the_optimised_logits(models):
    differences = engram_variants.check_variants(models)
    assert set(differences) == {"plain_gate", "plain_conv", "plain_table"}
    assert all(0 <= d <= engram_variants.TOLERANCE for d in differences.values())
    # the logits depend on the conv and the output head (both zero at init) in the built model
    assert all(float(m.conv.weight.abs().max()) > 0 for m in models["optimised"].engram_layers())
    assert float(models["optimised"].output.weight.abs().max()) > 0


def test_each_variant_runs_its_plain_path(models):
    """plain_gate calls the two RMSNorm modules, plain_conv the layer's nn.Conv1d, plain_table nn.Embedding;
    the optimised model none of these."""
    calls: dict[str, int] = {}

    def counter(name):
        return lambda *_: calls.__setitem__(name, calls.get(name, 0) + 1)

    hooks = []
    for name, model in models.items():
        for memory in model.engram_layers():
            hooks.append(memory.norm_query.register_forward_hook(counter(f"{name}.norm_query")))
            hooks.append(memory.conv.register_forward_hook(counter(f"{name}.conv")))
    try:
        tokens = torch.randint(models["optimised"].config.vocab_size, (2, 15))
        for model in models.values():
            model(tokens, torch.tensor([0, 1]))
    finally:
        for hook in hooks:
            hook.remove()
    assert calls == {"plain_gate.norm_query": 1, "plain_conv.conv": 1}
    assert type(models["plain_table"].engram_layers()[0].table) is torch.nn.Embedding
    assert type(models["optimised"].engram_layers()[0].table) is engram_variants.EngramTable
    assert engram_module.causal_depthwise.__module__ == "engram_vision.engram"  # restored after the calls


def test_the_check_refuses_a_variant_that_computes_something_else(models):
    wrong = engram_variants.plain_variant(models["optimised"], "plain_gate")
    for memory in wrong.engram_layers():  # a gate without the 1/sqrt(dim)
        memory.gate_values = engram_variants.types.MethodType(
            lambda self, h, keys: torch.sigmoid((self.norm_query(h) * self.norm_key(keys)).sum(-1, keepdim=True)),
            memory)
    with pytest.raises(AssertionError, match="plain_gate differs"):
        engram_variants.check_variants({"optimised": models["optimised"], "plain_gate": wrong})


def test_script_prints_one_json_line_with_positive_times(capsys):
    engram_variants.main(engram_variants.parse([*SMALL, "--batch", "2", "--repeats", "1", "--train_repeats", "1"]))
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert result["benchmark"] == "engram_variants" and result["tokens"] == 16 and result["decode_steps"] == 15
    assert set(result["lockstep_decode_seconds"]) == {"optimised", "plain_gate", "plain_conv"}
    assert set(result["train_step_seconds"]) == {"optimised", "plain_gate", "plain_conv", "plain_table"}
    assert all(v > 0 for key in ("lockstep_decode_seconds", "train_step_seconds") for v in result[key].values())
    assert set(result["saving_percent"]["decode"]) == {"plain_gate", "plain_conv"}
    assert set(result["saving_percent"]["train"]) == {"plain_gate", "plain_conv", "plain_table"}
    for kind in ("decode", "train"):
        for variant, ratio in result["plain_over_optimised"][kind].items():
            assert 0 < ratio["low"] <= ratio["median"] <= ratio["high"]
            saving = result["saving_percent"][kind][variant]["median"]
            assert saving == pytest.approx(100 * (1 - 1 / ratio["median"]), abs=0.02)
    assert set(result["verdict"]) == {"fused_gate", "two_path_conv", "in_place_table_grad"}
    assert set(result["verdict"].values()) <= {"keep", "plain"}
    assert max(result["max_relative_difference"].values()) <= engram_variants.TOLERANCE


def test_verdict_follows_the_three_percent_rule():
    decode = {"plain_gate": {"median": 3.5}, "plain_conv": {"median": 2.9}}
    train = {"plain_gate": {"median": 0.0}, "plain_conv": {"median": -1.0}, "plain_table": {"median": 8.0}}
    assert engram_variants.verdicts(decode, train) == {"fused_gate": "keep", "two_path_conv": "plain",
                                                       "in_place_table_grad": "keep"}
