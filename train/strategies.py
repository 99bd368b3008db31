"""Distributed strategies with the project's defaults, usable by class path from YAML.

`BlockFSDPStrategy` is Lightning's FSDPStrategy with the auto-wrap policy set to `engram_vision.model.Block`
(each Transformer block, its Engram table included, becomes one FSDP unit, so large tables are sharded),
which a YAML file cannot express directly (it needs a set of classes). On top of Lightning it:

- runs on the CPU accelerator (gloo): Lightning hands FSDP the device index, which a CPU device lacks, and
  FSDP then looks for an accelerator and fails; here a CPU run passes the device itself;
- builds the optimizer with the parameters' real shapes: FSDP (use_orig_params) leaves each parameter a
  flat 1D slice of its shard, so `engram_vision.param_groups` (weight decay on ndim >= 2) would put every
  matrix into the no-decay group; while `configure_optimizers` runs, each parameter is shown as a
  zero-stride tensor of its original shape (no memory), then given back its shard;
- reads a full checkpoint (one file) with `weights_only` as the Trainer was asked (`python -m train` asks
  for True), where Lightning's FSDP loader unpickles it whatever was asked;
- refuses Engram tables kept in host memory (`EngramConfig.table_device='host'`) at setup, before any
  step: on a GPU FSDP moves every parameter of a unit to the unit's device, so the table would leave the
  host (and its host-side lookup then fails); on the CPU the host lookup's backward returns a sparse
  gradient, which cannot flow into FSDP's flat parameter ("reshape is not implemented for sparse
  tensors" in the first backward). With table_device='device' FSDP shards the tables like any weight.

`unsharded_model` gives callbacks the whole model under any strategy (ExportModel uses it). What goes into
a checkpoint (full: one file from rank 0; sharded: a folder written by every rank through
torch.distributed.checkpoint) stays Lightning's; `train.checkpoints.AtomicCheckpointIO` only covers the
full file, which FSDP writes through the CheckpointIO. docs/multinode.md describes the whole setup.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.fabric.strategies.fsdp import (
    _get_full_state_dict_context,
    _has_fsdp_modules,
    _is_full_checkpoint,
    _setup_activation_checkpointing,
)
from lightning.fabric.strategies.model_parallel import _load_raw_module_state
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor
from torch.nn import Module
from torch.optim import Optimizer

from engram_vision.host_table import HostTable
from engram_vision.model import Block


class BlockFSDPStrategy(FSDPStrategy):
    """FSDP over Transformer blocks.

    Args:
        sharding_strategy: FULL_SHARD (ZeRO-3), SHARD_GRAD_OP (ZeRO-2), HYBRID_SHARD or NO_SHARD.
        state_dict_type: `full` (one file, readable anywhere) or `sharded` (a folder of per-rank files, faster
            for huge models; resume it with the same strategy).
        activation_checkpointing: recompute each block's activations in the backward pass.
        kwargs: the rest of Lightning's FSDPStrategy (e.g. process_group_backend, cpu_offload, timeout).
    """

    def __init__(self, sharding_strategy: Literal["FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD", "NO_SHARD"] = "FULL_SHARD",
                 state_dict_type: Literal["full", "sharded"] = "full", activation_checkpointing: bool = False,
                 **kwargs: Any):
        super().__init__(auto_wrap_policy={Block}, sharding_strategy=sharding_strategy,
                         state_dict_type=state_dict_type,
                         activation_checkpointing_policy={Block} if activation_checkpointing else None, **kwargs)
        self._shapes: dict[int, torch.Size] = {}

    def _setup_model(self, model: Module) -> Module:
        check_host_tables(model, self.root_device)
        # Wrapping keeps the parameter objects (use_orig_params) but flattens them: note their shapes first.
        self._shapes = {id(param): param.shape for param in model.parameters()}
        if self.root_device.type != "cpu" or _has_fsdp_modules(model):
            return super()._setup_model(model)
        from torch.distributed.fsdp import FullyShardedDataParallel

        # Lightning passes `root_device.index` (None on the CPU), and FSDP without a device looks for an
        # accelerator; the CPU device itself makes FSDP run on the host (collectives over gloo).
        model = FullyShardedDataParallel(module=model, cpu_offload=self.cpu_offload,
                                         mixed_precision=self.mixed_precision_config,
                                         sharding_strategy=self.sharding_strategy, device_id=self.root_device,
                                         **self.kwargs)
        _setup_activation_checkpointing(model, self._activation_checkpointing_kwargs)
        return model

    def setup_optimizers(self, trainer: L.Trainer) -> None:
        with original_shapes(self.lightning_module, self._shapes):
            super().setup_optimizers(trainer)

    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        if self.root_device.type != "cpu" or self._state_dict_type != "full":
            return super().optimizer_state(optimizer)
        from torch.distributed.fsdp import (
            FullOptimStateDictConfig,
            FullStateDictConfig,
            OptimStateKeyType,
            StateDictType,
        )
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        # FSDP gathers every state of a unit (exp_avg, exp_avg_sq, ...) into one reused buffer and then
        # offloads it to the CPU, a copy from a GPU but no copy on the CPU: with Lightning's offload_to_cpu
        # every saved state would be the last one gathered (a resume then restarts Adam from wrong moments).
        # Without the offload FSDP clones each state.
        optimizer = getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer's torch optimizer
        with FSDP.state_dict_type(self.model, StateDictType.FULL_STATE_DICT,
                                  FullStateDictConfig(offload_to_cpu=False, rank0_only=True),
                                  FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=True)):
            state = FSDP.optim_state_dict(self.model, optimizer)
            if self.global_rank == 0:  # the file holds the standard layout (parameter ids), as Lightning's
                state = FSDP.rekey_optim_state_dict(state, OptimStateKeyType.PARAM_ID, self.model)
            return state

    def load_checkpoint(self, checkpoint_path: str | Path, weights_only: bool | None = None) -> dict[str, Any]:
        path = Path(self.broadcast(checkpoint_path))
        if not _is_full_checkpoint(path):
            return super().load_checkpoint(path, weights_only=weights_only)  # a sharded folder
        return self._load_full_checkpoint(path, weights_only)

    def _load_full_checkpoint(self, path: Path, weights_only: bool | None) -> dict[str, Any]:
        """Lightning's full-checkpoint branch, reading the file with torch.load(weights_only=...) instead of
        its own unpickler (which runs whatever the file holds)."""
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp import OptimStateKeyType

        module = self.lightning_module
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=weights_only)
        _load_raw_module_state(checkpoint.pop("state_dict"), module=self.model, world_size=self.world_size,
                               strict=module.strict_loading)
        optimizer_states = checkpoint.get("optimizer_states")
        if optimizer_states is None or module.trainer.state.fn != TrainerFn.FITTING:
            return checkpoint
        if len(self.optimizers) != len(optimizer_states):
            raise RuntimeError(f"{path} holds {len(optimizer_states)} optimizer states but this run configures "
                               f"{len(self.optimizers)} optimizers: resume with the config the checkpoint was "
                               f"trained with")
        # Every rank loads the whole optimizer state and keeps its shard.
        with _get_full_state_dict_context(self.model, world_size=self.world_size, rank0_only=False):
            for optimizer, state in zip(self.optimizers, optimizer_states, strict=True):
                if state["state"] and isinstance(next(iter(state["state"])), int):
                    state = FSDP.rekey_optim_state_dict(state, OptimStateKeyType.PARAM_NAME, self.model)
                optimizer.load_state_dict(FSDP.optim_state_dict_to_load(optim_state_dict=state, model=self.model,
                                                                        optim=optimizer))
        return checkpoint


@contextmanager
def original_shapes(module: Module, shapes: dict[int, torch.Size]) -> Iterator[None]:
    """Within the context, each parameter of `module` whose shape `shapes` recorded (by id) and which now
    has another shape holds a zero-stride tensor of the recorded shape (one element of memory, same dtype
    and device), so code that groups parameters by shape sees the model as it was built; afterwards each
    gets its data back. Only for reading shapes: nothing may write the parameters meanwhile."""
    saved = []
    for param in module.parameters():
        shape = shapes.get(id(param))
        if shape is not None and param.shape != shape:
            saved.append((param, param.data))
            param.data = torch.empty_strided(shape, (0,) * len(shape), dtype=param.dtype, device=param.device)
    try:
        yield
    finally:
        for param, data in saved:
            param.data = data


def check_host_tables(model: Module, device: torch.device) -> None:
    """Raise before wrapping when the model holds host-resident Engram tables (see the module doc)."""
    tables = [name for name, sub in model.named_modules() if isinstance(sub, HostTable)]
    if not tables:
        return
    why = ("FSDP moves every parameter of a block, its table included, to the block's device"
           if device.type != "cpu" else "their sparse host gradient cannot flow into FSDP's flat parameters")
    raise ValueError(f"BlockFSDPStrategy cannot train Engram tables kept in host memory ({tables[0]}"
                     f"{' and others' if len(tables) > 1 else ''}, on {device}): {why}. Set "
                     f"model.gpt.engram.table_device: device (FSDP then shards the tables over the ranks), "
                     f"or train with the ddp strategy (configs/ar/strategy/ddp.yaml)")


def unsharded_model(trainer: L.Trainer, model: Module) -> Module | None:
    """`model` (a submodule of the LightningModule, e.g. its `model`) with all its weights in one process.

    Under an FSDP strategy the weights are spread over the ranks: every rank must call this (it gathers
    them), and global rank 0 gets a new `type(model)(model.config)` on the CPU holding the full weights,
    the other ranks None. Under any other strategy `model` itself comes back on every rank.
    """
    strategy = trainer.strategy
    if not isinstance(strategy, FSDPStrategy):
        return model
    with _get_full_state_dict_context(strategy.model, world_size=strategy.world_size):
        state = strategy.model.state_dict()  # the LightningModule's keys; empty on ranks other than 0
    if not trainer.is_global_zero:
        return None
    prefix = next(f"{name}." for name, sub in trainer.lightning_module.named_children() if sub is model)
    with torch.random.fork_rng(devices=[]):  # building draws initial weights: keep training's random stream
        copy = type(model)(model.config)
    weights: dict[str, Tensor] = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    copy.load_state_dict(weights)
    return copy.train(model.training)


__all__ = ["BlockFSDPStrategy", "check_host_tables", "original_shapes", "unsharded_model"]
