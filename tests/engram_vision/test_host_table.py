"""Engram tables in host memory (`EngramConfig.table_device="host"`, engram_vision/host_table.py): the same
checkpoint gives the same logits, gradients, optimizer updates and samples as on-device tables; moving the
model leaves the table on the host; old checkpoints with separate key/value projections still load."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from engram_vision.host_table import HostTable
from engram_vision.model import EngramGPT
from engram_vision.param_groups import param_groups
from sample.generate import compiled_decoder, generate
from sample.sampling import SamplingConfig


@pytest.fixture
def device_and_host_models(random_model, tiny_config, tiny_engram) -> tuple[EngramGPT, EngramGPT]:
    """A random model with on-device tables, and the same weights in a model with host tables."""
    on_device = random_model(tiny_config(class_dropout_prob=0.1))
    host_config = tiny_config(replace(tiny_engram, table_device="host"), class_dropout_prob=0.1)
    on_host = EngramGPT(host_config).eval()
    on_host.load_state_dict(on_device.state_dict())
    assert all(isinstance(memory.table, HostTable) for memory in on_host.engram_layers())
    return on_device, on_host


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, 64, (3, 16), generator=generator)
    return tokens, torch.tensor([0, 3, 7])


def test_host_tables_give_the_same_logits_gradients_and_adamw_step(device_and_host_models):
    on_device, on_host = device_and_host_models
    tokens, labels = _batch()
    initial_table = on_host.engram_layers()[0].table.weight.detach().clone()
    losses, tables = [], []
    for model in (on_device, on_host):
        optimizer = torch.optim.AdamW(param_groups(model, 1e-2, 0.05), lr=1e-2)
        logits = model(tokens[:, :-1], labels)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1))
        loss.backward()
        losses.append(loss.detach())
        grads = {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}
        optimizer.step()
        tables.append((grads, [memory.table.weight.detach().clone() for memory in model.engram_layers()]))
    assert torch.equal(losses[0], losses[1])
    (device_grads, device_tables), (host_grads, host_tables) = tables
    assert device_grads.keys() == host_grads.keys() and any("engram.table" in name for name in host_grads)
    for name in device_grads:
        torch.testing.assert_close(host_grads[name], device_grads[name], rtol=0, atol=1e-6, msg=name)
    for before, after in zip(device_tables, host_tables, strict=True):
        torch.testing.assert_close(after, before, rtol=0, atol=1e-6)
    # The update really moved the table rows that were read, and only those.
    moved = (host_tables[0] != initial_table).any(dim=1)
    assert 0 < int(moved.sum()) < moved.numel()


def test_host_tables_decode_the_same_tokens_with_cfg_and_conv_tail(device_and_host_models):
    on_device, on_host = device_and_host_models
    labels = torch.tensor([1, 2, 3])
    sampling = SamplingConfig(cfg_scale=2.0, top_k=20)
    expected = generate(on_device, labels, sampling, torch.Generator().manual_seed(0))
    assert torch.equal(generate(on_host, labels, sampling, torch.Generator().manual_seed(0)), expected)


def test_moving_the_model_leaves_host_tables_on_the_host_and_changes_their_dtype(device_and_host_models):
    _, on_host = device_and_host_models
    table = on_host.engram_layers()[0].table.weight
    values = table.detach().clone()
    on_host.to("meta")  # a device every machine has: everything else moves, the table must not
    assert on_host.output.weight.device.type == "meta"
    assert on_host.engram_layers()[0].table.weight is table and table.device.type == "cpu"
    assert torch.equal(table.detach(), values)
    on_host.to(torch.float64)
    assert table.dtype == torch.float64 and torch.equal(table.detach(), values.double())


def test_host_tables_refuse_compiled_decoding_with_a_clear_error(device_and_host_models):
    _, on_host = device_and_host_models
    with pytest.raises(ValueError, match="table_device='host'.*compile"):
        compiled_decoder(on_host, "cpu")


def test_checkpoints_with_separate_key_and_value_projections_still_load(random_model, tiny_config):
    model = random_model(tiny_config())
    old_format = {}
    for name, tensor in model.state_dict().items():
        if name.endswith("key_value_proj.weight"):
            key, value = tensor.chunk(2)
            old_format[name.replace("key_value_proj", "key_proj")] = key
            old_format[name.replace("key_value_proj", "value_proj")] = value
        else:
            old_format[name] = tensor
    restored = EngramGPT(model.config).eval()
    restored.load_state_dict(old_format)  # strict: no key may be left over or missing
    tokens, labels = _batch()
    assert torch.equal(restored(tokens[:, :-1], labels), model(tokens[:, :-1], labels))


@pytest.mark.gpu
def test_host_tables_on_a_gpu_stay_pinned_and_match_on_device_tables(device_and_host_models):
    on_device, on_host = device_and_host_models
    on_device, on_host = on_device.cuda(), on_host.cuda()
    table = on_host.engram_layers()[0].table.weight
    assert table.device.type == "cpu" and table.is_pinned()
    tokens, labels = (tensor.cuda() for tensor in _batch())
    torch.testing.assert_close(on_host(tokens[:, :-1], labels), on_device(tokens[:, :-1], labels), rtol=0, atol=1e-5)
    sampling = SamplingConfig(cfg_scale=2.0, top_k=20)
    expected = generate(on_device, labels, sampling, torch.Generator("cuda").manual_seed(0))
    assert torch.equal(generate(on_host, labels, sampling, torch.Generator("cuda").manual_seed(0)), expected)
