"""TokenThroughput + LitAR.flops_per_batch: the FLOPs a step is charged, and the MFU Lightning logs from
them (tokens/s, FLOP/s and MFU agree with each other); compile with host tables is refused."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers.logger import Logger
from torch.utils.data import DataLoader, TensorDataset

from engram_vision.budget import flops_per_token
from engram_vision.config import EngramConfig, ModelConfig
from train.lit_ar import LitAR
from train.throughput import TokenThroughput

CONFIG = ModelConfig(dim=32, n_layer=2, n_head=2, multiple_of=32, vocab_size=16, num_classes=4, block_size=16,
                     engram=EngramConfig(layers=(1,), heads_per_order=2, head_dim=8, rows_per_head=31))


class MemoryLogger(Logger):
    """Keeps every logged metrics dict (Lightning's throughput monitor logs straight to loggers)."""

    def __init__(self):
        super().__init__()
        self.records: list[dict[str, float]] = []

    name, version = "memory", "0"

    def log_metrics(self, metrics, step=None) -> None:
        self.records.append(dict(metrics))

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass


def test_mfu_is_flops_per_second_over_the_peak_and_flops_follow_the_model():
    generator = torch.Generator().manual_seed(0)
    tokens, labels = torch.randint(0, 16, (48, 16), generator=generator), torch.randint(0, 4, (48,))
    data = DataLoader(TensorDataset(tokens, labels), batch_size=6)
    module, logger = LitAR(CONFIG), MemoryLogger()
    peak = 1e9
    trainer = L.Trainer(accelerator="cpu", max_steps=8, logger=logger, log_every_n_steps=1,
                        callbacks=[TokenThroughput(window_size=3, peak_flops=peak)], enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, data)
    assert module.flops_per_batch == pytest.approx(3 * flops_per_token(CONFIG) * 6 * 16)
    rates = [record for record in logger.records if "train/device/mfu" in record]
    assert len(rates) >= 4  # from the third step on
    for record in rates:
        flops_per_s = record["train/device/flops_per_sec"]
        assert record["train/device/mfu"] == pytest.approx(flops_per_s / peak)
        batches_per_s = record["train/device/batches_per_sec"]
        # The window holds the charges of the last batches: FLOP/s = FLOPs per batch x batches/s.
        assert flops_per_s == pytest.approx(module.flops_per_batch * batches_per_s, rel=1e-6)
        assert record["train/device/items_per_sec"] == pytest.approx(16 * record["train/device/samples_per_sec"])


def test_bad_settings_and_compiled_host_tables_are_refused():
    with pytest.raises(ValueError, match="window_size >= 2 and peak_flops > 0"):
        TokenThroughput(window_size=1)
    host = ModelConfig(**{**CONFIG.to_dict(), "engram": EngramConfig(layers=(1,), heads_per_order=2, head_dim=8,
                                                                     rows_per_head=31, table_device="host")})
    with pytest.raises(ValueError, match="compile=True cannot trace host tables"):
        LitAR(host, compile=True)
