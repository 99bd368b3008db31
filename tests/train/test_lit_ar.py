"""LitAR: fast_dev_run with and without Engram, exact resume, EMA export, gate logs, LR schedule, the checks
of the model against the token data's meta.json at setup, and the sample grid (its classes and tokenizer)."""

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
from train.data.tokens import TokenShardsDataModule
from train.lit_ar import LitAR, check_token_data, warmup_cosine

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
    with pytest.raises(ValueError, match="model.gpt.vocab_size=32 does not match the token data's vocab_size=16"):
        _trainer(fast_dev_run=1).fit(LitAR(ModelConfig(**{**BASE.to_dict(), "vocab_size": 32})), Tokens())


def _shards(token_shards, constant_codes, folder, grid=(4, 4), codebook=16, num_classes=4):
    codes = constant_codes(8, grid)
    return TokenShardsDataModule(str(token_shards(folder, codes, [0, 1, 2, 3] * 2, codebook, num_classes, grid)),
                                 batch_size=4, num_workers=0)


@pytest.mark.parametrize(("change", "pieces"), [
    ({"block_size": 64}, ["model.gpt.block_size=64", "16 tokens per image", "grid 4x4", "set model.gpt.block_size: 16"]),
    ({"vocab_size": 32}, ["model.gpt.vocab_size=32", "vocab_size=16", "codebook_size in", "set model.gpt.vocab_size: 16"]),
    ({"num_classes": 10}, ["model.gpt.num_classes=10", "num_classes=4", "set model.gpt.num_classes: 4"]),
], ids=["block_size", "vocab_size", "num_classes"])  # fmt: skip
def test_setup_names_the_yaml_key_both_values_and_meta_json(token_shards, constant_codes, tmp_path, change, pieces):
    data = _shards(token_shards, constant_codes, tmp_path)
    module = LitAR(ModelConfig(**{**BASE.to_dict(), **change}))
    for run in (lambda t: t.fit(module, data), lambda t: t.validate(module, data)):  # every path, before a step
        with pytest.raises(ValueError) as info:
            run(_trainer(fast_dev_run=1))
        message = str(info.value)
        assert all(piece in message for piece in pieces), message
        assert str(tmp_path / "meta.json") in message  # where the data's value came from
    assert module.global_step == 0


def test_the_8x8_grid_of_32px_photos_asks_for_block_size_64_and_reports_every_mismatch(tmp_path):
    class Photos:  # a 10-class set of 32 px photos through a 4x-downsampling tokenizer of 512 codes
        vocab_size, num_classes, grid = 512, 10, (8, 8)
        meta = {"path": "/data/photos/tokens/meta.json"}

    with pytest.raises(ValueError) as info:
        check_token_data(BASE, Photos())
    message = str(info.value)
    assert "model.gpt.block_size=16 does not match the token data's 64 tokens per image (grid 8x8 in " \
           "/data/photos/tokens/meta.json): set model.gpt.block_size: 64" in message
    assert "model.gpt.vocab_size=16" in message and "vocab_size=512" in message
    assert "model.gpt.num_classes=4" in message and "num_classes=10" in message
    check_token_data(ModelConfig(**{**BASE.to_dict(), "block_size": 64, "vocab_size": 512, "num_classes": 10}),
                     Photos())  # the fixed config passes


def test_a_grid_of_the_right_length_but_another_shape_names_model_gpt_grid(token_shards, constant_codes, tmp_path):
    data = _shards(token_shards, constant_codes, tmp_path, grid=(2, 8))  # 16 tokens, but not 4x4
    with pytest.raises(ValueError, match=r"model.gpt.grid=None \(a 4x4 token grid\) does not match the token "
                                         r"data's grid 2x8 .*set model.gpt.grid: \[2, 8\]"):
        _trainer(fast_dev_run=1).fit(LitAR(BASE), data)
    with pytest.raises(ValueError, match=r"set model.gpt.block_size: 32 and model.gpt.grid: \[2, 16\]"):
        check_token_data(BASE, _shards(token_shards, constant_codes, tmp_path / "wide", grid=(2, 16)))
    _trainer(fast_dev_run=1).fit(LitAR(ModelConfig(**{**BASE.to_dict(), "grid": (2, 8)})), data)


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

    save_vq(VQModel(vq_config("vq-tiny", codebook_size=16)), tmp_path / "tok")  # codebook = vocab; 16x16 images
    grid = SampleGrid(str(tmp_path / "tok"), every_n_steps=2, per_class=3, num_classes=4,
                      sampling=SamplingConfig(cfg_scale=1.5))
    assert grid.grid_labels(4).tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]  # every class, a row each
    assert grid.grid_labels(2).tolist() == [0, 0, 0, 1, 1, 1]  # capped at the model's classes
    trainer = _trainer(max_steps=2, limit_val_batches=0, default_root_dir=tmp_path, callbacks=[grid])
    trainer.fit(LitAR(BASE), Tokens())
    image = Image.open(tmp_path / "samples.png")
    # 4 rows (classes) x 3 columns of 16x16 images with 1-pixel padding
    assert image.size == (3 * 17 + 1, 4 * 17 + 1)
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["step_0000002.png"]


def test_sample_grid_with_another_codebook_fails_at_setup(tmp_path):
    from tokenizers_vq import VQModel, vq_config
    from tokenizers_vq.checkpoint import save_vq
    from train.callbacks import SampleGrid

    save_vq(VQModel(vq_config("vq-tiny")), tmp_path / "tok")  # 64 codes for a model of vocab 16
    module = LitAR(BASE)
    trainer = _trainer(max_steps=2, limit_val_batches=0, default_root_dir=tmp_path,
                       callbacks=[SampleGrid(str(tmp_path / "tok"), every_n_steps=1)])
    with pytest.raises(ValueError, match=r"SampleGrid's tokenizer .*tok \(its init_args.tokenizer\) has a codebook "
                                         r"of 64 codes but the model \(model.gpt.vocab_size\) predicts "
                                         r"vocab_size=16"):
        trainer.fit(module, Tokens())
    assert module.global_step == 0 and not (tmp_path / "samples.png").exists()


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
