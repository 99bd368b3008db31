"""Helper of tests/train/test_fsdp.py (not a test): `BlockFSDPStrategy` on 2 CPU ranks (gloo), four fits.

`torchrun --standalone --nproc_per_node 2 tests/train/fsdp_steps.py SHARDS OUT` runs, in the same two
processes, a 6-step fit with full checkpoints (and the exported model), a resume of its step-4 checkpoint
to step 6, and the same two with sharded checkpoints. Each fit writes `OUT/<fit>.rank<r>.json`: the loss
of every step on that rank (global step -> loss), so the test can average the ranks and compare with one
process. The Trainers are built here and not by `python -m train`, because four fits in the same processes
need no relaunch; what the test checks about checkpoints and the export is the strategy's behaviour.
Model, data and hyper-parameters are shared with the test through `fsdp_setup`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from engram_vision.config import EngramConfig, ModelConfig
from train.callbacks import ExportModel
from train.checkpoints import use_atomic_checkpoints
from train.data.tokens import TokenShardsDataModule
from train.lit_ar import LitAR
from train.strategies import BlockFSDPStrategy

GLOBAL_BATCH, STEPS, RESUME_STEP = 8, 6, 4
# One batch per epoch, the same every epoch: checkpoints are saved at epoch ends, and whichever epoch
# Lightning counts a resumed step in, it reads the batch the uninterrupted run read at that step; so any
# difference in the losses comes from the restored weights and optimizer state.
BATCHES_PER_EPOCH = 1


def tiny_engram_config(table_device: str = "device") -> ModelConfig:
    """Two blocks, an Engram layer in the second, no dropout (random masks would differ between a rank's
    half batch and one process's whole batch)."""
    engram = EngramConfig(layers=(1,), heads_per_order=2, head_dim=8, rows_per_head=31, table_device=table_device)
    return ModelConfig(dim=32, n_layer=2, n_head=2, multiple_of=32, vocab_size=16, num_classes=4, block_size=16,
                       class_dropout_prob=0.0, token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0,
                       engram=engram)


def token_data(shards: str, world_size: int) -> TokenShardsDataModule:
    """One tar, no shuffling, no resampling: rank r of w reads samples r, r + w, ... (the split by sample of
    `TokenTrainStream`), so the two ranks' step-k batches together are one process's step-k batch."""
    return TokenShardsDataModule(shards, batch_size=GLOBAL_BATCH // world_size, num_workers=0, shuffle_buffer=0,
                                 resampled=False, batches_per_epoch=BATCHES_PER_EPOCH)


def module(table_device: str = "device") -> LitAR:
    L.seed_everything(0)  # the same initial weights on every rank (FSDP does not broadcast them)
    return LitAR(tiny_engram_config(table_device), lr=3e-3)


class LossLog(L.Callback):
    """Global step -> this rank's training loss."""

    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses[trainer.global_step] = float(outputs["loss"])


def fit(out: Path, name: str, state_dict_type: str, table_device: str, shards: str, resume: Path | None = None,
        export: bool = False) -> None:
    log = LossLog()
    every_other = ModelCheckpoint(dirpath=out / f"{name}_ckpt", save_top_k=-1, every_n_epochs=2)  # steps 2, 4, 6
    callbacks = [log, every_other]
    if export:
        callbacks.append(ExportModel())
    trainer = L.Trainer(accelerator="cpu", devices=2, num_nodes=1, max_steps=STEPS, logger=False,
                        strategy=BlockFSDPStrategy(state_dict_type=state_dict_type, process_group_backend="gloo"),
                        default_root_dir=out / name, callbacks=callbacks, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    use_atomic_checkpoints(trainer)
    trainer.fit(module(table_device), datamodule=token_data(shards, 2), ckpt_path=resume, weights_only=True)
    (out / f"{name}.rank{trainer.global_rank}.json").write_text(json.dumps(log.losses))


def main(shards: str, out: str, table_device: str = "device") -> None:
    """The four fits (`table_device`: host tables are refused by the strategy at setup)."""
    torch.set_num_threads(1)
    root = Path(out)
    for kind in ("full", "sharded"):
        fit(root, kind, kind, table_device, shards, export=kind == "full")
        step = root / f"{kind}_ckpt" / f"epoch={RESUME_STEP // BATCHES_PER_EPOCH - 1}-step={RESUME_STEP}.ckpt"
        fit(root, f"{kind}_resumed", kind, table_device, shards, resume=step)


if __name__ == "__main__":
    main(*sys.argv[1:])
