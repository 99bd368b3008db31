"""EngramTable's in-place gradient (engram_vision/table.py): the same gradients and optimizer steps as
nn.Embedding's dense backward, in a buffer reused across steps, and nn.Embedding's path where it must be."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engram_vision.config import EngramConfig, model_config
from engram_vision.model import EngramGPT
from engram_vision.param_groups import adamw
from engram_vision.table import EngramTable


def _pair(rows: int = 50, dim: int = 8) -> tuple[EngramTable, nn.Embedding]:
    torch.manual_seed(0)
    table = EngramTable(rows, dim)
    reference = nn.Embedding(rows, dim)
    reference.load_state_dict(table.state_dict())
    return table, reference


def _loss(module: nn.Module, ids: torch.Tensor, seed: int) -> torch.Tensor:
    weights = torch.randn(*ids.shape, module.embedding_dim, generator=torch.Generator().manual_seed(seed))
    return (module(ids) * weights).sum()


def test_gradient_equals_nn_embedding_with_duplicates_and_accumulation():
    table, reference = _pair()
    ids = torch.tensor([[3, 3, 7], [49, 0, 3]])  # row 3 read three times
    for micro_batch in range(2):  # gradient accumulation: the second backward adds to the first
        for module in (table, reference):
            _loss(module, (ids + micro_batch) % 50, seed=micro_batch).backward()
    assert table.weight.grad.layout == torch.strided and not table.weight.grad.is_sparse
    torch.testing.assert_close(table.weight.grad, reference.weight.grad)
    assert table.weight.grad[10:40].abs().sum() == 0 and table.weight.grad[3].abs().sum() > 0


def test_buffer_is_reused_and_cleared_even_when_zero_grad_runs_between_forward_and_backward():
    table, reference = _pair()
    optimizers = [torch.optim.AdamW(m.parameters(), lr=0.1, fused=True) for m in (table, reference)]
    pointers = []
    for step in range(3):
        ids = torch.randint(50, (4, 5), generator=torch.Generator().manual_seed(step))
        for module, optimizer in zip((table, reference), optimizers, strict=True):
            loss = _loss(module, ids, seed=step)
            optimizer.zero_grad(set_to_none=True)  # Lightning's order: forward, zero_grad, backward
            loss.backward()
        torch.testing.assert_close(table.weight.grad, reference.weight.grad)  # nothing left from the last step
        pointers.append(table.weight.grad.data_ptr())
        for optimizer in optimizers:
            optimizer.step()
        torch.testing.assert_close(table.weight, reference.weight)
    assert len(set(pointers)) == 1  # one buffer for every step: no table-sized allocation per step


def test_engram_model_adamw_steps_match_dense_embedding_tables():
    config = model_config("gpt-small", block_size=16, grid=None, engram=EngramConfig(
        layers=(1,), heads_per_order=2, head_dim=8, rows_per_head=61))
    torch.manual_seed(0)
    model = EngramGPT(config)
    dense = copy.deepcopy(model)
    for memory in dense.engram_layers():  # the same weights behind nn.Embedding's dense backward
        plain = nn.Embedding(memory.table.num_embeddings, memory.table.embedding_dim)
        plain.weight = memory.table.weight
        memory.table = plain
    assert type(model.engram_layers()[0].table) is EngramTable
    optimizers = [adamw(m, 1e-2, (0.9, 0.95), 0.05) for m in (model, dense)]
    generator = torch.Generator().manual_seed(1)
    for step in range(2):
        tokens = torch.randint(config.vocab_size, (3, 16), generator=generator)
        labels = torch.randint(config.num_classes, (3,), generator=generator)
        for m, optimizer in zip((model, dense), optimizers, strict=True):
            torch.manual_seed(step)  # the same class dropout in both
            logits = m(tokens[:, :-1], labels)
            F.cross_entropy(logits.flatten(0, 1), tokens.flatten()).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    for (name, ours), theirs in zip(model.state_dict().items(), dense.state_dict().values(), strict=True):
        torch.testing.assert_close(ours, theirs, msg=name)
    table = model.engram_layers()[0].table.weight
    assert not torch.equal(table, EngramGPT(dataclasses.replace(config)).engram_layers()[0].table.weight)


@pytest.mark.parametrize("case", ["no_grad", "frozen", "padding_idx"])
def test_nn_embedding_behaviour_where_the_in_place_path_does_not_apply(case):
    table, reference = _pair()
    ids = torch.tensor([[1, 2, 2]])
    if case == "no_grad":
        with torch.no_grad():
            assert torch.equal(table(ids), reference(ids))
        assert table.weight.grad is None  # nothing attached by a lookup that records no graph
        return
    if case == "frozen":
        table.weight.requires_grad_(False)
        assert not table.grad_in_place() and table(ids).grad_fn is None and table.weight.grad is None
        return
    table.padding_idx = reference.padding_idx = 2  # the padding row gets no gradient, as in nn.Embedding
    _loss(table, ids, 0).backward()
    _loss(reference, ids, 0).backward()
    torch.testing.assert_close(table.weight.grad, reference.weight.grad)
    assert table.weight.grad[2].abs().sum() == 0 and table.weight.grad[1].abs().sum() > 0
