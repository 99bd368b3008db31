"""A domain feature extractor for any labelled image data: a small timm classifier trained on that data
(by `study.domain_classifier`), used where Inception features mean little (16x16 digits, small or
non-natural data sets).

`features` (the penultimate layer: the globally pooled last stage) feed FID/KID/PRC and `logits` feed IS and
`class_accuracy` (does a class-conditional sample show the class it was asked for?). Numbers are comparable
only among scores made with one classifier; published ImageNet numbers need `inception-v3-compat`. The
network is timm's `ResNet` of `BasicBlock`s with a stem and strides sized to the image size
(`sized_config`), or any timm model by name. It is saved as `model.safetensors` + `config.json` (the
architecture, the classes, the data it learnt, its val accuracy and the weights' sha256); make one with

    python -m study classifier --out runs/demo/domain_classifier [--data DIR]

Importing this module registers `FIDELITY_NAME` ("domain-classifier"; "digits-classifier" is a deprecated
alias) with torch-fidelity (weights passed as `feature_extractor_weights_path`) and with
`metrics.features.build_extractor` (as `weights`). Computing and reporting metrics is left to `metrics.fid`,
`metrics.evaluate` and `metrics.features`; training the classifier and reading its data to
`study.domain_classifier`.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

from metrics.checks import check_labels
from metrics.features import FeatureExtractor, register_extractor
from tokenizers_vq.files import atomic_write, atomic_write_text, file_sha256, load_state_dict_checked
from tokenizers_vq.model_dir import CONFIG_NAME, WEIGHTS_NAME

__all__ = ["DomainClassifierConfig", "DomainClassifier", "DomainFeatureExtractor", "DomainExtractor",
           "FIDELITY_NAME", "DEPRECATED_NAME", "RESNET", "FORMAT_VERSION", "sized_config",
           "classifier_input", "save_domain_classifier", "load_domain_classifier", "read_domain_classifier_meta",
           "class_accuracy", "register_with_torch_fidelity"]

FIDELITY_NAME = "domain-classifier"
DEPRECATED_NAME = "digits-classifier"  # the name before the classifier learnt any data set; still accepted
RESNET = "resnet"
FORMAT_VERSION = 2  # 1 (no "format" key): the plain two-block CNN that only learnt the digits
_KIND = "engram-vision-domain-classifier"
_MAKE_IT = "python -m study classifier --out DIR"


@dataclass(frozen=True)
class DomainClassifierConfig:
    """Shape of the classifier; saved in config.json so a checkpoint rebuilds itself.

    `sized_config` fills the ResNet fields for an image size; the defaults are its choice for 16 px.
    """

    image_size: int = 16
    """Inputs of any size are resized to this square size before the first conv."""
    num_classes: int = 10
    """Number of logits."""
    arch: str = RESNET
    """`resnet`: timm's ResNet of BasicBlocks shaped by the fields below; any other name: that timm model
    (`timm.create_model(arch, num_classes=...)`, random init, its own stem; the fields below are unused)."""
    channels: tuple[int, int, int, int] = (16, 32, 64, 128)
    """Widths of the four ResNet stages; the last is the feature size. The first must be even (timm's
    stem is built at half that width before ours replaces it)."""
    blocks: tuple[int, int, int, int] = (1, 1, 1, 1)
    """BasicBlocks per stage."""
    stem_stride: int = 1
    """Stride of the 3x3 stem conv (1 or 2). timm's own stem downsamples 4x, which would leave 4x4 of a
    16 px image before the first block."""
    stage_stride: int = 4
    """Total downsampling of the four stages (2, 4 or 8); later stages dilate instead (timm's
    output_stride), so the last feature map stays image_size / (stem_stride * stage_stride) wide."""

    def __post_init__(self) -> None:
        # json round trips turn tuples into lists; compare and store tuples
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        object.__setattr__(self, "blocks", tuple(int(b) for b in self.blocks))
        if self.image_size < 8 or self.num_classes < 2:
            raise ValueError(f"DomainClassifierConfig: image_size must be >= 8 and num_classes >= 2, got "
                             f"{self.image_size} and {self.num_classes}")
        if self.arch != RESNET:
            import timm  # only here: it takes seconds to import

            if not timm.is_model(self.arch):
                raise ValueError(f"DomainClassifierConfig.arch {self.arch!r} is neither {RESNET!r} nor a timm "
                                 f"model name (timm.list_models())")
            return
        if len(self.channels) != 4 or len(self.blocks) != 4:
            raise ValueError(f"DomainClassifierConfig: timm's ResNet has four stages; channels and blocks need "
                             f"four entries each, got {self.channels} and {self.blocks}")
        if min(self.channels) < 1 or min(self.blocks) < 1 or self.channels[0] % 2:
            raise ValueError(f"DomainClassifierConfig: channels and blocks must be positive and channels[0] "
                             f"even, got {self.channels} and {self.blocks}")
        if self.stem_stride not in (1, 2) or self.stage_stride not in (2, 4, 8):
            raise ValueError(f"DomainClassifierConfig: stem_stride must be 1 or 2 and stage_stride 2, 4 or 8, "
                             f"got {self.stem_stride} and {self.stage_stride}")


def sized_config(image_size: int, num_classes: int, arch: str = RESNET, width: int = 16) -> DomainClassifierConfig:
    """The classifier for `image_size` px inputs: a stride-1 stem up to 32 px (2 above), stage strides that
    end on a map of 4 px or more (4x4 for 16, 32 and 64 px), and widths width * (1, 2, 4, 8).

    16 px with width 16 is about 0.3M parameters and trains on the 1500 digits in seconds on one CPU core.
    """
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8 px, got {image_size}")
    if width < 2 or width % 2:
        raise ValueError(f"width must be an even number >= 2, got {width}")
    stem_stride = 1 if image_size <= 32 else 2
    side = image_size // stem_stride
    stage_stride = 8 if side >= 32 else 4 if side >= 16 else 2
    return DomainClassifierConfig(image_size=image_size, num_classes=num_classes, arch=arch,
                                  channels=(width, 2 * width, 4 * width, 8 * width), stem_stride=stem_stride,
                                  stage_stride=stage_stride)


def _build_network(config: DomainClassifierConfig) -> nn.Module:
    # timm imports in seconds; importing this module (which registers the extractor) should not wait for it
    import timm
    from timm.models.resnet import BasicBlock, ResNet

    if config.arch != RESNET:
        return timm.create_model(config.arch, pretrained=False, num_classes=config.num_classes)
    # timm counts output_stride from its 4x stem; a deep stem of half the first width makes the stem's output
    # (and so the first stage's input) exactly channels[0] wide
    net = ResNet(BasicBlock, layers=config.blocks, channels=config.channels, num_classes=config.num_classes,
                 stem_type="deep", stem_width=config.channels[0] // 2, output_stride=4 * config.stage_stride)
    # Replace timm's 4x-downsampling stem (three convs + max pool) by one 3x3 conv, so small images keep their
    # resolution into the first stage; initialised as timm initialises its convs.
    net.conv1 = nn.Conv2d(3, config.channels[0], 3, stride=config.stem_stride, padding=1, bias=False)
    nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
    net.maxpool = nn.Identity()
    return net


def classifier_input(images: torch.Tensor, image_size: int, like: torch.Tensor | None = None) -> torch.Tensor:
    """images uint8 [N,3,H,W] (0..255) or float [N,3,H,W] in [-1,1] -> float [N,3,S,S] in [-1,1], S =
    `image_size`, on the device and dtype of `like` (default float32 where the images are)."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images [N,3,H,W], got {tuple(images.shape)}")
    x = images.to(like.device, like.dtype) if like is not None else images.float()
    x = x / 127.5 - 1.0 if images.dtype == torch.uint8 else x
    if x.shape[-2:] != (image_size, image_size):
        # antialias so large samples are compared at the scale the classifier was trained on
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True)
    return x


