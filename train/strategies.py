"""Distributed strategies with the project's defaults, usable by class path from YAML.

`BlockFSDPStrategy` is Lightning's FSDPStrategy with the auto-wrap policy set to `engram_vision.model.Block`
(each Transformer block, its Engram table included, becomes one FSDP unit, so large tables are sharded),
which a YAML file cannot express directly (it needs a set of classes).
"""

from __future__ import annotations

from typing import Literal

from lightning.pytorch.strategies import FSDPStrategy

from engram_vision.model import Block


class BlockFSDPStrategy(FSDPStrategy):
    """FSDP over Transformer blocks.

    Args:
        sharding_strategy: FULL_SHARD (ZeRO-3), SHARD_GRAD_OP (ZeRO-2), HYBRID_SHARD or NO_SHARD.
        state_dict_type: `full` (one file, readable anywhere) or `sharded` (faster for huge models).
        activation_checkpointing: recompute each block's activations in the backward pass.
    """

    def __init__(self, sharding_strategy: Literal["FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD", "NO_SHARD"] = "FULL_SHARD",
                 state_dict_type: Literal["full", "sharded"] = "full", activation_checkpointing: bool = False):
        super().__init__(auto_wrap_policy={Block}, sharding_strategy=sharding_strategy,
                         state_dict_type=state_dict_type,
                         activation_checkpointing_policy={Block} if activation_checkpointing else None)
