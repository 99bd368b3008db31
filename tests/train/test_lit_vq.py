"""LitVQ: fast_dev_run with and without the GAN, exact resume from last.ckpt, the CLI on the digits config,
the artefacts (reconstruction grid, metrics.json, exported tokenizer) that `make demo` relies on, and the
setup check of the data's image size against the tokenizer and discriminator."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint

from tokenizers_vq import VQConfig
from tokenizers_vq.checkpoint import load_tokenizer
from tokenizers_vq.discriminator import DiscriminatorConfig
from tokenizers_vq.losses import VQLossConfig
from train.cli import run_stage
from train.data.images import DigitsDataModule
from train.lit_vq import LitVQ, check_image_data, psnr

REPO = Path(__file__).resolve().parents[2]
TINY = VQConfig(codebook_size=32, base_channels=8, encoder_ch_mult=(1, 2), decoder_ch_mult=(1, 2), z_channels=8,
                num_res_blocks=1, norm_groups=4)


def _trainer(**kw) -> L.Trainer:
    defaults = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    return L.Trainer(**(defaults | kw))


def test_psnr_known_value():
    images = torch.zeros(2, 3, 4, 4)
    # error 0.2 on a [-1,1] scale is 0.1 on [0,1]: mse 0.01 -> 20 dB
    assert psnr(images + 0.2, images).tolist() == pytest.approx([20.0, 20.0], abs=1e-4)
    # clamping: a reconstruction beyond the range is scored as the saved (clamped) image
    assert psnr(torch.full((1, 3, 4, 4), 3.0), torch.ones(1, 3, 4, 4)).item() == pytest.approx(100.0)


def test_fast_dev_run_with_gan_and_ema_updates_both_networks():
    module = LitVQ(TINY, VQLossConfig(perceptual_weight=0.0, disc_weight=0.5, disc_start=0,
                                                 discriminator=DiscriminatorConfig(base_channels=8, n_layers=2)), lr=1e-3)
    before_gen = module.model.encoder.conv_in.weight.detach().clone()
    before_disc = next(module.loss.discriminator.parameters()).detach().clone()
    # max_steps (and fast_dev_run) count optimizer steps: 4 steps = 2 batches of generator + discriminator.
    trainer = _trainer(fast_dev_run=4, callbacks=[EMAWeightAveraging(decay=0.9, use_buffers=False)])
    trainer.fit(module, DigitsDataModule(batch_size=8))
    assert int(module.iterations) == 2
    assert trainer.global_step == 4  # Lightning counts both optimizers' steps
    assert not torch.equal(module.model.encoder.conv_in.weight, before_gen)
    assert not torch.equal(next(module.loss.discriminator.parameters()), before_disc)
    assert trainer.callback_metrics["train/disc"].isfinite()
    # The checkpointed hyper-parameters rebuild the same module (they are plain, weights_only-safe data).
    assert LitVQ(**module.hparams).model.config == TINY


def test_resume_from_last_ckpt_continues_step_and_optimizer(tmp_path):
    data = DigitsDataModule(batch_size=8)
    first = LitVQ(TINY, VQLossConfig(perceptual_weight=0.0, disc_weight=0.0), lr=1e-3)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    _trainer(max_steps=3, limit_val_batches=0, callbacks=[ckpt]).fit(first, data)
    saved = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == 3 and not any(".perceptual." in k for k in saved["state_dict"])

    resumed = LitVQ(TINY, VQLossConfig(perceptual_weight=0.0, disc_weight=0.0), lr=1e-3)
    trainer = _trainer(max_steps=5, limit_val_batches=0, callbacks=[ModelCheckpoint(dirpath=tmp_path)])
    trainer.fit(resumed, data, ckpt_path=str(tmp_path / "last.ckpt"), weights_only=True)
    assert trainer.global_step == 5 and int(resumed.iterations) == 5
    adam_state = trainer.optimizers[0].state_dict()["state"]
    assert float(next(iter(adam_state.values()))["step"]) == 5.0  # optimizer moments carried over


def test_cli_fit_writes_grid_metrics_and_tokenizer_then_resumes(tmp_path):
    run_dir = tmp_path / "vq"
    common = ["--config", str(REPO / "configs/vq/digits.yaml"), "--trainer.logger.init_args.save_dir",
              str(run_dir), "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "2",
              "--trainer.check_val_every_n_epoch", "1", "--model.tokenizer.base_channels", "8",
              "--model.tokenizer.norm_groups", "4", "--model.tokenizer.z_channels", "8"]
    run_stage("tokenizer", ["fit", *common, "--trainer.max_epochs", "1"])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["global_step"] == 3
    assert 0 < metrics["metrics"]["psnr"] < 100 and 0 < metrics["metrics"]["codebook_usage"] <= 1
    assert (run_dir / "reconstructions.png").stat().st_size > 0
    assert (run_dir / "config.yaml").is_file() and (run_dir / "checkpoints" / "last.ckpt").is_file()
    tokenizer = load_tokenizer(run_dir / "tokenizer")
    assert tokenizer.codebook_size == 256 and tokenizer.config.base_channels == 8

    cli = run_stage("tokenizer", ["fit", *common, "--trainer.max_epochs", "2", "--ckpt_path", "last"])
    assert cli.trainer.global_step == 6 and int(cli.model.iterations) == 6


def test_bf16_mixed_training_step_is_finite_and_keeps_fp32_weights():
    module = LitVQ(TINY, VQLossConfig(perceptual_weight=0.0, disc_weight=0.5, disc_start=0,
                                      discriminator=DiscriminatorConfig(base_channels=8, n_layers=2)), lr=1e-3)
    before = module.model.decoder.conv_out.weight.detach().clone()
    trainer = _trainer(fast_dev_run=2, precision="bf16-mixed")  # CPU autocast; the same path runs on GPUs
    trainer.fit(module, DigitsDataModule(batch_size=8))
    assert trainer.callback_metrics["train/loss"].isfinite()
    assert module.model.decoder.conv_out.weight.dtype == torch.float32  # mixed precision, not bf16 weights
    assert not torch.equal(module.model.decoder.conv_out.weight, before)


class _SizedDigits(DigitsDataModule):
    """The digits under another claimed image size (the check reads only `image_size`)."""

    def __init__(self, image_size: int) -> None:
        super().__init__(batch_size=8)
        self.image_size = image_size


def test_setup_checks_the_image_size_against_the_tokenizer_and_discriminator():
    gan = VQLossConfig(perceptual_weight=0.0, disc_weight=0.5, discriminator=DiscriminatorConfig(n_layers=3))
    module = LitVQ(TINY, gan, lr=1e-3)  # downsample factor 2; a 3-layer PatchGAN needs 24 px
    with pytest.raises(ValueError) as info:
        _trainer(fast_dev_run=1).fit(module, _SizedDigits(16))
    message = str(info.value)
    assert "images are 16x16" in message and "n_layers=3 needs at least 24x24" in message, message
    assert "model.loss.discriminator.n_layers" in message and int(module.iterations) == 0
    with pytest.raises(ValueError) as info:
        check_image_data(TINY, None, _SizedDigits(15))
    message = str(info.value)
    assert "15x15" in message and "downsamples by 2" in message and "data.init_args.image_size" in message
    assert "model.tokenizer.encoder_ch_mult" in message, message
    check_image_data(TINY, 2, DigitsDataModule())  # 16 px: divisible by 2 and >= 12 for two layers
