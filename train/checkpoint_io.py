"""Lightning checkpoints written like every other file here: a temporary file beside the target, then a rename.

Lightning's `TorchCheckpointIO` stages a checkpoint in the system temp folder (an fsspec transaction) and
moves it into place; when that folder is on another file system (a local /tmp, checkpoints on shared
storage) the move is a copy into the final name, so a kill or a full disk mid-copy leaves a truncated
`last.ckpt`. `AtomicCheckpointIO` streams `torch.save` into `.<name>.<random>.tmp` beside the target
(`tokenizers_vq.checkpoint.atomic_write`), fsyncs it and renames it: the previous checkpoint stays intact
until the new one is complete, and a failed write names the file. `train/cli.py` installs it on every
Trainer whose strategy uses the plain TorchCheckpointIO; what goes into a checkpoint is Lightning's business.
`checkpoint_mismatch` explains a resume from a checkpoint of another architecture (LitAR, LitVQ).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from tokenizers_vq.checkpoint import atomic_write, remove_stale_temps, state_dict_mismatch


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
