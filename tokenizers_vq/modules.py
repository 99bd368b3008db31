"""Convolutional building blocks of the VQ-GAN: residual, attention, resampling blocks, Encoder, Decoder.

Follows LlamaGen's tokenizer (tokenizer/tokenizer_image/vq_model.py), itself after taming-transformers:
state-dict names and arithmetic match so LlamaGen's checkpoints load strictly. Quantisation lives in
`quantizer.py`, the assembled model in `model.py`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    """GroupNorm with LlamaGen's eps (1e-6)."""
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """GN-SiLU-conv twice with a 1x1 `nin_shortcut` when the width changes."""

    def __init__(self, in_channels: int, out_channels: int, norm_groups: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = group_norm(in_channels, norm_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels, norm_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1 convolutions for q, k, v and the output."""

    def __init__(self, channels: int, norm_groups: int):
        super().__init__()
        self.norm = group_norm(channels, norm_groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        normed = self.norm(x)
        # [B, C, H, W] -> [B, 1, HW, C]: one head over all positions; SDPA scales by 1/sqrt(C) as LlamaGen does.
        q, k, v = (proj(normed).reshape(b, 1, c, h * w).transpose(-1, -2) for proj in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj_out(out.transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding right and bottom by one (taming's asymmetric padding)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: `res` blocks, `attn` blocks (lowest resolution only) and a resampler."""

    def __init__(self, res: list[nn.Module], attn: list[nn.Module], resample_name: str | None,
                 resample: nn.Module | None):
        super().__init__()
        self.res = nn.ModuleList(res)
        self.attn = nn.ModuleList(attn)
        # Attribute name matters for the state dict: `downsample` in the encoder, `upsample` in the decoder.
        self.resample_name = resample_name
        if resample_name is not None:
            self.add_module(resample_name, resample)

    def forward(self, h: Tensor) -> Tensor:
        for i, block in enumerate(self.res):
            h = block(h)
            if len(self.attn):
                h = self.attn[i](h)
        if self.resample_name is not None:
            h = getattr(self, self.resample_name)(h)
        return h


def _middle(channels: int, groups: int, dropout: float) -> nn.ModuleList:
    return nn.ModuleList([ResnetBlock(channels, channels, groups, dropout), AttnBlock(channels, groups),
                          ResnetBlock(channels, channels, groups, dropout)])


class Encoder(nn.Module):
    """images [B,3,H,W] -> latents [B,z_channels,H/f,W/f] with f = 2 ** (len(ch_mult) - 1)."""

    def __init__(self, in_channels: int, base_channels: int, ch_mult: tuple[int, ...], num_res_blocks: int,
                 z_channels: int, norm_groups: int, dropout: float = 0.0):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        levels = []
        block_in = base_channels
        last = len(ch_mult) - 1
        for i, mult in enumerate(ch_mult):
            block_out = base_channels * mult
            res = []
            for _ in range(num_res_blocks):
                res.append(ResnetBlock(block_in, block_out, norm_groups, dropout))
                block_in = block_out
            attn = [AttnBlock(block_in, norm_groups) for _ in range(num_res_blocks)] if i == last else []
            levels.append(_Level(res, attn, None if i == last else "downsample",
                                 None if i == last else Downsample(block_in)))
        self.conv_blocks = nn.ModuleList(levels)
        self.mid = _middle(block_in, norm_groups, dropout)
        self.norm_out = group_norm(block_in, norm_groups)
        self.conv_out = nn.Conv2d(block_in, z_channels, 3, padding=1)

    def forward(self, images: Tensor) -> Tensor:
        h = self.conv_in(images)
        for level in self.conv_blocks:
            h = level(h)
        for block in self.mid:
            h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """latents [B,z_channels,h,w] -> images [B,3,h*f,w*f]; levels run from the lowest resolution up."""

    def __init__(self, out_channels: int, base_channels: int, ch_mult: tuple[int, ...], num_res_blocks: int,
                 z_channels: int, norm_groups: int, dropout: float = 0.0):
        super().__init__()
        block_in = base_channels * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = _middle(block_in, norm_groups, dropout)
        levels = []
        top = len(ch_mult) - 1
        for i in reversed(range(len(ch_mult))):
            block_out = base_channels * ch_mult[i]
            res = []
            for _ in range(num_res_blocks + 1):
                res.append(ResnetBlock(block_in, block_out, norm_groups, dropout))
                block_in = block_out
            attn = [AttnBlock(block_in, norm_groups) for _ in range(num_res_blocks + 1)] if i == top else []
            levels.append(_Level(res, attn, None if i == 0 else "upsample",
                                 None if i == 0 else Upsample(block_in)))
        self.conv_blocks = nn.ModuleList(levels)
        self.norm_out = group_norm(block_in, norm_groups)
        self.conv_out = nn.Conv2d(block_in, out_channels, 3, padding=1)

    @property
    def last_layer(self) -> torch.nn.Parameter:
        """Weight the adaptive GAN weight differentiates against."""
        return self.conv_out.weight

    def forward(self, latents: Tensor) -> Tensor:
        h = self.conv_in(latents)
        for block in self.mid:
            h = block(h)
        for level in self.conv_blocks:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))
