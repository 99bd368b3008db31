"""`TokenThroughput`: Lightning's ThroughputMonitor for (tokens, labels) batches, with model FLOPs
utilisation.

The module says how many FLOPs a batch costs (`LitAR.flops_per_batch`: 3 x the forward FLOPs of
`engram_vision.budget.flops_per_token`, i.e. forward plus a backward of twice its cost); Lightning times
the steps over a window and logs `train/device/flops_per_sec` and `train/device/mfu` against the device's
peak FLOPs for the run's precision (its table of known GPUs), as well as samples/s and tokens/s
(`train/device/items_per_sec`). `peak_flops` supplies the peak where Lightning has none (CPUs, new GPUs).
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import ThroughputMonitor
from lightning.pytorch.utilities import rank_zero_warn


def sequences_in(batch: Any) -> int:
    """Sequences in a (tokens [B,T], labels [B]) batch."""
    return int(batch[0].shape[0])


def tokens_in(batch: Any) -> int:
    """Target tokens in a (tokens [B,T], labels [B]) batch."""
    return int(batch[0].numel())


class TokenThroughput(ThroughputMonitor):
    """Logs throughput and MFU of AR training every `window_size` steps' worth of timing.

    Args:
        window_size: batches the rates are averaged over (Lightning's default, 100, logs nothing for the
            first 100 steps).
        peak_flops: the device's peak FLOP/s for the run's precision; None: Lightning's table (GPUs only;
            without an entry MFU is not logged, throughput still is).
    """

    def __init__(self, window_size: int = 20, peak_flops: float | None = None):
        if window_size < 2 or (peak_flops is not None and peak_flops <= 0):
            raise ValueError(f"TokenThroughput: need window_size >= 2 and peak_flops > 0, got {window_size}, "
                             f"{peak_flops}")
        super().__init__(batch_size_fn=sequences_in, length_fn=tokens_in, window_size=window_size)
        self.peak_flops = peak_flops

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.peak_flops is not None:
            self.available_flops = self.peak_flops
            for throughput in self._throughputs.values():
                throughput.available_flops = self.peak_flops
        elif self.available_flops is None and trainer.strategy.root_device.type != "cpu":
            rank_zero_warn(f"TokenThroughput: no peak FLOP/s known for {trainer.strategy.root_device}; MFU is "
                           f"not logged (pass peak_flops to log it)")
