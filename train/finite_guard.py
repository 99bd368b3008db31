"""Stop training on a non-finite loss, naming the step and batch, before anything is saved from that state.

A NaN or inf loss at step k poisons the weights at k's optimizer step. `LossGuard.record` keeps each step's
losses on the device and `LossGuard.check` reads them back at the start of the next step, where LitAR and
LitVQ already wait for the device once per step (the model's token/label check; LitVQ's iteration counter),
so a healthy run pays no extra host sync. The modules also call `check` before validation, before every
checkpoint (`on_save_checkpoint`, which runs before Lightning writes the file) and at the end of training,
so no checkpoint, metrics.json or exported model is written after a non-finite loss. `check_finite_weights`
refuses a checkpoint whose weights are non-finite all the same (a finite loss with inf gradients).
What to do about the error (lower lr, clipping, bf16) is the user's call; resuming is `--ckpt_path last`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

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
