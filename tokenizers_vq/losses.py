"""Losses for training the VQ tokenizer: reconstruction, LPIPS, codebook and PatchGAN adversarial terms.

`VQLoss` combines them the way LlamaGen/taming do, with a typed `VQLossConfig`. It owns the frozen `LPIPS`
(built only when `perceptual_weight > 0`, so weight files are needed only then) and the trainable
`PatchGANDiscriminator` (built only when `disc_weight > 0`), exposed as `VQLoss.discriminator`.

Training contract (the Lightning module in `train/lit_vq.py` implements it with manual optimization and two
optimizers, one over the VQ model, one over `VQLoss.discriminator.parameters()`):

1. `total, logs = loss.generator_loss(images, reconstructions, codebook_loss, step, last_layer)`; backward;
   step the VQ-model optimizer. The generator pass runs the discriminator with *detached* parameters, so it
   never writes into the discriminator's `.grad` (no zeroing, no `requires_grad` toggling by the caller) and
   wastes no backward work on discriminator weights. It does update BatchNorm running stats, as in taming.
2. `if loss.discriminator_active(step):` `d_loss, d_logs = loss.discriminator_loss(images, reconstructions,
   step)`; backward; step the discriminator optimizer. Before `disc_start` there is no discriminator work.

What it leaves to others: the quantizer computes `codebook_loss` (vq + commitment + entropy, already summed);
the model supplies `last_layer` (the decoder's final conv weight) for the adaptive weight; logging,
optimizers and schedules belong to the Lightning module.
"""

# Follows taming-transformers (taming/modules/losses/vqperceptual.py) and LlamaGen
# (tokenizer/tokenizer_image/vq_loss.py).

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from tokenizers_vq.discriminator import DiscriminatorConfig, PatchGANDiscriminator
from tokenizers_vq.lpips import LPIPS


def reconstruction_loss(reconstructions: Tensor, images: Tensor, kind: Literal["l1", "l2"]) -> Tensor:
    """Mean absolute ("l1") or squared ("l2") error over all elements of [B,3,H,W] inputs; scalar."""
    if reconstructions.shape != images.shape:
        raise ValueError(
            f"shape mismatch: reconstructions {tuple(reconstructions.shape)}, images {tuple(images.shape)}"
        )
    if kind == "l1":
        return (reconstructions - images).abs().mean()
    if kind == "l2":
        return (reconstructions - images).pow(2).mean()
    raise ValueError(f"reconstruction kind must be 'l1' or 'l2', got {kind!r}")


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Hinge discriminator loss 0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake))); scalar."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Non-saturating GAN discriminator loss 0.5 * (mean(softplus(-real)) + mean(softplus(fake))); scalar."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def generator_adversarial_loss(logits_fake: Tensor) -> Tensor:
    """Generator's adversarial loss -mean(logits_fake) (taming uses it with both discriminator losses)."""
    return -logits_fake.mean()


def adaptive_generator_weight(
    nll_loss: Tensor, g_loss: Tensor, last_layer: Tensor, max_weight: float = 1e4
) -> Tensor:
    """Balance the adversarial term against the reconstruction term at the decoder's last layer.

    Returns ||d nll / d last_layer|| / (||d g_loss / d last_layer|| + 1e-4), clamped to [0, max_weight] and
    detached (a scalar). Both losses keep their graphs (`retain_graph=True`) for the caller's backward.
    """
    nll_grads = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = torch.linalg.vector_norm(nll_grads) / (torch.linalg.vector_norm(g_grads) + 1e-4)
    return weight.clamp(0.0, max_weight).detach()


_WEIGHT_FIELDS = ("reconstruction_weight", "perceptual_weight", "codebook_weight", "disc_weight")


