"""The tokenizer's reconstructions as a second FID reference, so the AR prior is judged apart from the
tokenizer's own error.

An AR model can at best reproduce the distribution of decoded token grids: against real images its FID
carries the tokenizer's error too. The study therefore passes the real reference images once through the
tokenizer (encode, decode, round to uint8) into `<study>/reconstructions/samples.npz`, scores those
reconstructions against the real images (`reconstructions/metrics.json`: the floor any AR model starts
from) and scores every run's samples against the reconstructions as well
(`samples/<run>/metrics_vs_reconstructions.json`). Encoding and decoding are `metrics.tokenizer_eval`'s,
scoring `metrics.evaluate`'s; when to run this (and whether earlier reconstructions are still valid) is
the study runner's call.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tokenizers_vq.diffusers_backend import tokenizer_weights_file
from tokenizers_vq.files import atomic_write, atomic_write_text, file_sha256

SAMPLES_NAME = "samples.npz"


@dataclass(frozen=True)
class ReconstructionStep:
    """Which tokenizer rebuilds which real images for the second reference."""

    tokenizer: str
    """The study's tokenizer: our tokenizer directory, a diffusers VQModel directory or a LlamaGen VQ `.pt`."""
    images: str | None = None
    """Real images to reconstruct (ADM `.npz` with `arr_0`, image folder or image shards); None: the
    `evaluate.reference` of the study, which must then hold images (not only mu/sigma)."""
    image_size: int | None = None
    """Resize and centre-crop folder/shard images to this size first (None: as stored)."""
    tokenizer_size: str | None = None
    """Named config of a LlamaGen VQ `.pt` (vq-16 or vq-8)."""
    accelerator: str = "auto"
    """Where the tokenizer runs (one device): auto (a GPU when there is one), cpu, gpu/cuda or mps."""


def reconstruction_settings(step: ReconstructionStep, images: str) -> dict[str, Any]:
    """What the reconstructions depend on: the tokenizer and the images (paths and hashes) and the resize.
    The study runner compares these with the ones its record of the step holds."""
    from metrics.reference import data_hash, source_kind

    kind = source_kind(images)
    if kind == "npz-stats":
        raise ValueError(f"reconstructions: {images} holds only mu/sigma statistics; set `reconstructions.images` "
                         f"to the real images (ADM .npz with arr_0, an image folder or image shards)")
    weights = tokenizer_weights_file(step.tokenizer)  # ours, a diffusers VQModel folder or a LlamaGen .pt
    return {"tokenizer": step.tokenizer, "tokenizer_sha256": file_sha256(weights),
            "tokenizer_size": step.tokenizer_size, "images": str(images), "images_sha256": data_hash(images, kind),
            "image_size": step.image_size}


def reconstruct_reference(step: ReconstructionStep, images: str, out_dir: Path,
                          settings: dict[str, Any] | None = None) -> Path:
    """Write `out_dir/samples.npz` (ADM layout, uint8 [N,H,W,3] `arr_0`) of the tokenizer's reconstructions
    of `images`, then (last) a manifest naming both inputs and their hashes (`settings`, default
    `reconstruction_settings`). Always writes: whether existing ones are still valid is the caller's call."""
    from metrics.features import accelerator_device
    from metrics.reference import iter_image_batches, source_kind
    from metrics.tokenizer_eval import reconstruct
    from tokenizers_vq.checkpoint import load_tokenizer

    settings = reconstruction_settings(step, images) if settings is None else settings
    kind = source_kind(images)
    manifest_path, samples_path = out_dir / "manifest.json", out_dir / SAMPLES_NAME
    device = accelerator_device(step.accelerator)
    tokenizer = load_tokenizer(step.tokenizer, step.tokenizer_size).to(device).eval()
    rebuilt = [reconstruct(tokenizer, batch, device) for batch in iter_image_batches(images, kind, step.image_size)]
    pixels = np.concatenate([batch.permute(0, 2, 3, 1).numpy() for batch in rebuilt])

    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:  # a file object: np.savez would append .npz to a bare name
            np.savez(handle, arr_0=pixels)

    atomic_write(samples_path, write)
    manifest: dict[str, Any] = {"settings": settings, "num_images": int(len(pixels)),
                                "image_shape": list(pixels.shape[1:]), "complete": True}
    atomic_write_text(manifest_path, json.dumps(manifest, indent=2) + "\n")
    return samples_path


__all__ = ["ReconstructionStep", "reconstruct_reference", "reconstruction_settings"]
