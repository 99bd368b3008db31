"""Helper of tests/train/data/test_tokens.py (not a test): a 2-rank CPU DDP (gloo) fit over token shards.

`python tests/train/data/ddp_token_steps.py SHARDS OUT` trains a one-embedding model for two epochs and writes
`OUT/rank{r}.json` with the training and validation steps and samples each rank saw, so the test can check
that every rank took the same number of steps. Lightning's DDP launcher re-runs this script per rank.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.strategies import DDPStrategy

from train.data.tokens import TokenShardsDataModule


class StepCounter(LightningModule):
    """Counts steps and samples; the loss only exists so that DDP has gradients to synchronise."""

    def __init__(self, out: str, vocab_size: int) -> None:
        super().__init__()
        self.out, self.embed = Path(out), torch.nn.Embedding(vocab_size, 4)
        self.counts = {"train_steps": 0, "train_samples": 0, "val_steps": 0, "val_samples": 0}

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.counts["train_steps"] += 1
        self.counts["train_samples"] += len(batch[1])
        return self.embed(batch[0]).pow(2).mean()

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.counts["val_steps"] += 1
        self.counts["val_samples"] += len(batch[1])

    def on_train_end(self) -> None:
        (self.out / f"rank{self.global_rank}.json").write_text(json.dumps(self.counts))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def main(shards: str, out: str) -> None:
    torch.set_num_threads(1)
    data = TokenShardsDataModule(shards, shards, batch_size=8, num_workers=2, shuffle_buffer=20,
                                 val_batch_size=50)
    trainer = Trainer(accelerator="cpu", devices=2, strategy=DDPStrategy(process_group_backend="gloo"),
                      max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(StepCounter(out, data.vocab_size), datamodule=data)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
