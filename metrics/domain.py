"""A domain feature extractor for small data sets: a tiny CNN classifier (trained on the embedded digits by
`study.domain_classifier`).

Inception features mean little for 16x16 digits, so FID/IS/KID/PRC on the embedded data set use this
classifier instead: `features` (the 128-d penultimate layer) for FID/KID/PRC and `logits` for IS and for
`class_accuracy` (does a class-conditional sample show the digit it was asked for?). It is saved as
`model.safetensors` + `config.json`; make one with

    python -m study classifier --out runs/demo/domain_classifier

Importing this module registers `FIDELITY_NAME` ("digits-classifier") with torch-fidelity (weights passed
as `feature_extractor_weights_path`) and with `metrics.features.build_extractor` (as `weights`). Computing
and reporting metrics is left to `metrics.fid`, `metrics.evaluate` and `metrics.features`; training the
classifier and the data it learns from to `study.domain_classifier`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

from metrics.features import FeatureExtractor, register_extractor
from tokenizers_vq.files import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    atomic_write,
    atomic_write_text,
    file_sha256,
    load_state_dict_checked,
)

__all__ = ["DomainClassifierConfig", "DigitsClassifier", "DigitsFeatureExtractor", "DigitsDomainExtractor",
           "FIDELITY_NAME", "save_domain_classifier", "load_domain_classifier", "class_accuracy",
           "register_with_torch_fidelity"]

FIDELITY_NAME = "digits-classifier"
_KIND = "engram-vision-domain-classifier"
_MAKE_IT = "python -m study classifier --out DIR"


@dataclass(frozen=True)
class DomainClassifierConfig:
    """Shape of the classifier; saved in config.json so a checkpoint rebuilds itself."""

    image_size: int = 16
    """Inputs of any size are resized to this square size before the first conv."""
    width: int = 32
    """Channels of the first conv block; the second block has twice as many."""
    feature_dim: int = 128
    """Size of the penultimate layer, the features FID/KID/PRC compare."""
    num_classes: int = 10
    """Number of logits."""

    def __post_init__(self) -> None:
        if self.image_size % 4 != 0 or min(self.width, self.feature_dim, self.num_classes) < 1:
            raise ValueError(f"image_size must be divisible by 4 (two 2x pools), sizes positive: {self}")


class DigitsClassifier(nn.Module):
    """Two conv blocks (each two 3x3 convs and a 2x max pool), a ReLU feature layer, a linear head.

    Inputs are images [N,3,H,W]: uint8 in 0..255 or float in [-1,1] (the project's image convention);
    they are resized to `config.image_size` if H or W differ.
    """

    def __init__(self, config: DomainClassifierConfig = DomainClassifierConfig()) -> None:
        super().__init__()
        self.config = config
        w = config.width
        self.body = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * w * (config.image_size // 4) ** 2, config.feature_dim), nn.ReLU(),
        )
        self.head = nn.Linear(config.feature_dim, config.num_classes)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """images uint8 or float [N,3,H,W] -> float [N,3,S,S] in [-1,1] on the model's device."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [N,3,H,W], got {tuple(images.shape)}")
        param = self.head.weight
        x = images.to(param.device, param.dtype)
        x = x / 127.5 - 1.0 if images.dtype == torch.uint8 else x
        size = self.config.image_size
        if x.shape[-2:] != (size, size):
            # antialias so large samples are compared at the scale the classifier was trained on
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        return x

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate activations [N, feature_dim] (after ReLU, like Inception's pool features)."""
        return self.body(self.preprocess(images))

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits [N, num_classes]."""
        return self.head(self.features(images))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(features [N,D], logits [N,C]) from one pass."""
        feats = self.features(images)
        return feats, self.head(feats)


@torch.no_grad()
def class_accuracy(classifier: DigitsClassifier, images: torch.Tensor, labels: torch.Tensor,
                   batch_size: int = 512) -> float:
    """Fraction of images [N,3,H,W] (uint8 or float in [-1,1]) whose argmax class equals labels [N]."""
    if images.shape[0] != labels.shape[0] or images.shape[0] == 0:
        raise ValueError(f"need as many labels as images (>0): {images.shape[0]} vs {labels.shape[0]}")
    correct = 0
    for start in range(0, images.shape[0], batch_size):
        pred = classifier.logits(images[start:start + batch_size]).argmax(dim=1).cpu()
        correct += int((pred == labels[start:start + batch_size].cpu()).sum())
    return correct / images.shape[0]


def save_domain_classifier(classifier: DigitsClassifier, directory: str | Path,
                           extra: dict[str, Any] | None = None) -> Path:
    """Atomically write `model.safetensors` + `config.json` into `directory`; returns the weights path."""
    directory = Path(directory)
    tensors = {k: v.detach().contiguous().cpu() for k, v in classifier.state_dict().items()}
    weights = directory / WEIGHTS_NAME
    atomic_write(weights, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    meta = {"kind": _KIND, "config": asdict(classifier.config), **(extra or {})}
    atomic_write_text(directory / CONFIG_NAME, json.dumps(meta, indent=2))
    return weights


def _directory(path: str | Path) -> Path:
    path = Path(path)
    return path.parent if path.name == WEIGHTS_NAME else path


def load_domain_classifier(path: str | Path) -> DigitsClassifier:
    """A saved classifier in eval mode, on CPU. `path` is its directory or its `model.safetensors`."""
    directory = _directory(path)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"domain classifier file {directory / name} not found; make it with "
                                    f"`python -m study classifier --out {directory}`")
    meta = json.loads((directory / CONFIG_NAME).read_text())
    if meta.get("kind") != _KIND:
        raise ValueError(f"{directory / CONFIG_NAME} is not a domain classifier config ({_MAKE_IT})")
    classifier = DigitsClassifier(DomainClassifierConfig(**meta["config"]))
    load_state_dict_checked(classifier, load_file(str(directory / WEIGHTS_NAME)), str(directory / WEIGHTS_NAME))
    return classifier.eval()


class DigitsFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity wrapper: uint8 [N,3,H,W] in, a tuple of the requested features out.

    Provides "features" (FID/KID/PRC default) and "logits" (IS default). The weights come from
    `feature_extractor_weights_path` (directory or model.safetensors); there is no download fallback.
    """

    def __init__(self, name: str, features_list: list[str], feature_extractor_weights_path: str | None = None,
                 **kwargs: Any) -> None:
        super().__init__(name, features_list)
        if feature_extractor_weights_path is None:
            raise FileNotFoundError(f"torch-fidelity extractor {name!r} needs feature_extractor_weights_path="
                                    f"DIR/{WEIGHTS_NAME}; make it with `{_MAKE_IT}`")
        self.classifier = load_domain_classifier(feature_extractor_weights_path)
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return ("features", "logits")

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return {"isc": "logits", "fid": "features", "kid": "features", "prc": "features"}[metric]

    @staticmethod
    def can_be_compiled() -> bool:
        return False  # too small to gain anything; compiling only costs start-up time

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected uint8 images [N,3,H,W], got {x.dtype} {tuple(x.shape)}")
        out = dict(zip(("features", "logits"), self.classifier(x), strict=True))
        # torch-fidelity zips this tuple with the *requested* list, so follow its order
        return tuple(out[name] for name in self.features_list)


def register_with_torch_fidelity(name: str = FIDELITY_NAME) -> str:
    """Register `DigitsFeatureExtractor` under `name` (idempotent); returns the name."""
    existing = FEATURE_EXTRACTORS_REGISTRY.get(name)
    if existing is None:
        register_feature_extractor(name, DigitsFeatureExtractor)
    elif existing.__qualname__ != DigitsFeatureExtractor.__qualname__:
        raise ValueError(f"torch-fidelity extractor name {name!r} is already taken by {existing}")
    return name


class DigitsDomainExtractor(FeatureExtractor):
    """`metrics.features` adapter: `build_extractor("digits-classifier", weights=DIR)`; uint8 in."""

    name = FIDELITY_NAME

    def __init__(self, weights: str | Path | None = None, device: str | torch.device = "cpu",
                 batch_size: int = 256) -> None:
        super().__init__(device, batch_size)
        if weights is None:
            raise FileNotFoundError(f"the {self.name!r} extractor needs weights=DIR/{WEIGHTS_NAME}; make it "
                                    f"with `{_MAKE_IT}`")
        self.classifier = load_domain_classifier(weights).to(self.device)
        self.weights_path = _directory(weights) / WEIGHTS_NAME
        self.weights_sha256 = file_sha256(self.weights_path)

    def _forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.classifier(images)


register_with_torch_fidelity()
# overwrite: a module imported twice (e.g. once as __main__) registers itself again
register_extractor(FIDELITY_NAME, DigitsDomainExtractor, overwrite=True)