class DomainClassifier(nn.Module):
    """A timm network (`net`) with the extractor interface: `features` [N,D] (pooled, pre-logits) and
    `logits` [N,C] from images [N,3,H,W], uint8 in 0..255 or float in [-1,1] (the project's convention),
    resized to `config.image_size` when H or W differ. Call `eval()` before extracting features: the ResNet
    has batch norm, whose training mode would make features depend on the batch."""

    def __init__(self, config: DomainClassifierConfig = DomainClassifierConfig()) -> None:
        super().__init__()
        self.config = config
        self.net = _build_network(config)
        self.feature_dim = int(getattr(self.net, "head_hidden_size", None) or self.net.num_features)

    @property
    def head(self) -> nn.Module:
        """The final linear layer: features -> logits. A property, not a second attribute: registering the
        module twice would store its weights under two names, which safetensors refuses."""
        return self.net.get_classifier()

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """images uint8 or float [N,3,H,W] -> float [N,3,S,S] in [-1,1] on the model's device."""
        return classifier_input(images, self.config.image_size, like=next(self.parameters()))

    def features_of_input(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations [N, feature_dim] of already preprocessed inputs (training uses this)."""
        return self.net.forward_head(self.net.forward_features(x), pre_logits=True)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate activations [N, feature_dim] (pooled after ReLU, like Inception's pool features)."""
        return self.features_of_input(self.preprocess(images))

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits [N, num_classes]."""
        return self.head(self.features(images))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(features [N,D], logits [N,C]) from one pass."""
        feats = self.features(images)
        return feats, self.head(feats)


@torch.no_grad()
def class_accuracy(classifier: DomainClassifier, images: torch.Tensor, labels: torch.Tensor,
                   batch_size: int = 512) -> float:
    """Fraction of images [N,3,H,W] (uint8 or float in [-1,1]) whose argmax class equals labels [N].
    Runs in eval mode (batch norm uses its running statistics) and restores the classifier's mode.
    Labels of another length or outside the classifier's classes, and NaN/inf float images, are a ValueError."""
    if images.shape[0] != labels.shape[0] or images.shape[0] == 0:
        raise ValueError(f"need as many labels as images (>0): {images.shape[0]} vs {labels.shape[0]}")
    # A label the classifier cannot output would only lower the accuracy, silently: refuse it.
    labels = torch.from_numpy(check_labels(labels.cpu().numpy(), images.shape[0], classifier.config.num_classes,
                                           "class_accuracy"))
    if images.dtype.is_floating_point and not bool(torch.isfinite(images).all()):
        raise ValueError("class_accuracy: the images hold NaN or inf values; pass uint8 images or floats in [-1, 1]")
    was_training = classifier.training
    classifier.eval()
    correct = 0
    for start in range(0, images.shape[0], batch_size):
        pred = classifier.logits(images[start:start + batch_size]).argmax(dim=1).cpu()
        correct += int((pred == labels[start:start + batch_size].cpu()).sum())
    classifier.train(was_training)
    return correct / images.shape[0]


def save_domain_classifier(classifier: DomainClassifier, directory: str | Path,
                           extra: dict[str, Any] | None = None) -> Path:
    """Atomically write `model.safetensors`, then `config.json` (kind, format, architecture config, the
    weights' sha256 and `extra`: classes, data, training settings, val accuracy); returns the weights path."""
    directory = Path(directory)
    tensors = {k: v.detach().contiguous().cpu() for k, v in classifier.state_dict().items()}
    weights = directory / WEIGHTS_NAME
    atomic_write(weights, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    meta = {"kind": _KIND, "format": FORMAT_VERSION, "config": asdict(classifier.config),
            "feature_dim": classifier.feature_dim, **(extra or {}), "weights_sha256": file_sha256(weights)}
    atomic_write_text(directory / CONFIG_NAME, json.dumps(meta, indent=2) + "\n")
    return weights


def _directory(path: str | Path) -> Path:
    path = Path(path)
    return path.parent if path.name == WEIGHTS_NAME else path


def read_domain_classifier_meta(path: str | Path) -> dict[str, Any]:
    """The checked `config.json` of a saved classifier (directory or its model.safetensors).

    FileNotFoundError when a file is missing, ValueError for another kind of model or the old format
    (the two-block CNN of earlier versions), each saying how to make a classifier."""
    directory = _directory(path)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"domain classifier file {directory / name} not found; make it with "
                                    f"`python -m study classifier --out {directory}`")
    meta = json.loads((directory / CONFIG_NAME).read_text())
    if meta.get("kind") != _KIND:
        raise ValueError(f"{directory / CONFIG_NAME} is not a domain classifier config ({_MAKE_IT})")
    if meta.get("format") != FORMAT_VERSION:
        raise ValueError(f"{directory} holds a domain classifier in format {meta.get('format', 1)} (the plain "
                         f"CNN of earlier versions), which this version no longer builds; retrain it with "
                         f"`python -m study classifier --out {directory}` (add --data for data other than "
                         f"the embedded digits); FID and IS of the old and the new one are not comparable")
    return meta


def load_domain_classifier(path: str | Path) -> DomainClassifier:
    """A saved classifier in eval mode, on CPU. `path` is its directory or its `model.safetensors`.
    Raises ValueError when the weights are not the ones config.json recorded."""
    directory = _directory(path)
    meta = read_domain_classifier_meta(directory)
    weights = directory / WEIGHTS_NAME
    recorded = meta.get("weights_sha256")
    if recorded is not None and recorded != file_sha256(weights):
        raise ValueError(f"{weights} is not the file {directory / CONFIG_NAME} describes (sha256 differs): "
                         f"copy both files together, or retrain with `{_MAKE_IT}`")
    classifier = DomainClassifier(DomainClassifierConfig(**meta["config"]))
    load_state_dict_checked(classifier, load_file(str(weights)), str(weights))
    return classifier.eval()


def _description(meta: dict[str, Any]) -> dict[str, Any]:
    """What the features are: the architecture, the classes, the data learnt and how well (metrics.json)."""
    data = meta.get("data") or {}
    return {"architecture": {**meta["config"], "feature_dim": meta.get("feature_dim")},
            "classes": meta.get("classes"),
            "trained_on": {key: data.get(key) for key in ("path", "kind", "sha256", "num_images")},
            "val_accuracy": meta.get("val_accuracy")}


class DomainFeatureExtractor(FeatureExtractorBase):
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
    """Register `DomainFeatureExtractor` under `name` (idempotent); returns the name."""
    existing = FEATURE_EXTRACTORS_REGISTRY.get(name)
    if existing is None:
        register_feature_extractor(name, DomainFeatureExtractor)
    elif existing.__qualname__ != DomainFeatureExtractor.__qualname__:
        raise ValueError(f"torch-fidelity extractor name {name!r} is already taken by {existing}")
    return name


class DomainExtractor(FeatureExtractor):
    """`metrics.features` adapter: `build_extractor("domain-classifier", weights=DIR)`; uint8 in.

    `description` (architecture, classes, trained-on data path/kind/hash, val accuracy) says what its
    features mean, for metrics.json.
    """

    name = FIDELITY_NAME

    def __init__(self, weights: str | Path | None = None, device: str | torch.device = "cpu",
                 batch_size: int = 256) -> None:
        super().__init__(device, batch_size)
        if weights is None:
            raise FileNotFoundError(f"the {self.name!r} extractor needs weights=DIR/{WEIGHTS_NAME}; make it "
                                    f"with `{_MAKE_IT}`")
        self.classifier = load_domain_classifier(weights).to(self.device).requires_grad_(False)
        self.weights_path = _directory(weights) / WEIGHTS_NAME
        self.weights_sha256 = file_sha256(self.weights_path)
        self.description: dict[str, Any] = _description(read_domain_classifier_meta(weights))

    def _forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.classifier(images)


def _deprecated_extractor(**kwargs: Any) -> DomainExtractor:
    warnings.warn(f"feature extractor {DEPRECATED_NAME!r} is now {FIDELITY_NAME!r} (it learns any labelled "
                  f"data); use that name", FutureWarning, stacklevel=3)
    return DomainExtractor(**kwargs)


for _name in (FIDELITY_NAME, DEPRECATED_NAME):
    register_with_torch_fidelity(_name)
# overwrite: a module imported twice (e.g. once as __main__) registers itself again
register_extractor(FIDELITY_NAME, DomainExtractor, overwrite=True)
register_extractor(DEPRECATED_NAME, _deprecated_extractor, overwrite=True)
