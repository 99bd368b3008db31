"""Optimizer parameter groups for EngramGPT: weight decay on matrices and embeddings, none on norms, and
the Engram tables apart (lr x table_lr_multiplier, their own weight decay; absent when frozen).

Follows LlamaGen (decay on params with ndim >= 2) and DeepSeek's Engram (tables in their own Adam group).
The optimizer itself is built by the training stage (train/lit_ar.py).
"""

from __future__ import annotations

from typing import Any

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
