"""What a training checkpoint needs beyond Lightning: atomic writes, a guard against non-finite losses, and a
readable message when a resumed checkpoint belongs to another architecture.

Atomic IO. Lightning's `TorchCheckpointIO` stages a checkpoint in the system temp folder (an fsspec
transaction) and moves it into place; when that folder is on another file system (a local /tmp,
checkpoints on shared storage) the move is a copy into the final name, so a kill or a full disk mid-copy
leaves a truncated `last.ckpt`. `AtomicCheckpointIO` streams `torch.save` into `.<name>.<random>.tmp`
beside the target (`tokenizers_vq.files.atomic_write`), fsyncs it and renames it: the previous checkpoint
stays intact until the new one is complete, and a failed write names the file. `train/cli.py` installs it
on every Trainer whose strategy uses the plain TorchCheckpointIO; what goes into a checkpoint is
Lightning's business.

Non-finite guard. A NaN or inf loss at step k poisons the weights at k's optimizer step. `LossGuard.record`
keeps each step's losses on the device and `LossGuard.check` reads them back at the start of the next
step, where LitAR and LitVQ already wait for the device once per step (the model's token/label check;
LitVQ's iteration counter), so a healthy run pays no extra host sync. The modules also call `check` before
validation, before every checkpoint (`on_save_checkpoint`, which runs before Lightning writes the file) and
at the end of training, so no checkpoint, metrics.json or exported model is written after a non-finite
loss. `check_finite_weights` refuses a checkpoint whose weights are non-finite all the same (a finite loss
with inf gradients). What to do about the error (lower lr, clipping, bf16) is the user's call; resuming is
`--ckpt_path last`.

Mismatch messages. `GuardedCheckpoints` is the part LitAR and LitVQ share: the guard's hooks, and
`checkpoint_mismatch`'s readable error when a resumed checkpoint belongs to another architecture.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from torch import Tensor

from tokenizers_vq.files import atomic_write, remove_stale_temps, state_dict_mismatch


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO whose `save_checkpoint` writes a local file atomically (remote URLs: Lightning's)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        # Only the global-zero rank saves through CheckpointIO, so no other writer of `path` is running:
        # temporary files of this name are leftovers of a killed save.
        remove_stale_temps(path)
        atomic_write(path, lambda tmp: torch.save(checkpoint, tmp), sync=True)


def use_atomic_checkpoints(trainer: L.Trainer) -> L.Trainer:
    """Give `trainer`'s strategy an AtomicCheckpointIO when it has the default TorchCheckpointIO (a plugin
    the config chose, e.g. asynchronous or remote checkpointing, is left alone); returns the trainer."""
    if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()
    return trainer


def _config_diff(saved: Any, current: Any, prefix: str) -> list[str]:
    if isinstance(saved, dict) and isinstance(current, dict):
        return [line for key in sorted({*saved, *current}, key=str)
                for line in _config_diff(saved.get(key), current.get(key), f"{prefix}.{key}")]
    return [] if saved == current else [f"{prefix}: checkpoint {_short(saved)}, this run {_short(current)}"]


def _short(value: Any, width: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def checkpoint_mismatch(module: L.LightningModule, state_dict: dict[str, torch.Tensor], saved: dict | None,
                        current: dict, name: str) -> str:
    """Why a checkpoint's state dict does not load into `module` (a `--ckpt_path` resume with another
    architecture): the fields of hyper-parameter `name` that differ from those the checkpoint was trained
    with, then the missing, unexpected and wrong-shape keys."""
    lines = [f"--ckpt_path: the checkpoint does not fit this {type(module).__name__}; resume with the config it "
             f"was trained with, or train into a new run directory"]
    if saved is not None and (diff := _config_diff(saved, current, name)):
        lines.append("  differing config: " + "; ".join(diff[:8]) + (" ..." if len(diff) > 8 else ""))
    report = state_dict_mismatch(module, state_dict, "its state dict", optional_keys=())
    lines += ["  " + line.strip() for line in (report or "").splitlines()]
    return "\n".join(lines)


RNG_KEY = "engram_vision_rng_states"
"""Checkpoint key of torch's generator states at the save (restored on resume)."""

RESUME_HINT = ("no checkpoint was written from this state; the last checkpoint is intact: resume with "
               "--ckpt_path last (e.g. with a lower lr or gradient clipping) or a checkpoint from before the step")


class NonFiniteLossError(RuntimeError):
    """A training loss (or a checkpoint's weights) was NaN or infinite."""


class LossGuard:
    """The losses of the last training step, kept on the device until `check` reads them."""

    def __init__(self) -> None:
        self._pending: tuple[dict[str, Any], dict[str, Tensor]] | None = None

    def record(self, where: Mapping[str, Any], **losses: Tensor) -> None:
        """Remember this step's `losses` (scalars) and `where` they came from (step, batch, epoch)."""
        self._pending = (dict(where), {name: loss.detach() for name, loss in losses.items()})

    def check(self) -> None:
        """Raise NonFiniteLossError if the recorded step had a non-finite loss (one host sync)."""
        if self._pending is None:
            return
        where, losses = self._pending
        values = torch.stack([loss.float().reshape(()) for loss in losses.values()])
        if bool(torch.isfinite(values).all()):
            self._pending = None
            return
        # Kept pending: a checkpoint attempted while Lightning handles this error must be refused too.
        bad = ", ".join(f"{name} = {float(v)}" for name, v in zip(losses, values.tolist(), strict=True)
                        if not math.isfinite(v))
        place = ", ".join(f"{key} {value}" for key, value in where.items())
        raise NonFiniteLossError(f"non-finite loss at {place}: {bad}; training stopped, {RESUME_HINT}")


