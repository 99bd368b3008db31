"""PatchGAN discriminator for adversarial VQ tokenizer training.

`PatchGANDiscriminator` maps images [B,3,H,W] in [-1, 1] to a grid of real/fake logits [B,1,h,w], one per
overlapping patch. Its layout and state-dict keys (`main.0.weight`, ...) match the NLayerDiscriminator of
pix2pix / taming-transformers that LlamaGen trains its tokenizers with. What it leaves to others: the
adversarial losses and their schedule (`losses.py`) and its optimizer (the Lightning module).
"""

# Follows Isola et al. 2017 (pix2pix NLayerDiscriminator) via taming-transformers and LlamaGen
# (tokenizer/tokenizer_image/discriminator_patchgan.py).

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

_KERNEL = 4
_PADDING = 1
_MAX_CHANNEL_MULT = 8


@dataclass(frozen=True)
class DiscriminatorConfig:
    """Shape of the PatchGAN discriminator."""

    base_channels: int = 64
    """Channels of the first conv; layer n has base_channels * min(2**n, 8)."""
    n_layers: int = 3
    """Number of stride-2 convs; each halves the resolution and widens the patch each logit sees."""
    in_channels: int = 3
    """Channels of the input images."""

    def __post_init__(self) -> None:
        for name in ("base_channels", "n_layers", "in_channels"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"DiscriminatorConfig.{name} must be a positive int, got {value!r}")


def _init_weights(module: nn.Module) -> None:
    # DCGAN-style init, as in pix2pix/taming/LlamaGen: small normal conv weights, BN scale near 1.
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class PatchGANDiscriminator(nn.Module):
    """NLayerDiscriminator: n_layers stride-2 convs, one stride-1 conv, then a 1-channel logit conv."""

    def __init__(self, config: DiscriminatorConfig | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else DiscriminatorConfig()
        base, n_layers = self.config.base_channels, self.config.n_layers
        layers: list[nn.Module] = [
            nn.Conv2d(self.config.in_channels, base, _KERNEL, stride=2, padding=_PADDING),
            nn.LeakyReLU(0.2, inplace=True),
        ]
        mult = 1
        for n in range(1, n_layers):
            prev_mult, mult = mult, min(2**n, _MAX_CHANNEL_MULT)
            # No conv bias before BatchNorm: BN's own shift makes it redundant.
            layers += [
                nn.Conv2d(base * prev_mult, base * mult, _KERNEL, stride=2, padding=_PADDING, bias=False),
                nn.BatchNorm2d(base * mult),
                nn.LeakyReLU(0.2, inplace=True),
            ]
        prev_mult, mult = mult, min(2**n_layers, _MAX_CHANNEL_MULT)
        layers += [
            nn.Conv2d(base * prev_mult, base * mult, _KERNEL, stride=1, padding=_PADDING, bias=False),
            nn.BatchNorm2d(base * mult),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(base * mult, 1, _KERNEL, stride=1, padding=_PADDING),
        ]
        self.main = nn.Sequential(*layers)
        self.apply(_init_weights)

    @staticmethod
    def min_image_size(n_layers: int) -> int:
        """Smallest H (and W) that yields a non-empty logit grid for `n_layers`.

        A k4/s2/p1 conv maps H to floor(H/2) and each of the two k4/s1/p1 convs maps H to H-1, so the grid
        after the stride-2 stack must be at least 3 wide: H >= 3 * 2**n_layers.
        """
        return 3 * 2**n_layers

    @staticmethod
    def output_size(size: int, n_layers: int) -> int:
        """Logit-grid side for an input side `size` (<= 0 means the input is too small)."""
        for _ in range(n_layers):
            size = (size + 2 * _PADDING - _KERNEL) // 2 + 1
        return size - 2

    def forward(self, images: Tensor) -> Tensor:
        """Real/fake logits per patch.

        Args:
            images: float [B,C,H,W] in [-1, 1], C = config.in_channels.
        Returns:
            logits float [B,1,h,w]; for n_layers=3, 256x256 gives 30x30.
        """
        n_layers = self.config.n_layers
        height, width = images.shape[-2:]
        if min(height, width) < self.min_image_size(n_layers):
            fitting = _largest_fitting_layers(min(height, width))
            hint = (
                f"use fewer layers for small images (discriminator.n_layers={fitting} fits)"
                if fitting >= 1
                else "images this small are below what any PatchGAN can judge; set disc_weight: 0"
            )
            raise ValueError(
                f"PatchGANDiscriminator with n_layers={n_layers} needs images of at least "
                f"{self.min_image_size(n_layers)}x{self.min_image_size(n_layers)}, got {height}x{width}; {hint}."
            )
        return self.main(images)


def _largest_fitting_layers(size: int) -> int:
    n_layers = 0
    while PatchGANDiscriminator.min_image_size(n_layers + 1) <= size:
        n_layers += 1
    return n_layers
