"""Frozen VQ tokenizer backed by a pretrained diffusers `VQModel` in a local directory.

`DiffusersVQTokenizer.from_pretrained(dir)` loads the output of `diffusers.VQModel.save_pretrained(dir)`
(no network: `local_files_only=True`) and exposes the project's tokenizer interface: `encode(images)` ->
`codes` int64 [B,h,w] and `decode(codes)` -> `images` [B,3,H,W], plus `codebook_size` and
`downsample_factor`. Inference only: the wrapped model stays in eval mode with gradients off.

`tokenizer_weights_file(path)` names the file whose SHA-256 identifies any tokenizer path (ours, a diffusers
folder or a LlamaGen `.pt`) in manifests and metrics.json; diffusers is imported only when a model is
loaded, so that helper costs nothing.

Left to others: training and our own LlamaGen-compatible VQ-GAN (`tokenizers_vq.model`), image loading and
normalisation to [-1,1] (`train/data.py`), token shards (`train/prepare/extract_tokens.py`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from tokenizers_vq.model_dir import WEIGHTS_NAME

if TYPE_CHECKING:
    from diffusers import VQModel

CONFIG_NAME = "config.json"
# What `save_pretrained` writes (safetensors by default, the pickle-free format; .bin only on request).
DIFFUSERS_WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
TOKENIZER_WEIGHT_NAMES = (WEIGHTS_NAME, *DIFFUSERS_WEIGHT_NAMES)


def tokenizer_weights_file(path: str | Path) -> Path:
    """The weights file of a tokenizer path: the file itself (a LlamaGen `.pt`), else the folder's
    `model.safetensors` (ours) or `diffusion_pytorch_model.safetensors` / `.bin` (diffusers).

    FileNotFoundError naming the folder and the names looked for when there is none.
    """
    path = Path(path)
    if path.is_file():
        return path
    for name in TOKENIZER_WEIGHT_NAMES:
        if (path / name).is_file():
            return path / name
    what = "folder" if path.is_dir() else "path (it does not exist)"
    raise FileNotFoundError(f"tokenizer {what} {path} has no weights file ({', '.join(TOKENIZER_WEIGHT_NAMES)}): "
                            f"pass our tokenizer folder, a diffusers VQModel.save_pretrained folder or a "
                            f"LlamaGen VQ .pt")


class DiffusersVQTokenizer(nn.Module):
    """A diffusers `VQModel` behind `encode(images) -> codes` / `decode(codes) -> images`.

    The module lives on whatever device it is moved to (`.to(device)`); inputs must already be there.
    """

    def __init__(self, model: VQModel) -> None:
        super().__init__()
        from diffusers import VQModel  # a heavy import, only where a diffusers model is used

        if not isinstance(model, VQModel):
            raise ValueError(f"expected a diffusers VQModel, got {type(model).__name__}")
        self.model = model.eval().requires_grad_(False)

    @classmethod
    def from_pretrained(cls, path: str | Path, subfolder: str | None = None) -> DiffusersVQTokenizer:
        """Load `VQModel.save_pretrained` output from `path` (or `path/subfolder`), never from the Hub."""
        from diffusers import VQModel

        directory = Path(path) / subfolder if subfolder else Path(path)
        config_file = directory / CONFIG_NAME
        if not directory.is_dir():
            raise FileNotFoundError(f"diffusers VQModel directory not found: {directory} "
                                    "(expected the output of VQModel.save_pretrained)")
        if not config_file.is_file():
            raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}: missing file {config_file} "
                                    "(expected the output of VQModel.save_pretrained)")
        # Check the class before loading: VQModel.from_pretrained on another model's config would build a
        # VQModel from defaults and report the mismatched weights only as a warning.
        class_name = json.loads(config_file.read_text()).get("_class_name")
        if class_name != VQModel.__name__:
            raise ValueError(f"{config_file} describes a {class_name!r}, not a diffusers VQModel")
        model = VQModel.from_pretrained(str(path), subfolder=subfolder, local_files_only=True)
        return cls(model)

    def train(self, mode: bool = True) -> DiffusersVQTokenizer:
        # A frozen tokenizer: a parent module switching to train mode must not change its arithmetic.
        return super().train(False)

    @property
    def codebook_size(self) -> int:
        """Number of distinct code ids; codes lie in [0, codebook_size)."""
        # `re_embed` is the id range the quantiser emits (it differs from n_e only with an index remap,
        # which VQModel never builds, but the quantiser's own notion is the one to trust).
        return int(self.model.quantize.re_embed)

    @property
    def downsample_factor(self) -> int:
        """Image pixels per code cell along each side: 2 ** (len(block_out_channels) - 1)."""
        # diffusers' Encoder downsamples by 2 after every block except the last.
        return 2 ** (len(self.model.config.block_out_channels) - 1)

    @property
    def embed_dim(self) -> int:
        """Dimension of one codebook vector (`vq_embed_dim`)."""
        return int(self.model.quantize.vq_embed_dim)

    def _dtype(self) -> torch.dtype:
        return self.model.quantize.embedding.weight.dtype

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """Nearest-codebook ids of the encoded images.

        images: float [B,3,H,W] in [-1,1], H and W divisible by `downsample_factor`.
        Returns codes: int64 [B,H/f,W/f] in [0, codebook_size).
        """
        if images.ndim != 4 or images.shape[1] != self.model.config.in_channels:
            raise ValueError(f"images must be [B,{self.model.config.in_channels},H,W], got {tuple(images.shape)}")
        f = self.downsample_factor
        if images.shape[2] % f or images.shape[3] % f:
            raise ValueError(f"image size {tuple(images.shape[2:])} is not divisible by the downsample factor {f}")
        # `encode` already applies quant_conv, so its latents live in the codebook space.
        latents = self.model.encode(images.to(self._dtype())).latents
        # Use the quantiser's own lookup (cdist argmin, plus any remap) so ids match diffusers exactly.
        # VQModel builds it with sane_index_shape=False: ids come back flat [B*h*w] in (b, y, x) order.
        _, _, (_, _, indices) = self.model.quantize(latents)
        b, _, h, w = latents.shape
        return indices.reshape(b, h, w).long()

    @torch.no_grad()
    def decode(self, codes: Tensor) -> Tensor:
        """Images from code ids, clamped to [-1,1] (the raw decoder output may overshoot).

        codes: int64 [B,h,w] in [0, codebook_size). Returns images: float [B,3,h*f,w*f].
        """
        if codes.ndim != 3:
            raise ValueError(f"codes must be [B,h,w], got {tuple(codes.shape)}")
        if codes.dtype.is_floating_point or codes.dtype == torch.bool:
            raise ValueError(f"codes must be an integer tensor, got {codes.dtype}")
        # An out-of-range id is a CPU IndexError but an opaque device-side assert on CUDA: check it here.
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise ValueError(f"codes must lie in [0, {self.codebook_size}), got "
                             f"[{int(codes.min())}, {int(codes.max())}]")
        b, h, w = codes.shape
        shape = (b, h, w, self.embed_dim)  # get_codebook_entry takes a channels-last shape
        flat = codes.long().reshape(-1)
        if self.model.config.lookup_from_codebook:
            # With this flag, decode(force_not_quantize=True) takes ids and looks them up itself.
            out = self.model.decode(flat, force_not_quantize=True, shape=shape).sample
        else:
            # Otherwise force_not_quantize=True passes latents straight to post_quant_conv; the default
            # (False) would re-quantise them, which is a no-op on exact codebook vectors but wasted work.
            quant = self.model.quantize.get_codebook_entry(flat, shape)
            out = self.model.decode(quant, force_not_quantize=True).sample
        return out.clamp(-1.0, 1.0)