@dataclass(frozen=True)
class VQLossConfig:
    """Weights and schedule of the VQ tokenizer loss. Defaults are LlamaGen's VQ-16 training settings."""

    reconstruction: Literal["l1", "l2"] = "l2"
    """Pixel reconstruction error: mean absolute ("l1") or mean squared ("l2")."""
    reconstruction_weight: float = 1.0
    """Weight of the pixel reconstruction term."""
    perceptual_weight: float = 1.0
    """Weight of the LPIPS term; 0 builds no LPIPS and needs no weight files."""
    vgg_weights: str | None = None
    """Path to torchvision's vgg16-397923af.pth; None means <torch hub dir>/checkpoints/vgg16-397923af.pth."""
    lpips_weights: str | None = None
    """Path to the LPIPS v0.1 vgg linear weights; None means <torch hub dir>/checkpoints/lpips_vgg_v0.1.pth."""
    codebook_weight: float = 1.0
    """Weight of the quantizer's summed codebook loss (vq + commitment + entropy)."""
    disc_weight: float = 0.5
    """Weight of the generator's adversarial term; 0 builds no discriminator (and ignores the disc_* fields)."""
    disc_start: int = 20000
    """Global step from which the adversarial terms are used and the discriminator is trained."""
    disc_adaptive_weight: bool = False
    """Scale the adversarial term by the taming grad-norm ratio at the decoder's last layer (needs last_layer)."""
    disc_loss: Literal["hinge", "vanilla"] = "hinge"
    """Discriminator loss: hinge, or vanilla (softplus / non-saturating)."""
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    """Shape of the PatchGAN discriminator."""

    def __post_init__(self) -> None:
        if self.reconstruction not in ("l1", "l2"):
            raise ValueError(f"VQLossConfig.reconstruction must be 'l1' or 'l2', got {self.reconstruction!r}")
        for name in _WEIGHT_FIELDS:
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or value < 0
            ):
                raise ValueError(f"VQLossConfig.{name} must be a finite number >= 0, got {value!r}")
        if isinstance(self.disc_start, bool) or not isinstance(self.disc_start, int) or self.disc_start < 0:
            raise ValueError(f"VQLossConfig.disc_start must be an int >= 0, got {self.disc_start!r}")
        if self.disc_loss not in ("hinge", "vanilla"):
            raise ValueError(f"VQLossConfig.disc_loss must be 'hinge' or 'vanilla', got {self.disc_loss!r}")
        if isinstance(self.discriminator, Mapping):
            # A resolved config read back from YAML/JSON carries the nested config as a plain mapping.
            object.__setattr__(self, "discriminator", DiscriminatorConfig(**self.discriminator))
        if not isinstance(self.discriminator, DiscriminatorConfig):
            raise ValueError(
                f"VQLossConfig.discriminator must be a DiscriminatorConfig, got {self.discriminator!r}"
            )
        if (
            self.disc_adaptive_weight
            and self.disc_weight > 0
            and self.reconstruction_weight + self.perceptual_weight == 0
        ):
            raise ValueError(
                "VQLossConfig.disc_adaptive_weight needs reconstruction_weight or perceptual_weight > 0: "
                "the adaptive weight is the ratio of their gradient to the adversarial one"
            )


