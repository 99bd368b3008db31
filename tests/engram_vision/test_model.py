"""EngramGPT: LlamaGen vectors and tables, cache == full forward, causality, gate/table/intervention behaviour."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from engram_vision.cache import DecodeState
from engram_vision.config import EngramConfig, ModelConfig, model_config
from engram_vision.interventions import collapse_tables, randomize_tables, with_gate
from engram_vision.model import EngramGPT
from engram_vision.param_groups import adamw, param_groups


def llamagen_tiny(reference_dir) -> tuple[EngramGPT, dict]:
    expected = torch.load(reference_dir / "gpt_tiny_expected.pt", weights_only=True)
    c = expected["config"]
    config = ModelConfig(dim=c["dim"], n_layer=c["n_layer"], n_head=c["n_head"], vocab_size=c["vocab_size"],
                         num_classes=c["num_classes"], grid=tuple(c["grid"]), block_size=c["grid"][0] * c["grid"][1],
                         multiple_of=32, norm_eps=c["norm_eps"], rope_base=c["rope_base"])
    assert config.ffn_hidden == c["ffn_hidden"]
    model = EngramGPT(config).eval()
    model.load_state_dict(torch.load(reference_dir / "gpt_tiny.pt", weights_only=True)["model"], strict=True)
    return model, expected


def test_llamagen_tiny_logits(reference_dir):
    model, expected = llamagen_tiny(reference_dir)
    with torch.no_grad():
        logits = model(expected["tokens"][:, :-1], expected["labels"])
    rel = (logits - expected["logits"]).abs().max() / expected["logits"].abs().max()
    assert logits.shape == expected["logits"].shape and float(rel) < 1e-5


@pytest.mark.parametrize(("name", "size", "count"), [
    ("GPT-B", "gpt-b", 110_888_448), ("GPT-L", "gpt-l", 342_910_976), ("GPT-XL", "gpt-xl", 774_699_520),
    ("GPT-XXL", "gpt-xxl", 1_410_972_672), ("GPT-3B", "gpt-3b", 3_096_659_200)])
def test_llamagen_key_shape_table_and_counts(reference_dir, name, size, count):
    table = json.loads((reference_dir / "llamagen_state_dict_shapes.json").read_text())[name]
    with torch.device("meta"):
        model = EngramGPT(model_config(size))
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == table
    assert sum(p.numel() for p in model.parameters()) == count


@pytest.mark.parametrize("mode", ["2d", "raster"])
def test_cache_equals_full_forward_with_engram_conv_and_cfg_batch(random_model, tiny_config, tiny_engram, mode):
    engram = tiny_engram if mode == "2d" else dataclasses.replace(
        tiny_engram, mode="raster", neighborhoods=((1, 2), (1, 4, 5)))
    config = tiny_config(dataclasses.replace(engram, hash_label=True))
    model = random_model(config)
    tokens = torch.randint(0, config.vocab_size, (3, config.block_size))
    labels = torch.tensor([1, 4, 7])
    # The CFG batch: conditional rows then the same sequences under the null label.
    tokens, labels = torch.cat([tokens, tokens]), torch.cat([labels, torch.full_like(labels, config.num_classes)])
    with torch.no_grad():
        full = model(tokens[:, :-1], labels)
        state = DecodeState.allocate(config, tokens.shape[0])
        steps = [model(tokens[:, :0], labels, state), model(tokens[:, :3], labels, state)]  # class, then a chunk
        steps += [model(tokens[:, t:t + 1], labels, state) for t in range(3, config.block_size - 1)]
    incremental = torch.cat(steps, dim=1)
    assert state.pos == config.seq_len
    assert torch.allclose(incremental, full, atol=1e-5, rtol=1e-5), (incremental - full).abs().max()


def test_later_tokens_never_change_earlier_logits(random_model, tiny_config):
    config = tiny_config()
    model = random_model(config)
    tokens = torch.randint(0, config.vocab_size, (2, config.block_size - 1))
    labels = torch.tensor([3, 5])
    with torch.no_grad():
        base = model(tokens, labels)
        for t in (0, 4, 9, 14):
            changed = tokens.clone()
            changed[:, t:] = (changed[:, t:] + 1 + torch.randint(0, 5, changed[:, t:].shape)) % config.vocab_size
            other = model(changed, labels)
            # input token t sits at position t + 1: logits at positions <= t must not move
            assert torch.equal(other[:, : t + 1], base[:, : t + 1])
            assert not torch.equal(other[:, t + 1:], base[:, t + 1:])


def test_constant_gate_zero_is_exactly_the_baseline(random_model, tiny_config):
    config = tiny_config()
    model = random_model(config)
    baseline = EngramGPT(dataclasses.replace(config, engram=None)).eval()
    baseline.load_state_dict(model.backbone_state_dict())  # strict: exactly the backbone's keys
    tokens, labels = torch.randint(0, 64, (2, 15)), torch.tensor([0, 9])
    with torch.no_grad():
        assert torch.equal(with_gate(model, 0.0)(tokens, labels), baseline(tokens, labels))
        assert torch.equal(with_gate(model, "off")(tokens, labels), baseline(tokens, labels))
        assert not torch.equal(model(tokens, labels), baseline(tokens, labels))


def test_frozen_table_gets_no_gradient_and_no_optimizer_group(random_model, tiny_config, tiny_engram):
    config = tiny_config(dataclasses.replace(tiny_engram, table="frozen"))
    model = random_model(config).train()
    model(torch.randint(0, 64, (2, 15)), torch.tensor([1, 2])).square().mean().backward()
    for memory in model.engram_layers():
        assert memory.table.weight.grad is None and memory.key_value_proj.weight.grad is not None
    groups = {g["name"]: g for g in param_groups(model, lr=1e-4, weight_decay=0.05)}
    assert "engram_tables" not in groups


def test_param_groups_hold_exactly_the_tables_at_five_times_lr(random_model, tiny_config):
    model = random_model(tiny_config())
    groups = {g["name"]: g for g in param_groups(model, lr=1e-4, weight_decay=0.05)}
    tables = {id(m.table.weight) for m in model.engram_layers()}
    assert {id(p) for p in groups["engram_tables"]["params"]} == tables
    assert groups["engram_tables"]["lr"] == pytest.approx(5e-4) and groups["engram_tables"]["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in groups["decay"]["params"]) and groups["decay"]["weight_decay"] == 0.05
    assert all(p.ndim == 1 for p in groups["no_decay"]["params"])
    counted = sum(len(g["params"]) for g in groups.values())
    assert counted == len(list(model.parameters()))  # every trainable parameter exactly once


def test_adamw_is_fused_and_steps_like_the_reference_loop(random_model, tiny_config):
    models = [random_model(tiny_config()) for _ in range(2)]  # eval: no random label drop
    fused = adamw(models[0], 1e-2, (0.9, 0.95), 0.05)
    loop = torch.optim.AdamW(param_groups(models[1], 1e-2, 0.05), lr=1e-2, betas=(0.9, 0.95), foreach=False)
    assert fused.defaults["fused"] and [g["name"] for g in fused.param_groups] == ["decay", "no_decay", "engram_tables"]
    tokens, labels = torch.randint(0, 64, (2, 15)), torch.tensor([1, 2])
    for _ in range(3):
        for model, optimizer in zip(models, (fused, loop), strict=True):
            optimizer.zero_grad()
            model(tokens, labels).square().mean().backward()
            optimizer.step()
    for (name, got), want in zip(models[0].state_dict().items(), models[1].state_dict().values(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
    assert not torch.equal(models[0].layers[0].engram.table.weight, random_model(tiny_config())
                           .layers[0].engram.table.weight)  # the tables did move


def _snapshot(model: EngramGPT) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_interventions_change_what_they_should_and_nothing_else(random_model, tiny_config):
    model = random_model(tiny_config())
    before = _snapshot(model)
    tokens, labels = torch.randint(0, 64, (2, 15)), torch.tensor([1, 2])
    with torch.no_grad():
        reference = model(tokens, labels)
        collapsed = collapse_tables(model)
        randomized = randomize_tables(model, torch.Generator().manual_seed(1))
        for clone in (collapsed, randomized):
            for key, value in clone.state_dict().items():
                same = torch.equal(value, before[key])
                assert same != key.endswith("engram.table.weight"), key  # only tables differ
            assert not torch.equal(clone(tokens, labels), reference)
        for memory in collapsed.engram_layers():
            rows = memory.table.weight
            assert torch.allclose(rows, rows[:1].expand_as(rows))
        # donor = the image itself changes nothing; another donor changes the output
        assert torch.equal(model(tokens, labels, engram_tokens=tokens), reference)
        donor = torch.randint(0, 64, tokens.shape)
        assert not torch.equal(model(tokens, labels, engram_tokens=donor), reference)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the original is untouched


def test_bad_inputs_and_configs_name_the_problem(random_model, tiny_config):
    model = random_model(tiny_config())
    with pytest.raises(ValueError, match="labels must lie in"):
        model(torch.zeros(1, 3, dtype=torch.long), torch.tensor([11]))
    with pytest.raises(ValueError, match="tokens must lie in"):
        model(torch.full((1, 3), 64), torch.tensor([0]))
    with pytest.raises(ValueError, match="beyond the model depth"):
        tiny_config(EngramConfig(layers=(5,)))
    with pytest.raises(ValueError, match="causal half-plane"):
        EngramConfig(neighborhoods=(("L", "0,1"),))
    with pytest.raises(ValueError, match="does not match block_size"):
        ModelConfig(block_size=256, grid=(8, 16))
    with pytest.raises(ValueError, match="gate constant"):
        EngramConfig(gate=1.5)


def test_code_map_from_kmeans_changes_hashing_and_survives_cache(random_model, tiny_config, tiny_engram):
    from engram_vision.code_map import fit_code_map

    config = tiny_config(dataclasses.replace(tiny_engram, code_map=8))
    model = random_model(config)
    tokens, labels = torch.randint(0, 64, (2, 15)), torch.tensor([1, 2])
    with torch.no_grad():
        identity_like = model(tokens, labels)
        model.set_code_map(fit_code_map(torch.randn(64, 8), num_ids=8, seed=0))
        mapped = model(tokens, labels)
        state = DecodeState.allocate(config, 2)
        steps = [model(tokens[:, :0], labels, state)] + [model(tokens[:, t:t + 1], labels, state) for t in range(15)]
    assert not torch.equal(mapped, identity_like)
    assert torch.allclose(torch.cat(steps, 1), mapped, atol=1e-5)
    with pytest.raises(ValueError, match="PAD"):
        model.set_code_map(torch.zeros(65, dtype=torch.long))
