"""Tests for tokenizers_vq.losses and tokenizers_vq.discriminator: known values, schedule, shapes, gradients."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tokenizers_vq.discriminator import DiscriminatorConfig, PatchGANDiscriminator
from tokenizers_vq.losses import (
    VQLoss,
    VQLossConfig,
    adaptive_generator_weight,
    generator_adversarial_loss,
    hinge_d_loss,
    reconstruction_loss,
    vanilla_d_loss,
)
from tokenizers_vq.lpips import LPIPS

SMALL_DISC = DiscriminatorConfig(base_channels=8, n_layers=2)


def _images(seed: int, batch: int = 2, size: int = 16) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture
def no_hub_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point torch's hub dir at an empty folder, so nothing can be found in a real cache."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    return tmp_path


# ---------------------------------------------------------------- elementary losses


def test_reconstruction_loss_known_values() -> None:
    a = torch.zeros(2, 3, 4, 4)
    assert reconstruction_loss(a + 0.5, a, "l1").item() == pytest.approx(0.5)
    assert reconstruction_loss(a + 0.5, a, "l2").item() == pytest.approx(0.25)
    r = torch.tensor([0.0, 1.0, -2.0, 3.0]).view(1, 1, 2, 2)
    assert reconstruction_loss(r, torch.zeros_like(r), "l1").item() == pytest.approx(1.5)
    assert reconstruction_loss(r, torch.zeros_like(r), "l2").item() == pytest.approx(3.5)
    with pytest.raises(ValueError, match="l1"):
        reconstruction_loss(r, r, "l3")  # type: ignore[arg-type]


def test_discriminator_losses_known_values() -> None:
    two = torch.full((2, 1, 3, 3), 2.0)
    zero = torch.zeros(2, 1, 3, 3)
    assert hinge_d_loss(two, -two).item() == pytest.approx(0.0)
    assert hinge_d_loss(zero, zero).item() == pytest.approx(1.0)
    # relu(1 - [2, 0]) = [0, 1] -> 0.5 ; relu(1 + [-3, 1]) = [0, 2] -> 1.0 ; 0.5 * 1.5
    assert hinge_d_loss(torch.tensor([2.0, 0.0]), torch.tensor([-3.0, 1.0])).item() == pytest.approx(0.75)
    assert vanilla_d_loss(zero, zero).item() == pytest.approx(math.log(2.0))
    real, fake = torch.tensor([1.0, -0.5]), torch.tensor([0.3])
    expected = 0.5 * (
        (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(0.5))) / 2 + math.log1p(math.exp(0.3))
    )
    assert vanilla_d_loss(real, fake).item() == pytest.approx(expected, rel=1e-6)


def test_generator_adversarial_loss_is_negative_mean() -> None:
    logits = torch.tensor([[1.0, 2.0], [3.0, -2.0]])
    assert generator_adversarial_loss(logits).item() == pytest.approx(-1.0)


def test_adaptive_weight_matches_hand_computation() -> None:
    w = torch.tensor([0.5, -1.0, 2.0], requires_grad=True)
    x, t, c = torch.tensor([1.0, 2.0, -1.0]), torch.tensor([0.0, 1.0, 1.0]), torch.tensor([3.0, 0.0, 4.0])
    nll = ((w * x - t) ** 2).sum()
    g = -(w * c).sum()
    weight = adaptive_generator_weight(nll, g, w)
    # d nll / dw = 2 (w x - t) x = [1, -12, 6] -> norm sqrt(181);  d g / dw = -c -> norm 5
    assert weight.item() == pytest.approx(math.sqrt(181.0) / (5.0 + 1e-4), rel=1e-6)
    assert not weight.requires_grad
    nll.backward()  # graphs were retained for the caller's backward
    # Clamp: a generator loss with tiny gradients would give a huge ratio.
    tiny = -(w * 1e-9).sum()
    assert adaptive_generator_weight(((w * x - t) ** 2).sum(), tiny, w, max_weight=50.0).item() == 50.0


# ---------------------------------------------------------------- discriminator


def test_discriminator_shapes_and_layout() -> None:
    disc = PatchGANDiscriminator(DiscriminatorConfig())
    assert disc(_images(0, batch=1, size=256)).shape == (1, 1, 30, 30)
    shapes = {
        k: tuple(v.shape) for k, v in disc.state_dict().items() if not k.endswith("num_batches_tracked")
    }
    # LlamaGen / taming NLayerDiscriminator keys and shapes.
    assert shapes["main.0.weight"] == (64, 3, 4, 4) and shapes["main.0.bias"] == (64,)
    assert shapes["main.2.weight"] == (128, 64, 4, 4) and "main.2.bias" not in shapes
    assert shapes["main.5.weight"] == (256, 128, 4, 4)
    assert shapes["main.8.weight"] == (512, 256, 4, 4) and shapes["main.9.running_mean"] == (512,)
    assert shapes["main.11.weight"] == (1, 512, 4, 4) and shapes["main.11.bias"] == (1,)
    assert len(shapes) == 2 + 3 + 2 + 3 * 4  # first conv (w, b), three biasless convs, last conv, three BNs
    # DCGAN init: conv weights N(0, 0.02), BN scale N(1, 0.02), biases 0.
    assert disc.main[8].weight.std().item() == pytest.approx(0.02, abs=5e-4)
    assert disc.main[9].weight.mean().item() == pytest.approx(1.0, abs=5e-3)
    assert disc.main[9].weight.std().item() == pytest.approx(0.02, abs=4e-3)
    assert disc.main[0].bias.abs().max().item() == 0.0 and disc.main[9].bias.abs().max().item() == 0.0


def test_small_discriminator_and_too_small_error() -> None:
    disc = PatchGANDiscriminator(SMALL_DISC)
    assert disc(_images(0, size=16)).shape == (2, 1, 2, 2)
    assert [PatchGANDiscriminator.min_image_size(n) for n in (1, 2, 3)] == [6, 12, 24]
    assert disc(_images(0, size=12)).shape == (2, 1, 1, 1)
    for size in (12, 13, 31, 64):
        assert disc(_images(0, size=size)).shape[-1] == PatchGANDiscriminator.output_size(size, 2)
    with pytest.raises(ValueError, match=r"at least 12x12.*n_layers=1"):
        disc(_images(0, size=11))
    with pytest.raises(ValueError, match=r"at least 24x24, got 16x16.*n_layers=2"):
        PatchGANDiscriminator(DiscriminatorConfig(base_channels=8))(_images(0, size=16))
    with pytest.raises(ValueError, match="n_layers"):
        DiscriminatorConfig(n_layers=0)


# ---------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"reconstruction": "l3"}, "reconstruction"),
        ({"perceptual_weight": -1.0}, "perceptual_weight"),
        ({"disc_weight": float("nan")}, "disc_weight"),
        ({"disc_start": -5}, "disc_start"),
        ({"disc_loss": "wgan"}, "disc_loss"),
        ({"discriminator": 3}, "discriminator"),
        (
            {"disc_adaptive_weight": True, "reconstruction_weight": 0.0, "perceptual_weight": 0.0},
            "disc_adaptive_weight",
        ),
    ],
)
def test_config_rejects_bad_fields(overrides: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        VQLossConfig(**overrides)


def test_config_accepts_nested_mapping() -> None:
    config = VQLossConfig(discriminator={"base_channels": 8, "n_layers": 2})  # type: ignore[arg-type]
    assert config.discriminator == SMALL_DISC


# ---------------------------------------------------------------- VQLoss


def _loss(**overrides: object) -> VQLoss:
    base = {"perceptual_weight": 0.0, "discriminator": SMALL_DISC}
    return VQLoss(VQLossConfig(**{**base, **overrides}))  # type: ignore[arg-type]


def test_without_perceptual_needs_no_files(no_hub_files: Path) -> None:
    loss = _loss()
    assert loss.perceptual is None
    with pytest.raises(FileNotFoundError, match="perceptual_weight: 0"):
        _loss(perceptual_weight=1.0)


def test_before_disc_start_no_adversarial_term_and_no_disc_forward() -> None:
    loss = _loss(reconstruction="l1", reconstruction_weight=2.0, codebook_weight=0.3, disc_start=10)
    calls: list[int] = []
    loss.discriminator.register_forward_hook(lambda *_: calls.append(1))
    images, recon = _images(1), _images(2)
    codebook = torch.tensor(0.7)
    total, logs = loss.generator_loss(images, recon, codebook, global_step=9, last_layer=None)
    assert calls == []
    assert not loss.discriminator_active(9) and loss.discriminator_active(10)
    assert logs["gen_adv"].item() == 0.0 and logs["adv_weight"].item() == 0.0
    expected = 2.0 * (recon - images).abs().mean() + 0.3 * 0.7
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    assert set(logs) == {"rec", "perceptual", "codebook", "gen_adv", "adv_weight", "total"}
    with pytest.raises(ValueError, match="disc_start"):
        loss.discriminator_loss(images, recon, global_step=9)


def test_after_disc_start_total_is_weighted_sum_and_disc_gets_no_grad() -> None:
    loss = _loss(reconstruction_weight=2.0, codebook_weight=0.3, disc_weight=0.7, disc_start=5)
    calls: list[int] = []
    loss.discriminator.register_forward_hook(lambda *_: calls.append(1))
    images = _images(1)
    recon = _images(2).requires_grad_(True)
    codebook = torch.tensor(0.4, requires_grad=True)
    total, logs = loss.generator_loss(images, recon, codebook, global_step=5)
    assert calls == [1]
    assert logs["adv_weight"].item() == pytest.approx(0.7)
    with torch.no_grad():
        expected_adv = -loss.discriminator(recon).mean()
    assert logs["gen_adv"].item() == pytest.approx(expected_adv.item(), rel=1e-5)
    assert logs["rec"].item() == pytest.approx((recon - images).pow(2).mean().item(), rel=1e-6)
    weighted = (
        2.0 * logs["rec"]
        + 1.0 * logs["perceptual"]
        + 0.3 * logs["codebook"]
        + logs["adv_weight"] * logs["gen_adv"]
    )
    assert logs["total"].item() == pytest.approx(weighted.item(), rel=1e-6)
    assert all(not v.requires_grad for v in logs.values())
    total.backward()
    assert codebook.grad.item() == pytest.approx(0.3)
    assert recon.grad is not None and recon.grad.abs().sum().item() > 0
    assert all(p.grad is None for p in loss.discriminator.parameters())


def test_discriminator_loss_trains_only_the_discriminator() -> None:
    loss = _loss(disc_start=0)
    images, recon = _images(1), _images(2).requires_grad_(True)
    d_loss, logs = loss.discriminator_loss(images, recon, global_step=0)
    assert set(logs) == {"disc", "logits_real", "logits_fake"}
    with torch.no_grad():
        real, fake = loss.discriminator(images), loss.discriminator(recon)
    assert d_loss.item() == pytest.approx(hinge_d_loss(real, fake).item(), rel=1e-5)
    assert logs["logits_fake"].item() == pytest.approx(fake.mean().item(), rel=1e-5, abs=1e-6)
    d_loss.backward()
    assert recon.grad is None
    assert all(p.grad is not None for p in loss.discriminator.parameters())
    vanilla = _loss(disc_start=0, disc_loss="vanilla")
    v_loss, _ = vanilla.discriminator_loss(images, recon, global_step=0)
    with torch.no_grad():
        real, fake = vanilla.discriminator(images), vanilla.discriminator(recon)
    assert v_loss.item() == pytest.approx(vanilla_d_loss(real, fake).item(), rel=1e-5)


def test_no_discriminator_when_disc_weight_zero() -> None:
    loss = _loss(disc_weight=0.0, disc_start=0)
    assert loss.discriminator is None and not loss.discriminator_active(10**6)
    total, logs = loss.generator_loss(_images(1), _images(2), torch.tensor(0.0), global_step=10**6)
    assert logs["gen_adv"].item() == 0.0 and total.item() == pytest.approx(logs["rec"].item())
    with pytest.raises(RuntimeError, match="disc_weight"):
        loss.discriminator_loss(_images(1), _images(2), global_step=10**6)


def test_adaptive_weight_in_vq_loss() -> None:
    loss = _loss(disc_adaptive_weight=True, disc_weight=0.5, disc_start=0).eval()
    gen = torch.Generator().manual_seed(3)
    feats = torch.randn(2, 4, 16, 16, generator=gen)
    last_layer = (0.3 * torch.randn(3, 4, 1, 1, generator=gen)).requires_grad_(True)
    images = _images(1)
    recon = F.conv2d(feats, last_layer)
    total, logs = loss.generator_loss(images, recon, torch.tensor(0.0), global_step=0, last_layer=last_layer)
    nll_grad = torch.autograd.grad((recon - images).pow(2).mean(), last_layer, retain_graph=True)[0]
    adv_grad = torch.autograd.grad(-loss.discriminator(recon).mean(), last_layer)[0]
    expected = nll_grad.norm() / (adv_grad.norm() + 1e-4) * 0.5
    assert logs["adv_weight"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert logs["adv_weight"].item() != pytest.approx(0.5)
    with pytest.raises(ValueError, match="last_layer"):
        loss.generator_loss(images, F.conv2d(feats, last_layer), torch.tensor(0.0), global_step=0)
    with torch.no_grad():  # validation: no gradients, so the adaptive term is weighted 0 (taming)
        _, val_logs = loss.generator_loss(
            images, recon, torch.tensor(0.0), global_step=0, last_layer=last_layer
        )
    assert val_logs["adv_weight"].item() == 0.0


def test_perceptual_term_uses_lpips_from_files(tmp_path: Path) -> None:
    torch.manual_seed(0)
    # An LPIPS state dict holds both the `features.*` and the `linK.model.1.weight` keys, so it serves as both files.
    reference = LPIPS()
    path = tmp_path / "lpips_all.pth"
    torch.save(reference.state_dict(), path)
    loss = _loss(perceptual_weight=0.5, vgg_weights=str(path), lpips_weights=str(path), disc_weight=0.0)
    images, recon = _images(1, size=32), _images(2, size=32)
    _, logs = loss.generator_loss(images, recon, torch.tensor(0.0), global_step=0)
    assert logs["perceptual"].item() == pytest.approx(reference(images, recon).mean().item(), rel=1e-5)
    assert logs["perceptual"].item() > 0
    assert logs["total"].item() == pytest.approx((logs["rec"] + 0.5 * logs["perceptual"]).item(), rel=1e-6)
    loss.train()
    assert loss.perceptual is not None and not loss.perceptual.training
    assert not any(p.requires_grad for p in loss.perceptual.parameters())