def check_finite_weights(state_dict: Mapping[str, Any], global_step: int) -> None:
    """Raise NonFiniteLossError naming the first non-finite floating tensor of a checkpoint's state dict.
    Plain tensors only: sharded (FSDP) entries are left to their own checkpointing."""
    by_device: dict[torch.device, list[tuple[str, Tensor]]] = {}
    for key, value in state_dict.items():
        if type(value) in (Tensor, torch.nn.Parameter) and value.is_floating_point() and value.numel():
            by_device.setdefault(value.device, []).append((key, torch.isfinite(value).all()))
    for flags in by_device.values():  # one host sync per device (host tables live apart from the GPU)
        finite = torch.stack([flag for _, flag in flags]).cpu()
        if not bool(finite.all()):
            name = flags[int((~finite).nonzero()[0])][0]
            raise NonFiniteLossError(f"refusing to save a checkpoint at global step {global_step}: {name} holds "
                                     f"NaN or inf values; {RESUME_HINT}")


def _undo_double_step_count(checkpoint: dict) -> None:
    """Correct the logging step of a checkpoint saved after training stopped mid-epoch (at `max_steps`).

    Lightning counts `_batches_that_stepped` (the step loggers write) one behind `global_step` while a batch
    ends, and on a resume from a batch that completed mid-epoch it adds the missing 1. A checkpoint written
    at the end of training (`on_train_end`: ModelCheckpoint's last.ckpt, PeriodicCheckpoint's final file)
    already holds the full count, so the resumed run would log every step one too high (and the next
    resume two). Runs before Lightning restores the loops (`on_load_checkpoint` is called first)."""
    try:
        loop = checkpoint["loops"]["fit_loop"]
        state, progress = loop["epoch_loop.state_dict"], loop["epoch_loop.batch_progress"]
        current = progress["current"]
    except (KeyError, TypeError):
        return
    completed_mid_epoch = current["completed"] == current["ready"] and not progress.get("is_last_batch", False)
    if completed_mid_epoch and state.get("_batches_that_stepped") == checkpoint.get("global_step", -1) > 0:
        state["_batches_that_stepped"] -= 1


class GuardedCheckpoints:
    """Mixin for a LightningModule (listed before it) that owns `_loss_guard` (a LossGuard) and keeps its
    model configuration in the hyper-parameter `config_name`: checks the loss before validation, every
    checkpoint and the end of training, and names the differing config fields when a checkpoint does not fit."""

    config_name: str

    def on_validation_start(self) -> None:
        self._loss_guard.check()  # no validation (nor metrics.json) of weights after a non-finite loss

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._saved_hparams = checkpoint.get("hyper_parameters", {})  # for a readable error if it does not fit
        _undo_double_step_count(checkpoint)
        states = checkpoint.get(RNG_KEY)
        # Applied at the first training batch, not now: between the restore and that batch a resumed run
        # draws from the generator where an uninterrupted one did not (the new DataLoader iterator's seed,
        # the sanity check's), so only that point matches the state the checkpoint was saved in.
        self._pending_rng = states if isinstance(states, dict) and isinstance(states.get("cpu"), Tensor) else None
        trainer = self._trainer  # None when a checkpoint is loaded outside a Trainer
        if trainer is not None and "global_step" in checkpoint:
            # The steps after this checkpoint are trained again: their rows of the earlier log go (train.csv_log).
            for logger in trainer.loggers:
                if hasattr(logger, "forget_after") and trainer.is_global_zero:
                    logger.forget_after(int(checkpoint["global_step"]))

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        try:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        except RuntimeError as error:  # torch lists every key; say which config fields and keys differ
            saved = getattr(self, "_saved_hparams", {}).get(self.config_name)
            raise ValueError(checkpoint_mismatch(self, state_dict, saved, self.hparams[self.config_name],
                                                 f"model.{self.config_name}")) from error  # the YAML key

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        states, self._pending_rng = getattr(self, "_pending_rng", None), None
        if states is not None:
            torch.set_rng_state(states["cpu"])
            if states.get("cuda") and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(states["cuda"])

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Runs before Lightning writes the file: a raise here leaves the previous checkpoint as it was.
        self._loss_guard.check()
        check_finite_weights(checkpoint["state_dict"], self.global_step)
        # torch's generators (dropout, class dropout), so a resumed run draws the masks an uninterrupted one
        # would; tensors only, which a weights_only load reads (data order is the data module's state).
        checkpoint[RNG_KEY] = {"cpu": torch.get_rng_state(),
                               "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}

    def on_train_end(self) -> None:
        self._loss_guard.check()  # the last step's losses, before ExportModel writes the model
