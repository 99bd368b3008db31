"""`EngramTable`: the nn.Embedding an Engram layer reads, with its gradient accumulated in place.

nn.Embedding's backward allocates a dense gradient the size of the whole table on every step, zeroes it
and scatters the read rows into it. Engram tables are about as large as the backbone, and in host memory
(CPU training, or `host_table.HostTable` beside a GPU) that allocation is what costs: the C allocator
hands blocks this large back to the OS when they are freed, so every step page-faults a table-sized
block in again (on the GPT-B study preset most of Engram's CPU training overhead, BENCHMARKS.md). Here
the lookup's backward returns the read rows as a sparse gradient, and autograd adds it in place into
`weight.grad`: a dense buffer the table keeps across steps and attaches, zeroed, whenever the optimizer
has cleared the gradient (in the backward, so Lightning's zero_grad between forward and backward does
not undo it). The optimizer sees the same dense gradient as with nn.Embedding: AdamW, weight decay,
clipping and gradient accumulation are unchanged.

The sum is deterministic and the same bits as nn.Embedding's: torch adds an uncoalesced sparse gradient into
a dense one as `index_add_` does, read after read in index order, the order in which nn.Embedding's backward
sums a row's duplicate reads (equal bits at one and two threads: tests/reliability/test_determinism.py). Keep
it that way: `index_put_(..., accumulate=True)` would be the same sum, but its CPU kernel adds with unordered
atomics on more than one thread, and two runs then differ in the last bits of every row read twice or more.

Only for host-memory weights that are plain parameters, outside torch.compile: on a GPU the caching
allocator already reuses the block, and sharded (FSDP views) or compiled models keep nn.Embedding's
dense path. The buffer is one table-sized tensor that stays allocated between steps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class EngramTable(nn.Embedding):
    """nn.Embedding (same parameter, same state dict) whose host-memory gradient is written in place."""

    _grad_buffer: Tensor | None = None

    def grad_in_place(self) -> bool:
        """Whether a lookup now should return its gradient through `sparse_grad` (see the module doc)."""
        weight = self.weight
        return (torch.is_grad_enabled() and weight.requires_grad and type(weight) is nn.Parameter
                and weight.device.type == "cpu" and not torch.compiler.is_compiling())

    def sparse_grad(self, flat_ids: Tensor, grad_rows: Tensor) -> Tensor:
        """The gradient of rows weight[flat_ids] as a sparse tensor (duplicates summed when it is added),
        after making sure `weight.grad` is a dense tensor for autograd to add it into."""
        weight = self.weight
        if weight.grad is None:
            buffer = self._grad_buffer
            if buffer is None or buffer.shape != weight.shape or buffer.dtype != weight.dtype:
                buffer = torch.zeros(weight.shape, dtype=weight.dtype)
            else:
                buffer.zero_()  # memory already resident: a plain memset, no page faults
            self._grad_buffer = buffer
            weight.grad = buffer
        return torch.sparse_coo_tensor(flat_ids[None], grad_rows.to(weight.dtype), weight.shape,
                                       check_invariants=False)

    def forward(self, ids: Tensor) -> Tensor:
        if self.sparse or self.max_norm is not None or not self.grad_in_place():
            return super().forward(ids)
        return _RowsWithSparseGrad.apply(self.weight, ids, self)


class _RowsWithSparseGrad(torch.autograd.Function):
    """rows = weight[ids] (nn.Embedding's forward); backward: `EngramTable.sparse_grad` of the rows."""

    @staticmethod
    def forward(ctx, weight: Tensor, ids: Tensor, table: EngramTable) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(ids)
        ctx.table = table
        return F.embedding(ids, weight, table.padding_idx)

    @staticmethod
    def backward(ctx, grad_rows: Tensor) -> tuple[Tensor | None, None, None]:  # type: ignore[override]
        if not ctx.needs_input_grad[0]:
            return None, None, None
        (ids,) = ctx.saved_tensors
        table = ctx.table
        flat = ids.reshape(-1)
        grad_rows = grad_rows.reshape(-1, grad_rows.shape[-1])
        if table.padding_idx is not None:  # nn.Embedding never updates the padding row
            grad_rows = grad_rows.masked_fill((flat == table.padding_idx)[:, None], 0)
        return table.sparse_grad(flat, grad_rows), None, None
