"""A non-finite loss stops LitAR and LitVQ with an error naming the step and batch, and nothing is saved from
the broken state: the checkpoints on disk are the earlier, finite ones, loaded with
weights_only=True; no model is exported; a checkpoint of non-finite weights is refused even when the loss
was finite. Tiny models on CPU, a few steps each.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from engram_vision.config import ModelConfig
from tokenizers_vq import VQConfig
from tokenizers_vq.losses import VQLossConfig
from train.callbacks import ExportModel
from train.checkpoints import NonFiniteLossError
from train.data.images import DigitsDataModule
from train.lit_ar import LitAR
from train.lit_vq import LitVQ

TINY_AR = ModelConfig(dim=32, n_layer=2, n_head=2, multiple_of=32, vocab_size=16, num_classes=4, block_size=16)
TINY_VQ = VQConfig(codebook_size=32, base_channels=8, encoder_ch_mult=(1, 2), decoder_ch_mult=(1, 2), z_channels=8,
                   num_res_blocks=1, norm_groups=4)


class Tokens(L.LightningDataModule):
    vocab_size, num_classes, grid = 16, 4, (4, 4)

    def train_dataloader(self):
        generator = torch.Generator().manual_seed(0)
        tokens, labels = torch.randint(0, 16, (64, 16), generator=generator), torch.randint(0, 4, (64,), generator=generator)
        return DataLoader(TensorDataset(tokens, labels), batch_size=8)


def _trainer(root: Path, max_steps: int, *callbacks: L.Callback) -> L.Trainer:
    return L.Trainer(accelerator="cpu", max_steps=max_steps, limit_val_batches=0, logger=False,
                     enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
                     callbacks=[ModelCheckpoint(dirpath=root / "ckpt", save_last=True, every_n_train_steps=1),
                                ExportModel(), *callbacks])


def _assert_only_finite_checkpoints_of_step(folder: Path, step: int) -> None:
    files = sorted(p.name for p in folder.iterdir())
    assert files == [f"epoch=0-step={step}.ckpt", "last.ckpt"], files  # and no temporary file
    for path in folder.iterdir():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        assert saved["global_step"] == step
        tensors = [*saved["state_dict"].values(),
                   *(v for opt in saved["optimizer_states"] for s in opt["state"].values() for v in s.values())]
        assert all(torch.isfinite(t).all() for t in tensors if t.is_floating_point())


@pytest.mark.parametrize("max_steps", [8, 4], ids=["mid-run", "last-step"])
def test_litar_stops_at_the_nan_step_and_keeps_the_finite_checkpoints(tmp_path, monkeypatch, max_steps):
    nll = LitAR._nll

    def poisoned(self, tokens, labels):
        loss = nll(self, tokens, labels)
        return loss * float("nan") if self.training and self.global_step == 3 else loss

    monkeypatch.setattr(LitAR, "_nll", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"global step 3, batch 3, epoch 0: loss = nan") as error:
        _trainer(tmp_path, max_steps).fit(LitAR(TINY_AR, lr=1e-3), Tokens())
    assert "--ckpt_path last" in str(error.value)
    _assert_only_finite_checkpoints_of_step(tmp_path / "ckpt", 3)
    assert not (tmp_path / "model").exists()  # ExportModel never ran


def test_checkpoint_of_non_finite_weights_is_refused(tmp_path):
    class PoisonWeights(L.Callback):  # a finite loss, then weights broken another way (inf gradients, say)
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 3:
                with torch.no_grad():
                    pl_module.model.norm.weight.fill_(float("inf"))

    with pytest.raises(NonFiniteLossError, match=r"global step 3: model\.norm\.weight holds NaN or inf"):
        _trainer(tmp_path, 8, PoisonWeights()).fit(LitAR(TINY_AR, lr=1e-3), Tokens())
    _assert_only_finite_checkpoints_of_step(tmp_path / "ckpt", 2)


def test_litvq_names_the_non_finite_generator_loss(tmp_path, monkeypatch):
    module = LitVQ(TINY_VQ, VQLossConfig(perceptual_weight=0.0, disc_weight=0.0), lr=1e-3)
    generator_loss = module.loss.generator_loss

    def poisoned(*args, **kwargs):
        loss, logs = generator_loss(*args, **kwargs)
        return (loss * float("inf") if int(module.iterations) == 2 else loss), logs

    monkeypatch.setattr(module.loss, "generator_loss", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"global step 2, batch 2, epoch 0, iteration 2: generator_loss = inf"):
        _trainer(tmp_path, 6).fit(module, DigitsDataModule(batch_size=8))
    _assert_only_finite_checkpoints_of_step(tmp_path / "ckpt", 2)
