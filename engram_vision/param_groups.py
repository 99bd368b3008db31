"""Optimizer parameter groups for EngramGPT: weight decay on matrices and embeddings, none on norms, and
the Engram tables apart (lr x table_lr_multiplier, their own weight decay; absent when frozen).

Follows LlamaGen (decay on params with ndim >= 2) and DeepSeek's Engram (tables in their own Adam group).
`adamw` builds the optimizer the training stage (train/lit_ar.py) and the benchmarks use.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

TABLE_SUFFIX = "engram.table.weight"


def param_groups(model: nn.Module, lr: float, weight_decay: float) -> list[dict[str, Any]]:
    """Groups named `decay`, `no_decay` and (when trainable tables exist) `engram_tables`."""
    engram = getattr(getattr(model, "config", None), "engram", None)
    decay, no_decay, tables = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue  # frozen tables (and anything else frozen) never reach the optimizer
        if name.endswith(TABLE_SUFFIX):
            tables.append(param)
        elif param.ndim >= 2:
            decay.append(param)
        else:
            no_decay.append(param)
    groups = [{"name": "decay", "params": decay, "lr": lr, "weight_decay": weight_decay},
              {"name": "no_decay", "params": no_decay, "lr": lr, "weight_decay": 0.0}]
    if tables:
        groups.append({"name": "engram_tables", "params": tables, "lr": lr * engram.table_lr_multiplier,
                       "weight_decay": engram.table_weight_decay})
    return groups


def _fusable(params: list[torch.Tensor]) -> bool:
    """torch's fused AdamW kernel: plain floating tensors, all on one CPU or CUDA device type (not FSDP's
    DTensors, not host tables beside GPU weights)."""
    device_types = {param.device.type for param in params}
    return (len(device_types) == 1 and device_types <= {"cpu", "cuda"}
            and all(type(param) is nn.Parameter and param.is_floating_point() for param in params))


def adamw(model: nn.Module, lr: float, betas: tuple[float, float], weight_decay: float) -> torch.optim.AdamW:
    """AdamW over `param_groups`, with torch's fused kernel where the parameters allow it: the same update
    in one pass per tensor, which matters for Engram tables as large as the backbone (about 6x faster than
    the per-tensor loop on CPU)."""
    groups = param_groups(model, lr, weight_decay)
    params = [param for group in groups for param in group["params"]]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=_fusable(params) or None)
