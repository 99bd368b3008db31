"""Generation with the KV cache: LlamaGen greedy vectors, equality with a no-cache reference under CFG,
seeds, and cfg_scale 1 = the conditional pass alone."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from engram_vision.config import ModelConfig
from engram_vision.model import EngramGPT
from sample.generate import generate
from sample.sampling import SamplingConfig, cfg_mix, cfg_scale_at


def _llamagen_tiny(reference_dir):
    expected = torch.load(reference_dir / "gpt_tiny_expected.pt", weights_only=True)
    c = expected["config"]
    model = EngramGPT(ModelConfig(dim=c["dim"], n_layer=c["n_layer"], n_head=c["n_head"],
                                  vocab_size=c["vocab_size"], num_classes=c["num_classes"], block_size=16,
                                  multiple_of=32)).eval()
    model.load_state_dict(torch.load(reference_dir / "gpt_tiny.pt", weights_only=True)["model"])
    return model, expected


@pytest.mark.parametrize(("cfg_scale", "key"), [(1.0, "greedy_cfg1"), (2.0, "greedy_cfg2")])
def test_llamagen_greedy_tokens(reference_dir, cfg_scale, key):
    model, expected = _llamagen_tiny(reference_dir)
    tokens = generate(model, expected["generate_labels"], SamplingConfig(greedy=True, cfg_scale=cfg_scale),
                      torch.Generator().manual_seed(0))
    assert torch.equal(tokens, expected[key])


def _reference_generate(model, labels, sampling, rng):
    """No cache: recompute the full forward for every token (what the cache must reproduce)."""
    from sample.sampling import sample_next

    n = model.config.block_size
    tokens = torch.zeros(labels.shape[0], 0, dtype=torch.long)
    null = torch.full_like(labels, model.config.num_classes)
    for step in range(n):
        logits = model(tokens, labels)[:, -1]
        if sampling.uses_cfg:
            logits = cfg_mix(logits, model(tokens, null)[:, -1], cfg_scale_at(step, n, sampling))
        tokens = torch.cat([tokens, sample_next(logits, sampling, rng)[:, None]], dim=1)
    return tokens


@pytest.mark.parametrize("schedule", ["constant", "linear", "power-cosine"])
def test_cached_generation_equals_full_recompute_with_engram_and_cfg(random_model, tiny_config, tiny_engram, schedule):
    model = random_model(tiny_config(dataclasses.replace(tiny_engram, hash_label=True)))
    labels = torch.tensor([0, 3, 9])
    sampling = SamplingConfig(temperature=1.0, top_k=20, cfg_scale=2.5, cfg_schedule=schedule, cfg_power=2.0)
    with torch.no_grad():
        cached = generate(model, labels, sampling, torch.Generator().manual_seed(7))
        reference = _reference_generate(model, labels, sampling, torch.Generator().manual_seed(7))
    assert torch.equal(cached, reference)


def test_seeds_reproduce_and_differ(random_model, tiny_config):
    model = random_model(tiny_config())
    labels = torch.arange(8) % 10
    sampling = SamplingConfig(cfg_scale=1.5)
    first = generate(model, labels, sampling, torch.Generator().manual_seed(1))
    assert torch.equal(first, generate(model, labels, sampling, torch.Generator().manual_seed(1)))
    assert not torch.equal(first, generate(model, labels, sampling, torch.Generator().manual_seed(2)))
    assert first.shape == (8, 16) and int(first.max()) < 64


def test_cfg_scale_one_is_the_conditional_pass_alone(random_model, tiny_config, monkeypatch):
    model = random_model(tiny_config())
    batch_sizes = []
    original = EngramGPT.forward

    def spy(self, tokens, labels, state=None, engram_tokens=None):
        batch_sizes.append(labels.shape[0])
        return original(self, tokens, labels, state, engram_tokens)

    monkeypatch.setattr(EngramGPT, "forward", spy)
    labels = torch.tensor([2, 5])
    greedy = generate(model, labels, SamplingConfig(greedy=True, cfg_scale=1.0), torch.Generator())
    assert set(batch_sizes) == {2}  # no unconditional half was run
    monkeypatch.setattr(EngramGPT, "forward", original)
    assert torch.equal(greedy, _reference_generate(model, labels, SamplingConfig(greedy=True), torch.Generator()))


def test_cfg_needs_a_null_label(random_model, tiny_config):
    model = random_model(tiny_config(class_dropout_prob=0.0))
    with pytest.raises(ValueError, match="null label"):
        generate(model, torch.tensor([1]), SamplingConfig(cfg_scale=2.0), torch.Generator())


def test_compiled_decode_gives_the_eager_tokens_and_reads_nothing_back(random_model, tiny_config):
    """torch.compile (fullgraph: no graph break, so no host read) on the static cache: same tokens for the
    same seed, with Engram, its conv tail and CFG; a second batch reuses the compiled code."""
    model = random_model(tiny_config())
    labels = torch.tensor([1, 2, 3])
    sampling = SamplingConfig(cfg_scale=2.0, top_k=20)
    eager = generate(model, labels, sampling, torch.Generator().manual_seed(0))
    compiled = generate(model, labels, sampling, torch.Generator().manual_seed(0), compile=True)
    assert torch.equal(compiled, eager)
    again = generate(model, labels, sampling, torch.Generator().manual_seed(1), compile=True)
    assert torch.equal(again, generate(model, labels, sampling, torch.Generator().manual_seed(1)))
    assert not torch.equal(again, eager)
