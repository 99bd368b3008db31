"""A run resumed from a checkpoint saved mid-epoch sees the batches an uninterrupted run sees.

`TokenShardsDataModule` records the epoch and the batches done in its `state_dict` (Lightning saves it in
every checkpoint) and its training order is planned on sample positions, so the resumed loader skips exactly
the batches already trained on, and rotates its DataLoader workers so that the next batch comes first.
CPU only; the shards are `val100` (Digits val extracted with a random vq-tiny: 297 samples, 2 views).
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from engram_vision.config import ModelConfig
from train.data.tokens import TokenShardsDataModule
from train.lit_ar import LitAR

pytestmark = pytest.mark.usefixtures("one_thread")

# No dropout: Lightning does not checkpoint torch's RNG, so only a deterministic model has equal losses.
CONFIG = ModelConfig(dim=32, n_layer=1, n_head=2, multiple_of=32, vocab_size=64, num_classes=10, block_size=16,
                     class_dropout_prob=0.0, token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0)


class Record(Callback):
    """global step -> (tokens, labels, loss) of each training batch."""

    def __init__(self) -> None:
        self.batches: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step  # after the optimizer step: 1 for the first batch
        self.batches[step] = (batch[0].clone(), batch[1].clone())
        self.losses[step] = float(outputs["loss"] if isinstance(outputs, dict) else outputs)


def _data(val100: Path, workers: int, resampled: bool) -> TokenShardsDataModule:
    # 297 samples / 16 = 19 batches per epoch
    return TokenShardsDataModule(str(val100), batch_size=16, num_workers=workers, shuffle_buffer=40,
                                 resampled=resampled, seed=3)


def _fit(data, steps: int, callbacks: list, resume_from: str | None = None) -> None:
    torch.manual_seed(0)
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=callbacks,
                        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks))
    trainer.fit(LitAR(CONFIG, lr=3e-3), datamodule=data, ckpt_path=resume_from, weights_only=True)


@pytest.mark.parametrize(("workers", "resampled"), [(2, True), (0, False)], ids=["2workers-resampled", "passes"])
def test_resumed_run_sees_the_uninterrupted_batches(val100: Path, tmp_path: Path, workers: int,
                                                    resampled: bool) -> None:
    full = Record()
    saves = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=7, save_top_k=-1, filename="{step}")
    _fit(_data(val100, workers, resampled), 25, [full, saves])
    assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == ["step=14.ckpt", "step=21.ckpt", "step=7.ckpt"]
    # step 7: batch 7 of epoch 0 (odd, so the workers must be rotated); step 21: batch 2 of epoch 1
    for start in (7, 21):
        resumed = Record()
        _fit(_data(val100, workers, resampled), 25, [resumed], resume_from=str(tmp_path / f"step={start}.ckpt"))
        assert sorted(resumed.batches) == list(range(start + 1, 26))
        for step in resumed.batches:
            assert torch.equal(resumed.batches[step][0], full.batches[step][0]), f"step {step}"
            assert torch.equal(resumed.batches[step][1], full.batches[step][1]), f"step {step}"
            assert resumed.losses[step] == pytest.approx(full.losses[step], rel=1e-5, abs=1e-6)
    # the resumed epoch really was resumed: its first batch is not the epoch's first batch
    assert not torch.equal(full.batches[8][0], full.batches[1][0])


@pytest.mark.parametrize("workers", [0, 3])
def test_skipping_batches_replays_the_plan_without_reading(val100: Path, workers: int, monkeypatch) -> None:
    data = TokenShardsDataModule(str(val100), batch_size=8, num_workers=workers, shuffle_buffer=30,
                                 batches_per_epoch=11)
    loader = data.train_dataloader()
    loader.epoch = 4
    whole = list(loader)
    assert len(whole) == 11
    for done in (1, 5, 10):
        loader.epoch, loader.resume = 4, (4, done)
        rest = list(loader)
        assert len(rest) == 11 - done
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(rest, whole[done:], strict=True))
    # a checkpoint of another epoch (or an epoch-end one) skips nothing
    loader.epoch, loader.resume = 4, (3, 5)
    assert len(list(loader)) == 11
