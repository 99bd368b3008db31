"""AR-prior weights on disk: LlamaGen .pt (strict, safe, rebuilt buffers ignored) and our safetensors."""

from __future__ import annotations

import argparse

import pytest
import torch

from engram_vision.checkpoint import KIND, load_any_gpt, load_gpt, load_llamagen_gpt, save_gpt
from engram_vision.config import ModelConfig


def _old_export(directory, state_dict, config) -> None:
    """A folder as versions before the recorded hash wrote it: bare metadata, {kind, config} only."""
    import json

    from safetensors.torch import save_file

    save_file(state_dict, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps({"kind": KIND, "config": config.to_dict()}))


def test_llamagen_file_with_namespace_and_rebuilt_buffers_loads(reference_dir, tmp_path):
    state = torch.load(reference_dir / "gpt_tiny.pt", weights_only=True)["model"]
    state = dict(state, freqs_cis=torch.zeros(17, 8, 2), **{"layers.0.attention.kv_cache.k_cache": torch.zeros(1)})
    path = tmp_path / "c2i_tiny.pt"
    torch.save({"model": state, "args": argparse.Namespace(gpt_model="GPT-tiny")}, path)
    config = ModelConfig(dim=64, n_layer=2, n_head=4, vocab_size=64, num_classes=10, block_size=16, multiple_of=32)
    model = load_llamagen_gpt(path, config)
    expected = torch.load(reference_dir / "gpt_tiny_expected.pt", weights_only=True)
    with torch.no_grad():
        logits = model(expected["tokens"][:, :-1], expected["labels"])
    assert float((logits - expected["logits"]).abs().max()) < 1e-5 * float(expected["logits"].abs().max())


def test_llamagen_file_into_an_engram_config_names_the_missing_keys(tiny_config, reference_dir):
    with pytest.raises(ValueError, match="missing: hash_slot_multipliers, .*layers.0.engram"):
        load_llamagen_gpt(reference_dir / "gpt_tiny.pt", tiny_config())


def test_safetensors_round_trip_keeps_hash_constants_and_outputs(random_model, tiny_config, tmp_path):
    model = random_model(tiny_config())
    save_gpt(model, tmp_path / "gpt")
    loaded = load_any_gpt(tmp_path / "gpt")
    assert loaded.config == model.config
    tokens, labels = torch.randint(0, 64, (2, 15)), torch.tensor([1, 2])
    with torch.no_grad():
        assert torch.equal(loaded(tokens, labels), model(tokens, labels))
    for name in ("hash_slot_multipliers", "hash_label_multipliers", "hash_primes", "hash_offsets"):
        assert torch.equal(getattr(loaded, name), getattr(model, name)), name
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_gpt(tmp_path)


def test_export_with_separate_key_and_value_projections_still_loads(random_model, tiny_config, tmp_path):
    """An export written before the key/value projections were fused: the checked load lets the model's
    load hook convert it instead of refusing the old key names."""
    model = random_model(tiny_config())
    save_gpt(model, tmp_path)
    old = {}
    for name, tensor in model.state_dict().items():
        if name.endswith("key_value_proj.weight"):
            key, value = tensor.chunk(2)
            old[name.replace("key_value_proj", "key_proj")], old[name.replace("key_value_proj", "value_proj")] = (
                key.contiguous(), value.contiguous())
        else:
            old[name] = tensor.contiguous()
    _old_export(tmp_path, old, model.config)
    tokens, labels = torch.randint(0, 64, (2, 15)), torch.tensor([1, 2])
    with torch.no_grad():
        assert torch.equal(load_gpt(tmp_path)(tokens, labels), model(tokens, labels))


def test_export_with_hash_constants_per_layer_still_loads_and_hashes_with_them(random_model, tiny_config, tmp_path):
    """An export written when each Engram layer kept its own multipliers, primes and offsets: the model's
    load hook lays them out as its hash buffers, and the loaded model hashes with the file's constants
    (here drawn with another seed than the config's), not with fresh ones."""
    from dataclasses import replace

    from engram_vision.hashing import hash_constants, make_hash_params

    config = tiny_config()
    model = random_model(config)
    other = make_hash_params(replace(config.engram, hash_seed=123), config.vocab_size, config.num_classes)
    with torch.no_grad():  # the model as it would have hashed with the file's constants
        for name, value in vars(hash_constants(config.engram, [other[i] for i in sorted(other)])).items():
            getattr(model, f"hash_{name}").copy_(value)
    save_gpt(model, tmp_path)
    old = {k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith("hash_")}
    for layer, params in other.items():
        for name in ("multipliers", "primes", "offsets"):
            old[f"layers.{layer}.engram.{name}"] = getattr(params, name).contiguous()
    _old_export(tmp_path, old, config)
    loaded = load_gpt(tmp_path)
    fresh = random_model(config)  # the same weights, the config's own constants
    assert not torch.equal(fresh.hash_slot_multipliers, loaded.hash_slot_multipliers)
    tokens, labels = torch.randint(0, 64, (2, 15)), torch.tensor([1, 2])
    with torch.no_grad():
        assert torch.equal(loaded(tokens, labels), model(tokens, labels))
        assert not torch.equal(loaded(tokens, labels), fresh(tokens, labels))


@pytest.mark.parametrize("load", [lambda p: load_llamagen_gpt(p, "gpt-b"), lambda p: load_any_gpt(p)],
                         ids=["load_llamagen_gpt", "load_any_gpt"])
def test_missing_llamagen_file_says_where_to_get_it_and_which_flag_takes_it(load, tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        load(tmp_path / "c2i_B_256.pt")
    message = str(error.value)
    assert str(tmp_path / "c2i_B_256.pt") in message
    for needed in ("Hugging Face hub", "FoundationVision/LlamaGen", "c2i_B_256.pt for gpt-b", "--model",
                   "--model_size"):
        assert needed in message, needed
