"""Typed configuration of the VQ tokenizer and its named sizes.

`VQConfig` says what to build; `VQ_SIZES` holds LlamaGen's VQ-16 and VQ-8 exactly (so their released
checkpoints load strictly) plus small sizes that train on a CPU. Building the model is `tokenizers_vq.model`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any


@dataclass(frozen=True)
class VQConfig:
    """Shape and quantiser settings of a VQ-GAN tokenizer (LlamaGen's `ModelArgs` for `VQModel`)."""

    codebook_size: int = 16384
    """Number of codebook entries (token vocabulary of the AR stage)."""
    codebook_embed_dim: int = 8
    """Dimension of each codebook vector (LlamaGen's low-dimensional lookup)."""
    codebook_l2_norm: bool = True
    """Compare and look up l2-normalised latents and codes (cosine-similarity lookup)."""
    commit_loss_beta: float = 0.25
    """Weight of the commitment loss ||sg[z_q] - z||^2."""
    entropy_loss_ratio: float = 0.0
    """Weight of the codebook entropy loss (0 disables it)."""
    entropy_temperature: float = 0.01
    """Softmax temperature of the entropy loss over code affinities."""
    base_channels: int = 128
    """Width of the first encoder level (LlamaGen hard-codes 128)."""
    encoder_ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    """Channel multipliers per encoder level; len - 1 downsamplings by 2."""
    decoder_ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    """Channel multipliers per decoder level (listed low to high like the encoder's)."""
    z_channels: int = 256
    """Channels of the encoder output before `quant_conv`."""
    num_res_blocks: int = 2
    """Residual blocks per encoder level (the decoder uses one more, as LlamaGen does)."""
    norm_groups: int = 32
    """GroupNorm groups (LlamaGen: 32); every width must be divisible by it."""
    dropout: float = 0.0
    """Dropout inside residual blocks."""
    in_channels: int = 3
    """Image channels."""
    usage_window: int = 65536
    """Length of the ring buffer of recent codes behind `codebook_usage` (LlamaGen's `codebook_used`)."""

    def __post_init__(self) -> None:
        # jsonargparse and YAML hand us lists; keep tuples so configs stay hashable and frozen.
        object.__setattr__(self, "encoder_ch_mult", tuple(self.encoder_ch_mult))
        object.__setattr__(self, "decoder_ch_mult", tuple(self.decoder_ch_mult))
        positive = ("codebook_size", "codebook_embed_dim", "base_channels", "z_channels", "num_res_blocks",
                    "norm_groups", "in_channels", "usage_window")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"VQConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not self.encoder_ch_mult or not self.decoder_ch_mult:
            raise ValueError("VQConfig.encoder_ch_mult and decoder_ch_mult must be non-empty")
        if len(self.encoder_ch_mult) != len(self.decoder_ch_mult):
            raise ValueError(
                f"VQConfig.decoder_ch_mult has {len(self.decoder_ch_mult)} levels but encoder_ch_mult has "
                f"{len(self.encoder_ch_mult)}: both must downsample and upsample by the same factor")
        widths = {self.base_channels * m for m in (*self.encoder_ch_mult, *self.decoder_ch_mult)}
        bad = sorted(w for w in widths if w % self.norm_groups)
        if bad:
            raise ValueError(f"VQConfig.norm_groups={self.norm_groups} does not divide channel widths {bad}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"VQConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.commit_loss_beta < 0 or self.entropy_loss_ratio < 0:
            raise ValueError("VQConfig.commit_loss_beta and entropy_loss_ratio must be >= 0")

    @property
    def downsample_factor(self) -> int:
        """Pixels per code along each side (2 ** number of downsamplings)."""
        return 2 ** (len(self.encoder_ch_mult) - 1)

    def grid_size(self, image_size: int) -> int:
        """Codes per side for square images of `image_size` pixels."""
        if image_size % self.downsample_factor:
            raise ValueError(f"image size {image_size} is not divisible by the tokenizer's downsample factor "
                             f"{self.downsample_factor}")
        return image_size // self.downsample_factor

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (tuples as lists) that `VQConfig(**d)` rebuilds."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.__dict__.items()}


VQ_SIZES: dict[str, VQConfig] = {
    # LlamaGen's released tokenizers (vq_ds16_c2i.pt, vq_ds8_c2i.pt).
    "vq-16": VQConfig(),
    "vq-8": VQConfig(encoder_ch_mult=(1, 2, 2, 4), decoder_ch_mult=(1, 2, 2, 4)),
    # CPU sizes: 16x16 digits -> 4x4 codes (ds 4), and a wider one for 32-64 px experiments.
    "vq-tiny": VQConfig(codebook_size=64, base_channels=32, encoder_ch_mult=(1, 1, 2),
                        decoder_ch_mult=(1, 1, 2), z_channels=32, usage_window=65536),
    "vq-small": VQConfig(codebook_size=1024, base_channels=64, encoder_ch_mult=(1, 1, 2),
                         decoder_ch_mult=(1, 1, 2), z_channels=64),
}


def vq_config(size: str = "vq-16", **overrides: Any) -> VQConfig:
    """A named size with some fields replaced, e.g. `vq_config("vq-tiny", codebook_size=256)`."""
    if size not in VQ_SIZES:
        raise ValueError(f"unknown VQ size {size!r}; known sizes: {sorted(VQ_SIZES)}")
    return replace(VQ_SIZES[size], **overrides)
