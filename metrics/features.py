"""Feature extractors for the metrics, looked up by name: `features` [N,D] for FID/KID/PR, `logits` [N,C] for IS.

Ships `inception-v3-compat` (torch-fidelity's port of the TF-Inception used by the FID literature), loaded
from an explicit path or torch's hub cache and never downloaded. Other extractors (the domain classifier
in `metrics.domain`, `domain-classifier`) join with `register_extractor`; an extractor may carry a
`description` dict saying what its features are (the caller records it). Statistics and metric formulas
live elsewhere.
"""

from __future__ import annotations

import importlib
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path

import torch

from tokenizers_vq.files import file_sha256

INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = (
    f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_WEIGHTS_FILE}"
)


ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")


def accelerator_device(accelerator: str = "auto") -> torch.device:
    """The one torch device a single-device job (scoring, probing) runs on, named with Lightning's
    accelerator vocabulary: `auto` (cuda when available, else cpu), `cpu`, `gpu`/`cuda`, `mps`."""
    if accelerator not in ACCELERATORS:
        raise ValueError(f"accelerator must be one of {list(ACCELERATORS)}, got {accelerator!r}")
    if accelerator == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if accelerator in ("gpu", "cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"accelerator {accelerator!r}: no CUDA device is visible; use accelerator cpu or auto")
        return torch.device("cuda")
    return torch.device(accelerator)


class FeatureExtractor(ABC):
    """Batched extractor on a fixed device. Input `images` uint8 [N,3,H,W] (0..255, any device).

    Subclasses implement `_forward(batch) -> (features [B,D], logits [B,C])` and set `name` and
    `weights_sha256` (provenance recorded in metrics.json and in reference cache file names), and may set
    `description` (what the features are, e.g. the data a domain classifier learnt; None when unset).
    """

    name: str
    weights_sha256: str
    description: dict | None = None

    def __init__(self, device: str | torch.device = "cpu", batch_size: int = 64) -> None:
        self.device = torch.device(device)
        self.batch_size = batch_size

    @abstractmethod
    def _forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 [B,3,H,W] on `self.device` -> (features [B,D], logits [B,C])."""

    @torch.no_grad()
    def features_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both outputs in one pass (float32, CPU): features [N,D], logits [N,C]."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images [N,3,H,W], got {images.dtype} {tuple(images.shape)}")
        feats, logits = [], []
        for start in range(0, images.shape[0], self.batch_size):
            f, lg = self._forward(images[start : start + self.batch_size].to(self.device))
            feats.append(f.float().cpu())
            logits.append(lg.float().cpu())
        return torch.cat(feats), torch.cat(logits)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """float32 [N,D] features of uint8 `images` [N,3,H,W]."""
        return self.features_and_logits(images)[0]

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """float32 [N,C] class logits of uint8 `images` [N,3,H,W] (for the Inception Score)."""
        return self.features_and_logits(images)[1]


class InceptionV3Compat(FeatureExtractor):
    """torch-fidelity's FeatureExtractorInceptionV3: pool '2048' features and 'logits_unbiased' for IS."""

    name = "inception-v3-compat"

    def __init__(self, weights: str | Path | None = None, device: str | torch.device = "cpu",
                 batch_size: int = 64) -> None:
        super().__init__(device, batch_size)
        path = resolve_inception_weights(weights)
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        # torch-fidelity unpickles its weights file with weights_only=False. It never sees the user's file:
        # we load that with weights_only=True (refusing anything but tensors) and hand torch-fidelity a
        # temporary file we wrote from those tensors. The explicit path also keeps it off the network.
        state = torch.load(path, map_location="cpu", weights_only=True)
        with tempfile.TemporaryDirectory() as tmp:
            verified = Path(tmp) / "inception.pth"
            torch.save(state, verified)
            self.model = FeatureExtractorInceptionV3(
                self.name, ["2048", "logits_unbiased"], feature_extractor_weights_path=str(verified)
            ).to(self.device)
        self.model.requires_grad_(False).eval()
        self.weights_path = path
        self.weights_sha256 = file_sha256(path)

    def _forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # torch-fidelity takes uint8 and does the TF-compatible resize to 299 and scaling itself.
        feats, logits = self.model(images)
        return feats, logits


def resolve_inception_weights(weights: str | Path | None = None) -> Path:
    """The Inception weights file: `weights` if given, else torch's hub cache; FileNotFoundError if absent."""
    default = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE
    path = Path(weights) if weights is not None else default
    if not path.is_file():
        raise FileNotFoundError(
            f"Inception weights {INCEPTION_WEIGHTS_FILE} not found at {path}. We never download: fetch it from "
            f"{INCEPTION_WEIGHTS_URL} and put it at {default} (torch hub cache) or pass its path via --weights."
        )
    return path


ExtractorFactory = Callable[..., FeatureExtractor]
"""`factory(weights=None|path, device=..., batch_size=...) -> FeatureExtractor`."""

_REGISTRY: dict[str, ExtractorFactory] = {"inception-v3-compat": InceptionV3Compat}
# Extractors that live in their own modules and register themselves on import; imported on first use so
# `--extractor domain-classifier` works without the caller knowing where it is defined. `digits-classifier`
# is the deprecated name of the same extractor.
_PLUGINS: dict[str, str] = {"domain-classifier": "metrics.domain", "digits-classifier": "metrics.domain"}


def register_extractor(name: str, factory: ExtractorFactory, overwrite: bool = False) -> None:
    """Make `build_extractor(name, ...)` call `factory(weights=..., device=..., batch_size=...)`."""
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"feature extractor {name!r} is already registered")
    _REGISTRY[name] = factory


def available_extractors() -> list[str]:
    """Names accepted by `build_extractor`."""
    return sorted(set(_REGISTRY) | set(_PLUGINS))


def build_extractor(name: str, weights: str | Path | None = None, device: str | torch.device = "cpu",
                    batch_size: int = 64) -> FeatureExtractor:
    """Construct the extractor registered as `name` (no downloads; missing weights raise)."""
    if name not in _REGISTRY and name in _PLUGINS:
        importlib.import_module(_PLUGINS[name])
    if name not in _REGISTRY:
        raise KeyError(f"unknown feature extractor {name!r}; registered: {available_extractors()}")
    return _REGISTRY[name](weights=weights, device=device, batch_size=batch_size)
