"""The VQ-GAN tokenizer: `encode(images) -> codes [B,h,w]`, `decode(codes) -> images`.

Same module names as LlamaGen's `VQModel` (encoder, decoder, quantize, quant_conv, post_quant_conv), so
its checkpoints load strictly (`checkpoint.py`). Losses and the discriminator are `losses.py` and
`discriminator.py`; training is `train/lit_vq.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from tokenizers_vq.config import VQConfig
from tokenizers_vq.modules import Decoder, Encoder
from tokenizers_vq.quantizer import QuantizerOutput, VectorQuantizer


@dataclass
class VQForward:
    """Result of a training forward pass."""

    reconstructions: Tensor
    """[B,3,H,W] decoded straight-through latents."""
    quantized: QuantizerOutput
    """codes, quantised latents and quantiser losses."""


class VQModel(nn.Module):
    """Encoder -> 1x1 quant_conv -> VectorQuantizer -> 1x1 post_quant_conv -> Decoder."""

    def __init__(self, config: VQConfig):
        super().__init__()
        self.config = config
        c = config
        self.encoder = Encoder(c.in_channels, c.base_channels, c.encoder_ch_mult, c.num_res_blocks,
                               c.z_channels, c.norm_groups, c.dropout)
        self.decoder = Decoder(c.in_channels, c.base_channels, c.decoder_ch_mult, c.num_res_blocks,
                               c.z_channels, c.norm_groups, c.dropout)
        self.quantize = VectorQuantizer(c.codebook_size, c.codebook_embed_dim, c.commit_loss_beta,
                                        c.entropy_loss_ratio, c.codebook_l2_norm, c.entropy_temperature,
                                        c.usage_window)
        self.quant_conv = nn.Conv2d(c.z_channels, c.codebook_embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(c.codebook_embed_dim, c.z_channels, 1)

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    def _check_images(self, images: Tensor) -> None:
        f = self.downsample_factor
        if images.ndim != 4 or images.shape[1] != self.config.in_channels:
            raise ValueError(f"images must be [B,{self.config.in_channels},H,W], got {tuple(images.shape)}")
        if images.shape[-1] % f or images.shape[-2] % f:
            raise ValueError(f"image size {tuple(images.shape[-2:])} is not divisible by the downsample "
                             f"factor {f}")

    def pre_quant(self, images: Tensor) -> Tensor:
        """images [B,3,H,W] in [-1,1] -> latents [B,D,h,w] before quantisation."""
        self._check_images(images)
        return self.quant_conv(self.encoder(images))

    def forward(self, images: Tensor) -> VQForward:
        """Training pass: reconstruct through the straight-through quantiser, with quantiser losses."""
        quantized = self.quantize(self.pre_quant(images), with_losses=True)
        return VQForward(self.decode_latents(quantized.quant), quantized)

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """images [B,3,H,W] in [-1,1] -> codes int64 [B,H/f,W/f]."""
        return self.quantize(self.pre_quant(images), with_losses=False).codes

    def decode_latents(self, quant: Tensor) -> Tensor:
        """Quantised latents [B,D,h,w] -> images [B,3,h*f,w*f] (unclamped)."""
        return self.decoder(self.post_quant_conv(quant))

    @torch.no_grad()
    def decode(self, codes: Tensor) -> Tensor:
        """codes int64 [B,h,w] -> images [B,3,h*f,w*f], roughly in [-1,1] (unclamped; clamp to save)."""
        if codes.ndim != 3:
            raise ValueError(f"codes must be [B,h,w], got shape {tuple(codes.shape)}")
        return self.decode_latents(self.quantize.lookup(codes))
