"""`HostTable`: an Engram table that stays in host memory (pinned) while the model runs on a GPU.

Engram rows depend only on token ids, so a step's rows can be fetched before the layer that reads them:
the model hashes all layers at the start of its forward and calls `fetch` (the ids go to the host on a
side stream), then the blocks before the Engram layer are queued; when the layer runs, the host gathers
the rows from the table into pinned memory and copies them to the GPU on the side stream while the GPU
is still busy with the earlier blocks (docs/design.md, "Scale"). The table itself never occupies GPU memory.

Training works too: the backward adds the rows' gradient into the table's host gradient (dense, like
nn.Embedding's, and kept across steps: `table.EngramTable`), so the optimizer updates the table on the host. Model code: `engram.py` (which
table a layer uses), `model.py` (when fetches start). Not compilable: the lookup synchronises with the
host by design.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from engram_vision.table import EngramTable


@dataclass
class RowFetch:
    """Row ids on their way to the host, for rows that go back to `device`."""

    host_ids: Tensor
    """int64 ids in host memory (pinned when they come from a GPU)."""
    ready: torch.cuda.Event | None
    """Recorded after the device-to-host copy of the ids; None when they were on the host already."""
    device: torch.device
    """Where the rows are wanted (the model's device)."""


_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    """One copy stream per GPU, shared by every host table (copies of different layers then queue in order)."""
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device=device)
    return _SIDE_STREAMS[device]


class _HostLookup(torch.autograd.Function):
    """rows = weight[ids] gathered on the host and copied to the target device; the gradient flows back
    to the host weight."""

    @staticmethod
    def forward(ctx, weight: Tensor, fetch: RowFetch, table: HostTable) -> Tensor:  # type: ignore[override]
        ctx.table = table
        if fetch.ready is not None:
            fetch.ready.synchronize()  # the ids have reached the host (queued long before: this rarely waits)
        flat = fetch.host_ids.reshape(-1)
        ctx.save_for_backward(flat)
        ctx.weight_shape, ctx.weight_dtype = weight.shape, weight.dtype
        if fetch.device.type != "cuda":
            return weight.index_select(0, flat).view(*fetch.host_ids.shape, weight.shape[1]).to(fetch.device)
        staged = torch.empty(flat.numel(), weight.shape[1], dtype=weight.dtype, pin_memory=True)
        torch.index_select(weight, 0, flat, out=staged)
        stream, current = _side_stream(fetch.device), torch.cuda.current_stream(fetch.device)
        with torch.cuda.stream(stream):
            # Pinned source + non_blocking: an async copy; torch keeps `staged` alive until it is done.
            rows = staged.to(fetch.device, non_blocking=True)
        current.wait_stream(stream)
        rows.record_stream(current)
        return rows.view(*fetch.host_ids.shape, weight.shape[1])

    @staticmethod
    def backward(ctx, grad_rows: Tensor) -> tuple[Tensor | None, None, None]:  # type: ignore[override]
        if not ctx.needs_input_grad[0]:
            return None, None, None
        (flat,) = ctx.saved_tensors
        grad_host = grad_rows.reshape(-1, ctx.weight_shape[1]).to("cpu", ctx.weight_dtype)
        # Autograd adds the rows into the table's dense host gradient, kept across steps (EngramTable).
        return ctx.table.sparse_grad(flat, grad_host), None, None


class HostTable(EngramTable):
    """nn.Embedding whose weight stays on the host when the module is moved to an accelerator.

    `module.to("cuda")` changes the weight's dtype if asked but not its device; moving to a GPU pins it.
    The parameter object is kept, so optimizers and state dicts see the same `table.weight` as an
    on-device table (checkpoints are interchangeable)."""

    def _apply(self, fn, recurse: bool = True):
        target = fn(torch.zeros(0, dtype=self.weight.dtype))  # where and in what dtype `fn` would put it
        data = self.weight.data
        if data.dtype != target.dtype:
            data = data.to(target.dtype)
        if target.device.type == "cuda" and not data.is_pinned():
            data = data.pin_memory()  # async host-to-device copies need page-locked memory
        self.weight.data = data
        if self.weight.grad is not None and self.weight.grad.dtype != data.dtype:
            self.weight.grad = self.weight.grad.to(data.dtype)
        return self

    def fetch(self, ids: Tensor) -> RowFetch:
        """Start moving `ids` (any shape, on the model's device) to the host; pass the result to forward."""
        if ids.device.type != "cuda":
            return RowFetch(ids.to("cpu", torch.long), None, ids.device)
        stream = _side_stream(ids.device)
        stream.wait_stream(torch.cuda.current_stream(ids.device))  # the ids are computed on the main stream
        with torch.cuda.stream(stream):
            host_ids = torch.empty(ids.shape, dtype=torch.long, pin_memory=True)
            host_ids.copy_(ids, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(stream)
        ids.record_stream(stream)
        return RowFetch(host_ids, ready, ids.device)

    def forward(self, ids: Tensor | RowFetch) -> Tensor:
        """Rows [*ids.shape, dim] on the ids' device, from a `fetch` started earlier (or ids directly)."""
        fetch = ids if isinstance(ids, RowFetch) else self.fetch(ids)
        return _HostLookup.apply(self.weight, fetch, self)
