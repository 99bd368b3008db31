"""`LitVQ`: Lightning training of the VQ tokenizer (generator + PatchGAN discriminator, two optimizers).

The model (`tokenizers_vq.VQModel`) and the objective (`tokenizers_vq.losses.VQLoss`) are plain torch; this
module only schedules them: manual optimisation with one optimizer for the tokenizer and one for the
discriminator, gradient clipping, and validation metrics (PSNR, codebook usage and perplexity).
EMA is Lightning's `EMAWeightAveraging` callback (with `use_buffers: false`, so the code ring buffer and
the step counter are never averaged); the reconstruction grid and metrics.json are `train/callbacks.py`.
A non-finite generator or discriminator loss stops training with an error naming the step and batch before
any checkpoint is written from the broken weights (`train.checkpoints`). At setup, before any step,
`check_image_data` compares the images the data module yields with what the tokenizer and discriminator
need (side divisible by the downsample factor, large enough for the PatchGAN), naming the YAML keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict

import lightning as L
import torch
from torch import Tensor

from tokenizers_vq.config import VQConfig
from tokenizers_vq.discriminator import PatchGANDiscriminator
from tokenizers_vq.losses import VQLoss, VQLossConfig
from tokenizers_vq.model import VQModel
from tokenizers_vq.quantizer import codebook_stats
from train.checkpoints import GuardedCheckpoints, LossGuard


def psnr(reconstructions: Tensor, images: Tensor) -> Tensor:
    """Per-image PSNR in dB of images in [-1,1] (reconstructions clamped first, as saved PNGs would be)."""
    mse = ((reconstructions.clamp(-1, 1) - images) / 2).float().pow(2).flatten(1).mean(dim=1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


def check_image_data(tokenizer: VQConfig, disc_layers: int | None, data: object) -> None:
    """Raise a ValueError when the images of data module `data` cannot train this tokenizer and loss.

    `data.image_size` (the side S its loaders yield; an ImageFolder or shard module with `image_size: null`
    reads it from its first image) must be divisible by the tokenizer's downsample factor, else the
    reconstruction has another size than the input; with a discriminator, S must reach the PatchGAN's
    minimum, which it would otherwise only report at `disc_start`. Data without `image_size` is not checked.

    disc_layers: `n_layers` of the PatchGAN discriminator; None when there is none (disc_weight 0).
    """
    size = getattr(data, "image_size", None)
    if size is None:
        return
    source = f"{type(data).__name__}.image_size"
    factor = tokenizer.downsample_factor
    if size % factor:
        raise ValueError(f"the data's images are {size}x{size} ({source}; YAML data.init_args.image_size) but "
                         f"the tokenizer downsamples by {factor} (2 ** (len(model.tokenizer.encoder_ch_mult) - 1) "
                         f"with encoder_ch_mult={list(tokenizer.encoder_ch_mult)}): set data.init_args.image_size "
                         f"to a multiple of {factor} (with data.init_args.resize: true), or change "
                         f"model.tokenizer.encoder_ch_mult and decoder_ch_mult")
    if disc_layers is not None:
        needed = PatchGANDiscriminator.min_image_size(disc_layers)
        if size < needed:
            raise ValueError(f"the data's images are {size}x{size} ({source}) but the discriminator with "
                             f"model.loss.discriminator.n_layers={disc_layers} needs at least {needed}x{needed}: "
                             f"lower model.loss.discriminator.n_layers, or set model.loss.disc_weight: 0")


class LitVQ(GuardedCheckpoints, L.LightningModule):
    """Trains `VQModel(tokenizer)` with `VQLoss(loss)`.

    Args:
        tokenizer: architecture and quantiser of the tokenizer.
        loss: reconstruction / perceptual / adversarial objective.
        lr: Adam learning rate of the tokenizer.
        betas: Adam betas (LlamaGen: 0.9, 0.95).
        weight_decay: weight decay of both optimizers (LlamaGen: 0).
        disc_lr: learning rate of the discriminator (None: same as lr).
        grad_clip: max global gradient norm per optimizer (0 disables clipping).
    """

    config_name = "tokenizer"  # the hyper-parameter holding the model configuration

    def __init__(self, tokenizer: VQConfig = VQConfig(), loss: VQLossConfig = VQLossConfig(), lr: float = 1e-4,
                 betas: tuple[float, float] = (0.9, 0.95), weight_decay: float = 0.0,
                 disc_lr: float | None = None, grad_clip: float = 1.0):
        super().__init__()
        # Checkpoints are read back with weights_only=True, so hyper-parameters are stored as plain dicts;
        # load_from_checkpoint hands those dicts back here.
        tokenizer = VQConfig(**tokenizer) if isinstance(tokenizer, Mapping) else tokenizer
        loss = VQLossConfig(**loss) if isinstance(loss, Mapping) else loss
        if lr <= 0 or (disc_lr is not None and disc_lr <= 0):
            raise ValueError(f"LitVQ: lr and disc_lr must be > 0, got lr={lr}, disc_lr={disc_lr}")
        self.save_hyperparameters({"tokenizer": tokenizer.to_dict(), "loss": asdict(loss), "lr": lr,
                                   "betas": tuple(betas), "weight_decay": weight_decay, "disc_lr": disc_lr,
                                   "grad_clip": grad_clip})
        self.automatic_optimization = False  # two optimizers, stepped in turn
        self.model = VQModel(tokenizer)
        self.loss = VQLoss(loss)
        # Training iterations (batches), saved with the weights so disc_start survives a resume; Lightning's
        # global_step counts optimizer steps, i.e. two per batch once the discriminator trains.
        self.register_buffer("iterations", torch.zeros((), dtype=torch.long))
        self._val_code_counts: Tensor | None = None
        self._loss_guard = LossGuard()

    def setup(self, stage: str) -> None:
        # Lightning calls setup before any step (and after the data module's own setup) on every stage.
        data = getattr(self.trainer, "datamodule", None)
        if data is not None:
            disc = self.loss.discriminator
            check_image_data(self.model.config, disc.config.n_layers if disc is not None else None, data)

    @property
    def has_discriminator(self) -> bool:
        return self.loss.discriminator is not None

    def configure_optimizers(self):
        hp = self.hparams
        gen = torch.optim.Adam(self.model.parameters(), lr=hp.lr, betas=hp.betas, weight_decay=hp.weight_decay)
        if not self.has_discriminator:
            return gen
        disc = torch.optim.Adam(self.loss.discriminator.parameters(), lr=hp.disc_lr or hp.lr, betas=hp.betas,
                                weight_decay=hp.weight_decay)
        return [gen, disc]

    def _step(self, optimizer, loss: Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        if self.hparams.grad_clip > 0:
            self.clip_gradients(optimizer, gradient_clip_val=self.hparams.grad_clip, gradient_clip_algorithm="norm")
        optimizer.step()

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor | None:
        images, _ = batch
        if images.shape[0] == 0:  # every image of the batch was corrupt and skipped by the data module
            return None
        self._loss_guard.check()  # the previous step's losses, read where int(iterations) waits anyway
        step = int(self.iterations)
        where = {"global step": self.global_step, "batch": batch_idx, "epoch": self.current_epoch,
                 "iteration": step}
        optimizers = self.optimizers()
        gen_opt = optimizers[0] if isinstance(optimizers, list) else optimizers
        out = self.model(images)
        gen_loss, logs = self.loss.generator_loss(images, out.reconstructions, out.quantized.codebook_loss, step,
                                                  self.model.decoder.last_layer)
        self._loss_guard.record(where, generator_loss=gen_loss)
        self._step(gen_opt, gen_loss)
        self.model.quantize.record_usage(out.quantized.codes)
        if self.has_discriminator and self.loss.discriminator_active(step):
            disc_loss, disc_logs = self.loss.discriminator_loss(images, out.reconstructions, step)
            self._loss_guard.record(where, generator_loss=gen_loss, discriminator_loss=disc_loss)
            self._step(optimizers[1], disc_loss)
            logs |= disc_logs
        self.iterations += 1
        self.log_dict({f"train/{k}": v for k, v in logs.items()}, prog_bar=False)
        self.log("train/loss", gen_loss.detach(), prog_bar=True)
        self.log("train/codebook_usage_recent", self.model.quantize.recent_usage())
        return gen_loss.detach()

    def on_validation_epoch_start(self) -> None:
        self._val_code_counts = torch.zeros(self.model.codebook_size, device=self.device)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        images, _ = batch
        if images.shape[0] == 0:
            return
        quantized = self.model.quantize(self.model.pre_quant(images), with_losses=False)
        reconstructions = self.model.decode_latents(quantized.quant)
        self._val_code_counts += torch.bincount(quantized.codes.reshape(-1),
                                                minlength=self.model.codebook_size).to(self._val_code_counts)
        self.log("val/psnr", psnr(reconstructions, images).mean(), prog_bar=True, sync_dist=True)
        self.log("val/rec_loss", (reconstructions - images).float().pow(2).mean(), sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        counts = self.trainer.strategy.reduce(self._val_code_counts, reduce_op="sum")
        usage, perplexity = codebook_stats(counts.cpu())
        self.log("val/codebook_usage", usage, prog_bar=True)
        self.log("val/codebook_perplexity", perplexity)