def _drop_perceptual_keys(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    for key in [k for k in state_dict if k.startswith(prefix + "perceptual.")]:
        del state_dict[key]


def _ignore_missing_perceptual_keys(module: nn.Module, incompatible_keys) -> None:
    missing = incompatible_keys.missing_keys
    missing[:] = [k for k in missing if ".perceptual." not in f".{k}"]


class VQLoss(nn.Module):
    """Generator and discriminator losses of a VQ tokenizer (see the module docstring for the contract).

    Attributes:
        perceptual: frozen LPIPS, or None when perceptual_weight is 0.
        discriminator: PatchGANDiscriminator, or None when disc_weight is 0; give it its own optimizer.
    """

    def __init__(self, config: VQLossConfig | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else VQLossConfig()
        cfg = self.config
        self.perceptual: LPIPS | None = (
            LPIPS.from_weights(cfg.vgg_weights, cfg.lpips_weights) if cfg.perceptual_weight > 0 else None
        )
        self.discriminator: PatchGANDiscriminator | None = (
            PatchGANDiscriminator(cfg.discriminator) if cfg.disc_weight > 0 else None
        )
        self._disc_loss_fn = hinge_d_loss if cfg.disc_loss == "hinge" else vanilla_d_loss
        # LPIPS is a fixed pretrained network read from its own files: keep its 58 MB out of every
        # checkpoint (and EMA copy) and do not ask for it when loading one.
        self._register_state_dict_hook(_drop_perceptual_keys)
        self.register_load_state_dict_post_hook(_ignore_missing_perceptual_keys)

    def discriminator_active(self, global_step: int) -> bool:
        """Whether the adversarial terms are on at `global_step` (a discriminator exists and step >= disc_start)."""
        return self.discriminator is not None and global_step >= self.config.disc_start

    def _logits_without_param_grads(self, images: Tensor) -> Tensor:
        """Discriminator logits whose graph reaches `images` but not the discriminator's parameters."""
        assert self.discriminator is not None
        # Detached parameters share storage with the real ones, so this is the same function; autograd just
        # has no path into them, which keeps the generator step out of the discriminator's .grad.
        params = {name: p.detach() for name, p in self.discriminator.named_parameters()}
        return functional_call(self.discriminator, params, (images,))

    def _adversarial_weight(self, nll: Tensor, gen_adv: Tensor, last_layer: Tensor | None) -> Tensor:
        cfg = self.config
        if not cfg.disc_adaptive_weight:
            return gen_adv.new_tensor(cfg.disc_weight)
        if not torch.is_grad_enabled():
            # Validation under no_grad cannot take the gradients the ratio needs; taming weights the term 0.
            return gen_adv.new_zeros(())
        if last_layer is None:
            raise ValueError(
                "VQLossConfig.disc_adaptive_weight is on, so generator_loss needs last_layer "
                "(the decoder's final conv weight)"
            )
        return adaptive_generator_weight(nll, gen_adv, last_layer) * cfg.disc_weight

    def generator_loss(
        self,
        images: Tensor,
        reconstructions: Tensor,
        codebook_loss: Tensor,
        global_step: int,
        last_layer: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Loss for the VQ model (encoder, quantizer, decoder).

        total = reconstruction_weight * rec + perceptual_weight * perceptual + codebook_weight * codebook
                + adv_weight * gen_adv,
        where adv_weight is 0 before disc_start, else disc_weight (times the adaptive ratio when enabled).

        Args:
            images: float [B,3,H,W] in [-1, 1].
            reconstructions: float [B,3,H,W], the decoder output (with its graph).
            codebook_loss: scalar, the quantizer's summed vq + commitment + entropy loss.
            global_step: optimizer step, for the disc_start schedule.
            last_layer: decoder's final conv weight; needed only with disc_adaptive_weight.
        Returns:
            (total scalar, logs) with detached scalar logs "rec", "perceptual", "codebook", "gen_adv",
            "adv_weight", "total".
        """
        cfg = self.config
        rec = reconstruction_loss(reconstructions, images, cfg.reconstruction)
        if self.perceptual is not None:
            perceptual = self.perceptual(images, reconstructions).mean()
        else:
            perceptual = rec.new_zeros(())
        nll = cfg.reconstruction_weight * rec + cfg.perceptual_weight * perceptual
        if self.discriminator_active(global_step):
            gen_adv = generator_adversarial_loss(self._logits_without_param_grads(reconstructions))
            adv_weight = self._adversarial_weight(nll, gen_adv, last_layer)
        else:
            # No discriminator forward before disc_start: the term would be multiplied by 0 anyway.
            gen_adv, adv_weight = rec.new_zeros(()), rec.new_zeros(())
        total = nll + adv_weight * gen_adv + cfg.codebook_weight * codebook_loss
        logs = {
            "rec": rec,
            "perceptual": perceptual,
            "codebook": codebook_loss,
            "gen_adv": gen_adv,
            "adv_weight": adv_weight,
            "total": total,
        }
        return total, {name: value.detach() for name, value in logs.items()}

    def discriminator_loss(
        self, images: Tensor, reconstructions: Tensor, global_step: int
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Loss for `self.discriminator` on real `images` vs detached `reconstructions` ([B,3,H,W] each).

        Call it only when `discriminator_active(global_step)`; otherwise it raises instead of wasting two
        discriminator passes on a zero-weighted loss. The loss is not scaled by disc_weight (taming; LlamaGen
        scales it by disc_weight, a constant factor Adam all but ignores).

        Returns:
            (loss scalar, logs) with detached scalars "disc", "logits_real", "logits_fake" (mean logits).
        """
        if self.discriminator is None:
            raise RuntimeError("VQLossConfig.disc_weight is 0, so there is no discriminator to train")
        if not self.discriminator_active(global_step):
            raise ValueError(
                f"discriminator_loss called at step {global_step} < disc_start={self.config.disc_start}; "
                "check discriminator_active(step) first"
            )
        # Separate passes (not one concatenated batch) so BatchNorm sees real and fake statistics apart, as
        # in taming and LlamaGen.
        logits_real = self.discriminator(images.detach())
        logits_fake = self.discriminator(reconstructions.detach())
        loss = self._disc_loss_fn(logits_real, logits_fake)
        logs = {"disc": loss, "logits_real": logits_real.mean(), "logits_fake": logits_fake.mean()}
        return loss, {name: value.detach() for name, value in logs.items()}
