"""LitAR: fast_dev_run with and without Engram, exact resume, EMA export, gate logs, LR schedule."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from engram_vision.checkpoint import load_gpt
from engram_vision.config import EngramConfig, ModelConfig
from sample.sampling import SamplingConfig
from train.callbacks import ExportModel
from train.lit_ar import LitAR, warmup_cosine

BASE = ModelConfig(dim=32, n_layer=2, n_head=2, multiple_of=32, vocab_size=16, num_classes=4, block_size=16)
ENGRAM = EngramConfig(layers=(1,), heads_per_order=2, head_dim=8, rows_per_head=31)


class Tokens(L.LightningDataModule):
    """Random structured tokens (each row repeats its label, so there is something to learn)."""

    vocab_size, num_classes, grid = 16, 4, (4, 4)

    def __init__(self, n: int = 64):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.labels = torch.randint(0, 4, (n,), generator=generator)
        noise = torch.randint(0, 16, (n, 16), generator=generator)
        self.tokens = torch.where(torch.rand(n, 16, generator=generator) < 0.7, self.labels[:, None] * 4, noise)

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.tokens, self.labels), batch_size=8, shuffle=True)

    def val_dataloader(self):
        return DataLoader(TensorDataset(self.tokens, self.labels), batch_size=16)


def _trainer(**kw) -> L.Trainer:
    # No default checkpointing: it would write into the working directory.
    has_ckpt = any(isinstance(c, ModelCheckpoint) for c in kw.get("callbacks", []))
    defaults = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                    enable_checkpointing=has_ckpt)
    return L.Trainer(**(defaults | kw))


@pytest.mark.parametrize("engram", [None, ENGRAM], ids=["baseline", "engram"])
def test_fast_dev_run_learns_and_logs(engram):
    module = LitAR(ModelConfig(**{**BASE.to_dict(), "engram": engram}), lr=3e-3)
    trainer = _trainer(max_steps=40, limit_val_batches=1, check_val_every_n_epoch=5)
    trainer.fit(module, Tokens())
    metrics = trainer.callback_metrics
    # tokens are 70% label-determined: well below the uniform log2(16) = 4 bits after 40 steps
    assert float(metrics["val/bits_per_token"]) < 3.5
    if engram is not None:
        assert 0 < float(metrics["gate/layer1_mean"]) < 1 and float(metrics["gate/layer1_std"]) >= 0
    else:
        assert not any(k.startswith("gate/") for k in metrics)
    _trainer(fast_dev_run=1).fit(LitAR(BASE), Tokens())  # the literal fast_dev_run path


def test_resume_from_last_ckpt_continues_steps_and_optimizer(tmp_path):
    config = ModelConfig(**{**BASE.to_dict(), "engram": ENGRAM})
    _trainer(max_steps=3, limit_val_batches=0, callbacks=[ModelCheckpoint(dirpath=tmp_path, save_last=True)]).fit(
        LitAR(config, schedule="cosine", warmup_steps=2, total_steps=10), Tokens())
    resumed = LitAR(config, schedule="cosine", warmup_steps=2, total_steps=10)
    trainer = _trainer(max_steps=6, limit_val_batches=0, callbacks=[ModelCheckpoint(dirpath=tmp_path)])
    trainer.fit(resumed, Tokens(), ckpt_path=str(tmp_path / "last.ckpt"), weights_only=True)
    assert trainer.global_step == 6
    optimizer = trainer.optimizers[0]
    assert {float(s["step"]) for s in optimizer.state_dict()["state"].values()} == {6.0}
    groups = {g["name"]: g for g in optimizer.param_groups}
    expected = 1e-4 * warmup_cosine(6, 2, 10, 0.0)
    assert groups["decay"]["lr"] == pytest.approx(expected)
    assert groups["engram_tables"]["lr"] == pytest.approx(5 * expected)  # the multiplier survives the schedule


def test_export_holds_the_ema_weights(tmp_path):
    module = LitAR(BASE, lr=1e-2)
    ema = EMAWeightAveraging(decay=0.5, use_buffers=False)
    trainer = _trainer(max_steps=5, limit_val_batches=0, callbacks=[ema, ExportModel("model")],
                       default_root_dir=tmp_path)
    trainer.fit(module, Tokens())
    exported = load_gpt(tmp_path / "model")
    averaged = ema._average_model.module.model
    for (name, ours), theirs in zip(exported.state_dict().items(), averaged.state_dict().values(), strict=True):
        assert torch.equal(ours, theirs.cpu()), name


def test_model_data_mismatch_is_named():
    with pytest.raises(ValueError, match="vocab_size=32 does not match the token data's vocab_size=16"):
        _trainer(fast_dev_run=1).fit(LitAR(ModelConfig(**{**BASE.to_dict(), "vocab_size": 32})), Tokens())


def test_warmup_cosine_values():
    assert warmup_cosine(0, 4, 100, 0.1) == pytest.approx(0.25)
    assert warmup_cosine(4, 4, 100, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(52, 4, 100, 0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert warmup_cosine(500, 4, 100, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(500, 0, None, 0.0) == 1.0


def test_export_use_best_writes_the_best_checkpoint_and_metrics_record_it(tmp_path):
    from train.callbacks import MetricsJson

    module = LitAR(BASE, lr=3e-3)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/nll", mode="min", save_top_k=1)
    trainer = _trainer(max_steps=24, check_val_every_n_epoch=1, limit_val_batches=1, default_root_dir=tmp_path,
                       callbacks=[checkpoint, MetricsJson(), ExportModel("model", use_best=True)])
    trainer.fit(module, Tokens())
    best = torch.load(checkpoint.best_model_path, map_location="cpu", weights_only=True)["state_dict"]
    exported = load_gpt(tmp_path / "model")
    for name, value in exported.state_dict().items():
        assert torch.equal(value, best[f"model.{name}"]), name
    report = __import__("json").loads((tmp_path / "metrics.json").read_text())
    assert report["best"]["monitor"] == "val/nll"
    assert report["best"]["value"] == pytest.approx(float(checkpoint.best_model_score))


def test_sample_grid_writes_one_row_per_class(tmp_path):
    from PIL import Image

    from tokenizers_vq import VQModel, vq_config
    from tokenizers_vq.checkpoint import save_vq
    from train.callbacks import SampleGrid

    save_vq(VQModel(vq_config("vq-tiny")), tmp_path / "tok")  # codebook 64 >= vocab 16, 16x16 images
    grid = SampleGrid(str(tmp_path / "tok"), every_n_steps=2, per_class=3, num_classes=4,
                      sampling=SamplingConfig(cfg_scale=1.5))
    trainer = _trainer(max_steps=2, limit_val_batches=0, default_root_dir=tmp_path, callbacks=[grid])
    trainer.fit(LitAR(BASE), Tokens())
    image = Image.open(tmp_path / "samples.png")
    # 4 rows (classes) x 3 columns of 16x16 images with 1-pixel padding
    assert image.size == (3 * 17 + 1, 4 * 17 + 1)
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["step_0000002.png"]


def test_bf16_mixed_step_on_cpu():
    module = LitAR(ModelConfig(**{**BASE.to_dict(), "engram": ENGRAM}))
    trainer = _trainer(fast_dev_run=2, precision="bf16-mixed")
    trainer.fit(module, Tokens())
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert all(p.dtype == torch.float32 for p in module.parameters())


@pytest.mark.gpu
def test_compiled_bf16_training_on_gpu():
    module = LitAR(ModelConfig(**{**BASE.to_dict(), "engram": ENGRAM}), compile=True, lr=3e-3)
    trainer = L.Trainer(accelerator="gpu", devices=1, max_steps=30, precision="bf16-mixed", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=1,
                        check_val_every_n_epoch=3)
    trainer.fit(module, Tokens())
    assert float(trainer.callback_metrics["val/bits_per_token"]) < 3.8
