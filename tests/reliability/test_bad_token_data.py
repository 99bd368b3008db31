"""Bad token data and checkpoints: token shards whose labels, grid or codebook do not fit the
model, too few token shards for the workers, and resuming a checkpoint of another architecture.

Errors must name the sample and the values (`train.data.tokens`, `LitAR.setup`, the checkpoint-mismatch
report of `train.checkpoints.GuardedCheckpoints`); images and image shards are `test_bad_inputs.py`.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from engram_vision.config import ModelConfig
from train.data.tokens import TokenShardsDataModule, read_token_set
from train.lit_ar import LitAR


def test_token_shard_label_and_grid_errors_name_sample_and_values(constant_codes, token_shards, tmp_path: Path) -> None:
    bad_label = token_shards(tmp_path / "label", constant_codes(4), [0, 1, 4, 2])
    dm = TokenShardsDataModule(str(bad_label), batch_size=2, num_workers=0, resampled=False, shuffle_buffer=0)
    with pytest.raises(ValueError, match=r"tok-000000.tar:000000002: label 4 is outside \[0, 4\)"):
        list(dm.train_dataloader())
    with pytest.raises(ValueError, match=r"label 4 is outside \[0, 4\)"):
        read_token_set(str(bad_label))
    bad_grid = token_shards(tmp_path / "grid", [*constant_codes(1), *constant_codes(1, (2, 8))], [0, 1])
    with pytest.raises(
        ValueError, match=r"000000001: expected integer codes \[V,4,4\], got int16 \(1, 2, 8\)"
    ):
        read_token_set(str(bad_grid))


def test_token_shards_that_do_not_fit_the_model_stop_litar(constant_codes, token_shards, tmp_path: Path) -> None:
    data = TokenShardsDataModule(str(token_shards(tmp_path, constant_codes(8), [0, 1, 2, 3] * 2)), batch_size=4,
                                 num_workers=0)  # fmt: skip
    base = dict(dim=32, n_layer=2, n_head=2, multiple_of=32, vocab_size=16, num_classes=4, block_size=16)
    cases = [
        ({"vocab_size": 32}, "model.gpt.vocab_size=32 does not match the token data's vocab_size=16"),
        ({"block_size": 64}, "model.gpt.block_size=64 does not match the token data's 16 tokens per image"),
        ({"num_classes": 10}, "model.gpt.num_classes=10 does not match the token data's num_classes=4"),
    ]
    for change, match in cases:
        trainer = L.Trainer(fast_dev_run=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                            enable_model_summary=False, enable_checkpointing=False)  # fmt: skip
        with pytest.raises(ValueError, match=match):
            trainer.fit(LitAR(ModelConfig(**{**base, **change})), data)
    trainer = L.Trainer(fast_dev_run=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False)  # fmt: skip
    trainer.fit(LitAR(ModelConfig(**base)), data)  # the matching model trains
    assert trainer.state.finished


def test_token_stream_with_fewer_shards_than_workers_reads_every_sample_once(constant_codes, token_shards, tmp_path: Path) -> None:
    # The documented fallback: 1 shard < 2 workers, so the workers split its samples instead of shards.
    folder = token_shards(tmp_path, constant_codes(8), [0, 1, 2, 3] * 2)
    dm = TokenShardsDataModule(str(folder), batch_size=2, num_workers=2, resampled=False, shuffle_buffer=0,
                               batches_per_epoch=4)  # fmt: skip
    tokens = torch.cat([batch[0] for batch in dm.train_dataloader()])
    assert sorted(tokens[:, 0].tolist()) == list(range(8))


def test_resume_from_a_checkpoint_of_another_architecture_names_fields_and_keys(constant_codes, token_shards, tmp_path: Path) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    from engram_vision.config import EngramConfig

    data = TokenShardsDataModule(str(token_shards(tmp_path, constant_codes(8), [0, 1, 2, 3] * 2)), batch_size=4,
                                 num_workers=0)  # fmt: skip
    base = dict(dim=32, n_layer=2, n_head=2, multiple_of=32, vocab_size=16, num_classes=4, block_size=16)

    def fit(config: ModelConfig, ckpt_path: str | None = None) -> None:
        trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                            enable_model_summary=False, limit_val_batches=0,
                            callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)])
        trainer.fit(LitAR(config), data, ckpt_path=ckpt_path, weights_only=True)

    fit(ModelConfig(**base))
    last = str(tmp_path / "ckpt" / "last.ckpt")
    with pytest.raises(ValueError, match=r"(?s)model\.gpt\.dim: checkpoint 32, this run 64.*wrong shape: model\."):
        fit(ModelConfig(**{**base, "dim": 64}), last)
    engram = EngramConfig(layers=(1,), heads_per_order=2, head_dim=8, rows_per_head=31)
    with pytest.raises(ValueError, match=r"(?s)model\.gpt\.engram: checkpoint None.*missing: model\.hash_slot_multipliers, "
                                         r".*model\.layers\.1\.engram\."):
        fit(ModelConfig(**base, engram=engram), last)
