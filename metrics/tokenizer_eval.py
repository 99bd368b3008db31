"""Tokenizer evaluation: reconstruct a set of real images through a VQ tokenizer and report PSNR, SSIM
and rFID (FID of the reconstructions against the originals, in a chosen extractor's feature space).

    python -m metrics tokenizer --tokenizer runs/demo/vq/tokenizer --images val.npz \
        --extractor domain-classifier --weights runs/demo/domain_classifier

LlamaGen reports rFID against the ImageNet val centre crops (`--image_size 256` on the val folder).
Images come from an ADM `.npz` (`arr_0`), a folder or image shards (metrics.reference); PSNR and SSIM are
torchmetrics' on [0,1] pixels of the saved (uint8) reconstructions; writing metrics.json is atomic.
Every input (the tokenizer and its weights file, the images, the extractor name) is checked before the
tokenizer runs; the report records the tokenizer's weights hash (ours, diffusers' or a LlamaGen `.pt`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from metrics.features import accelerator_device, build_extractor
from metrics.fid import FeatureStats
from metrics.inputs import check_extractor_name, check_source
from metrics.reference import data_hash, extract, iter_image_batches, source_kind
from tokenizers_vq.checkpoint import load_tokenizer
from tokenizers_vq.diffusers_backend import tokenizer_weights_file
from tokenizers_vq.files import atomic_write_text, file_sha256


@torch.no_grad()
def reconstruct(tokenizer: torch.nn.Module, images: torch.Tensor, device: str | torch.device) -> torch.Tensor:
    """uint8 [B,3,H,W] -> the tokenizer's uint8 reconstructions (encode to codes, decode, round)."""
    signed = images.to(device).float() / 127.5 - 1
    decoded = tokenizer.decode(tokenizer.encode(signed)).float().clamp(-1, 1)
    return ((decoded + 1) * 127.5).round().to(torch.uint8).cpu()


def evaluate_tokenizer(tokenizer: str, images: str, extractor: str = "inception-v3-compat",
                       weights: str | None = None, out: str | None = None, tokenizer_size: str | None = None,
                       image_size: int | None = None, accelerator: str = "cpu") -> dict[str, Any]:
    """PSNR, SSIM and rFID of `tokenizer` on `images`; writes eval_metrics.json (default beside the tokenizer).

    Args:
        tokenizer: our tokenizer directory, a diffusers VQModel directory or a LlamaGen VQ `.pt`.
        images: real images: ADM `.npz` with `arr_0`, an image folder, or image shards.
        extractor: feature extractor for rFID (`inception-v3-compat`, or `domain-classifier` for small or
            non-natural data such as the digits).
        weights: the extractor's weights (never downloaded).
        out: metrics.json path (default `<tokenizer dir>/eval_metrics.json`).
        tokenizer_size: named config of a LlamaGen `.pt` (vq-16 or vq-8).
        image_size: resize and centre-crop folder/shard images to this size (the tokenizer's input size).
        accelerator: where it runs (one device): cpu, gpu/cuda, mps, or auto (a GPU when there is one).
    """
    check_extractor_name(extractor)
    weights_file = tokenizer_weights_file(tokenizer)  # a missing tokenizer or weights file is named here
    kind = source_kind(images, "--images")
    if kind == "npz-stats":
        raise ValueError(f"--images {images} holds mu/sigma statistics, not images: pass the real images")
    check_source(images, kind, "--images")
    device = accelerator_device(accelerator)
    vq = load_tokenizer(tokenizer, tokenizer_size).to(device).eval()
    fx = build_extractor(extractor, weights=weights, device=device)
    originals, recons = [], []
    psnr_sum = ssim_sum = 0.0
    for batch in iter_image_batches(images, kind, image_size):
        rebuilt = reconstruct(vq, batch, device)
        real, fake = batch.float() / 255, rebuilt.float() / 255
        # per-image PSNR averaged over images (the usual tokenizer report), SSIM with the standard window
        psnr_sum += float(peak_signal_noise_ratio(fake, real, data_range=1.0, reduction="none",
                                                  dim=(1, 2, 3)).sum())
        ssim_sum += float(structural_similarity_index_measure(fake, real, data_range=1.0, reduction="none").sum())
        originals.append(batch)
        recons.append(rebuilt)
    count = sum(b.shape[0] for b in originals)
    if count < 2:
        raise ValueError(f"{images} holds {count} image(s); rFID needs at least 2")
    real_features, _ = extract(fx, iter(originals))
    fake_features, _ = extract(fx, iter(recons))
    report = {
        "metrics": {"psnr": psnr_sum / count, "ssim": ssim_sum / count,
                    "rfid": FeatureStats.from_features(fake_features, "the reconstructions").fid(
                        FeatureStats.from_features(real_features, f"--images {images}"))},
        "num_images": count,
        "tokenizer": {"path": str(tokenizer), "weights": str(weights_file), "sha256": file_sha256(weights_file)},
        "images": {"path": str(images), "kind": kind, "sha256": data_hash(images, kind), "image_size": image_size},
        "extractor": {"name": fx.name, "weights_sha256": fx.weights_sha256,
                      # what the features are (for a domain classifier: the data it learnt, its accuracy)
                      "description": getattr(fx, "description", None)},
    }
    tokenizer_dir = Path(tokenizer) if Path(tokenizer).is_dir() else Path(tokenizer).parent
    atomic_write_text(Path(out) if out else tokenizer_dir / "eval_metrics.json", json.dumps(report, indent=2) + "\n")
    return report
