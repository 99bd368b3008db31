"""Training the domain classifier that `metrics.domain` turns into a feature extractor, on any labelled
image data: an ImageFolder tree (one sub-folder per class), image shards (`jpg` + `cls`, as
`python -m train.prepare shards` writes them), or the embedded digits (the default, which `make demo` uses).

    python -m study classifier --out DIR [--data TREE_OR_SHARDS] [--val VAL | --val_fraction 0.1]

Images are read by the project's readers (`train.data.images.ImageFolderDataModule`,
`train.data.image_shards.ImageShardsDataModule`: their deterministic centre views, as stored unless
`--resize true`), turned into classifier inputs by the classifier's own preprocessing (as at evaluation
time) and kept in memory, so this is for small data sets. Plain torch with random shifts (and optional
flips), deterministic for a seed on a given thread count; the val accuracy is printed and saved with the
architecture, the training settings and the data (path, kind, classes, hash) in `config.json`. The network,
its file format and its use as an extractor are `metrics.domain`'s; decoding and cropping images
`train.data`'s.
"""

from __future__ import annotations

import glob
import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from metrics.domain import (
    RESNET,
    DomainClassifier,
    class_accuracy,
    classifier_input,
    save_domain_classifier,
    sized_config,
)
from tokenizers_vq.model_dir import CONFIG_NAME
from train.data import digits

# Images are held in memory as float32 classifier inputs; past this the data set wants a real data loader.
MAX_IN_MEMORY_BYTES = 8 << 30
_READ_BATCH = 256


@dataclass(frozen=True)
class ClassifierData:
    """Which labelled images the classifier learns, and which it is validated on."""

    data: str | None = None
    """An ImageFolder tree (class sub-folders), image shards (a folder of `.tar`, one `.tar` or a brace
    pattern, with `classes.json` beside them), or None for the embedded digits (fixed 1500/297 split)."""
    val: str | None = None
    """Validation images in the same format and with the same classes as `data`; None holds out
    `val_fraction` of `data` instead (chosen with the training seed)."""
    val_fraction: float = 0.1
    """Share of `data` held out for validation when `val` is None (unused for the digits)."""
    resize: bool = False
    """Resize every image to the classifier's image_size on reading (short side, then centre crop, as the
    DataModules do); False: images are read as stored and must all have the first one's square size."""

    def __post_init__(self) -> None:
        if self.data is None and self.val is not None:
            raise ValueError("ClassifierData.val needs data: the embedded digits have their own fixed val split")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"ClassifierData.val_fraction must lie in (0, 1), got {self.val_fraction}")
        for name in ("data", "val"):
            spec = getattr(self, name)
            if spec is not None and glob.has_magic(spec) and "{" not in spec:
                raise ValueError(f"ClassifierData.{name}={spec!r}: a glob is not accepted (the data hash reads "
                                 f"folders and brace patterns); give the folder of the shards or a brace pattern "
                                 f"like train-{{000000..000009}}.tar")


@dataclass(frozen=True)
class ClassifierTraining:
    """How the classifier is trained (saved under "train" in config.json)."""

    epochs: int = 12
    """Passes over the training images."""
    seed: int = 0
    """Seeds the initial weights, the shuffling, the augmentation and a held-out val split."""
    batch_size: int = 64
    """Images per optimiser step."""
    lr: float = 2e-3
    """Peak learning rate of AdamW's one-cycle schedule."""
    weight_decay: float = 1e-4
    """AdamW weight decay."""
    max_shift: int | None = None
    """Largest random translation in pixels of the classifier input (None: image_size // 16, at least 1;
    on the digits 1 px reaches higher val accuracy than 2)."""
    flip: bool = False
    """Random horizontal flips (off by default: mirrored digits or letters are other glyphs)."""
    label_smoothing: float = 0.05
    """Keeps logits moderate, so IS and softmax confidences are not saturated."""

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"ClassifierTraining.{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.weight_decay < 0 or not 0 <= self.label_smoothing < 1:
            raise ValueError(f"ClassifierTraining: lr must be > 0, weight_decay >= 0 and label_smoothing in "
                             f"[0, 1), got {self.lr}, {self.weight_decay}, {self.label_smoothing}")
        if self.max_shift is not None and self.max_shift < 0:
            raise ValueError(f"ClassifierTraining.max_shift must be >= 0 or None, got {self.max_shift}")


@dataclass
class _Labelled:
    """Classifier inputs float32 [N,3,S,S] in [-1,1] with labels int64 [N] and where they came from."""

    inputs: torch.Tensor
    labels: torch.Tensor
    source: dict[str, Any]


def _source_kind(spec: str) -> str:
    """"folder" or "shards" (as `metrics.reference.source_kind` names them), else a ValueError."""
    from metrics.reference import source_kind

    kind = source_kind(spec)
    if kind not in ("folder", "shards"):
        raise ValueError(f"{spec} holds {kind} data without labels; the classifier needs an ImageFolder tree "
                         f"(one sub-folder per class) or image shards with cls members")
    return kind


def _classes(spec: str, kind: str) -> list[str] | None:
    """Class names in label order: the sorted class folders, or `classes.json` beside local shards (None when
    the shards have none; the labels then name the classes)."""
    if kind == "folder":
        from torchvision.datasets.folder import find_classes

        try:
            return find_classes(spec)[0]
        except FileNotFoundError as error:
            raise ValueError(f"{spec} has no class sub-folders: an ImageFolder tree holds one folder of images "
                             f"per class ({error})") from error
    from train.data.image_shards import is_local_url, read_classes, shard_urls

    first = shard_urls(spec)[0]
    path = Path(first).parent / "classes.json" if is_local_url(first) else None
    if path is None or not path.is_file():
        return None
    return read_classes(path)  # refuses a class named twice


def _views(spec: str, kind: str, load_size: int | None, resize: bool) -> tuple[Any, Any]:
    """(DataModule, its deterministic centre-view dataset) of a folder tree or shards: images as stored when
    `load_size` is None (the first image's size, which every image must have) or at `load_size` (stored at it,
    or resized to it when `resize`). The DataModule checks the first image's size before anything is read."""
    from train.data.transforms import ImageSizeError

    if kind == "folder":
        from train.data.images import ImageFolderDataModule

        path = Path(spec).resolve()  # "." or "tree/" have no usable name
        module = ImageFolderDataModule(str(path.parent), image_size=load_size, resize=resize, num_workers=0,
                                       train_dir=path.name, val_dir=None)
    else:
        from train.data.image_shards import ImageShardsDataModule

        module = ImageShardsDataModule(spec, image_size=load_size, resize=resize, num_workers=0)
    try:
        return module, module.views_dataset("train", "center")
    except ImageSizeError as error:
        raise ImageSizeError(f"{error}\n(for `python -m study classifier`: pass --image_size S --resize true to "
                             f"resize every image to S on reading)") from None


def _check_memory(count: int, image_size: int, what: str) -> None:
    need = count * 3 * image_size**2 * 4
    if need > MAX_IN_MEMORY_BYTES:
        raise ValueError(f"{what}: {count} images at {image_size} px need {need / 2**30:.1f} GiB as classifier "
                         f"inputs, more than the {MAX_IN_MEMORY_BYTES / 2**30:.0f} GiB this in-memory trainer "
                         f"allows; pass a smaller --image_size or train on a subset")


def _read(spec: str, load_size: int | None, image_size: int | None, resize: bool,
          what: str) -> tuple[_Labelled, list[str] | None, int]:
    """All images of a folder tree or shards as classifier inputs at `image_size` (None: as loaded); also
    the class names (None for shards without classes.json) and the size the images were loaded at."""
    from metrics.reference import data_hash
    from train.data.views import ViewsCollate

    kind = _source_kind(spec)
    classes = _classes(spec, kind)
    module, dataset = _views(spec, kind, load_size, resize)
    side = int(dataset.image_size)
    size = image_size or side
    _check_memory(len(dataset), size, what)
    loader = DataLoader(dataset, batch_size=_READ_BATCH, collate_fn=ViewsCollate(1, side))
    inputs, labels = [], []
    for batch in loader:
        # the classifier's own preprocessing, so training sees what evaluation of side-px samples will see
        inputs.append(classifier_input(batch["views"][:, 0], size))
        labels.append(batch["labels"])
    if sum(x.shape[0] for x in inputs) == 0:
        raise ValueError(f"{what} {spec}: no readable image")
    label_tensor = torch.cat(labels)
    path = str(Path(spec).resolve()) if "{" not in spec else spec
    source = {"path": path, "kind": kind, "sha256": data_hash(spec, kind), "num_images": int(label_tensor.numel()),
              "skipped_images": module.skipped_images, "loaded_size": side, "resized_on_reading": resize}
    return _Labelled(torch.cat(inputs), label_tensor, source), classes, side


def _digits(split: str, image_size: int) -> _Labelled:
    images, labels = digits.digits_split(split)  # type: ignore[arg-type]
    digest = hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()
    inputs = classifier_input(torch.from_numpy(images).permute(0, 3, 1, 2), image_size)
    source = {"path": None, "kind": "digits", "sha256": digest, "num_images": int(len(labels)),
              "loaded_size": digits.IMAGE_SIZE, "split": split}
    return _Labelled(inputs, torch.from_numpy(labels), source)


def load_classifier_data(data: ClassifierData, image_size: int | None = None,
                         seed: int = 0) -> tuple[_Labelled, _Labelled, list[str], int]:
    """(train, val, class names, classifier input size) of `data`; a held-out split is a seeded random
    `val_fraction` of `data`."""
    if image_size is not None and image_size < 8:
        raise ValueError(f"image_size must be >= 8 px or None (the data's own size), got {image_size}")
    if data.resize and image_size is None:
        raise ValueError("resize needs image_size, the side every image is resized to on reading")
    if data.data is None:
        size = image_size or digits.IMAGE_SIZE
        return _digits("train", size), _digits("val", size), [str(i) for i in range(digits.NUM_CLASSES)], size
    load_size = image_size if data.resize else None
    train, names, side = _read(data.data, load_size, image_size, data.resize, "data")
    size = image_size or side
    classes = names or [str(i) for i in range(int(train.labels.max()) + 1)]
    if len(classes) < 2:
        raise ValueError(f"data {data.data} holds one class ({classes}); a classifier needs at least two")
    if data.val is not None:
        # the val images must be stored as the training images were (or are resized alike)
        val, val_names, _ = _read(data.val, side, size, data.resize, "val")
        if (names is not None and val_names is not None and val_names != names) or int(val.labels.max()) >= len(classes):
            raise ValueError(f"val {data.val} holds other classes than data {data.data} ({(val_names or [])[:5]} "
                             f"vs {classes[:5]}): labels are positions in the class list, so both must list the "
                             f"same classes")
        return train, val, classes, size
    count = train.labels.numel()
    held_out = round(count * data.val_fraction)
    if held_out < 1 or held_out >= count:
        raise ValueError(f"val_fraction {data.val_fraction} of {count} images leaves {held_out} for validation "
                         f"and {count - held_out} for training; both need at least one (or pass --val)")
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    val_index, train_index = order[:held_out].sort().values, order[held_out:].sort().values
    split = {"val_fraction": data.val_fraction, "split_seed": seed}
    val = _Labelled(train.inputs[val_index], train.labels[val_index],
                    {**train.source, **split, "num_images": held_out})
    kept = _Labelled(train.inputs[train_index], train.labels[train_index],
                     {**train.source, **split, "num_train": count - held_out})
    return kept, val, classes, size


def _random_shift(images: torch.Tensor, max_shift: int, rng: torch.Generator) -> torch.Tensor:
    """Translate each image [N,C,H,W] by its own (dy, dx) in [-max_shift, max_shift], repeating the border
    (black for the digits, the background's colour for most other data)."""
    if max_shift == 0:
        return images
    n, _, h, w = images.shape
    padded = F.pad(images, (max_shift,) * 4, mode="replicate")
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, n), generator=rng)
    rows = dy[:, None] + torch.arange(h)[None]  # [N,H]
    cols = dx[:, None] + torch.arange(w)[None]  # [N,W]
    batch = torch.arange(n)[:, None, None]
    # Advanced indexing with the channel slice in the middle puts channels last: [N,H,W,C].
    return padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def _check_arch(classifier: DomainClassifier, image_size: int) -> None:
    """A forward pass on two blank inputs, so an arch that cannot take `image_size` px fails before training."""
    try:
        with torch.no_grad():
            classifier.eval()(torch.zeros(2, 3, image_size, image_size))
    except (RuntimeError, AssertionError, ValueError) as error:  # timm asserts on fixed input sizes
        raise ValueError(f"classifier arch {classifier.config.arch!r} does not take {image_size} px inputs "
                         f"({error}); use arch {RESNET!r} (sized to the image) or another image_size") from error


def train_domain_classifier(out_dir: str | Path, data: ClassifierData = ClassifierData(),
                            training: ClassifierTraining = ClassifierTraining(), image_size: int | None = None,
                            arch: str = RESNET, width: int = 16) -> Path:
    """Train on `data`, save into `out_dir`, return the weights path.

    Deterministic for a seed on a given machine and thread count: the initial weights, the split, the
    shuffling and the augmentation all come from `training.seed`; the caller's global RNG is left untouched.
    """
    start = time.perf_counter()
    sized_config(image_size or 16, 2, arch, width)  # bad arch/width/size: fail before reading any image
    train, val, classes, size = load_classifier_data(data, image_size, training.seed)
    config = sized_config(size, len(classes), arch, width)
    with torch.random.fork_rng(devices=[]):  # module init draws from the global RNG; keep the caller's
        torch.manual_seed(training.seed)
        classifier = DomainClassifier(config)
    _check_arch(classifier, size)
    max_shift = training.max_shift if training.max_shift is not None else max(1, size // 16)
    rng = torch.Generator().manual_seed(training.seed)
    x, y = train.inputs, train.labels
    steps_per_epoch = -(-x.shape[0] // training.batch_size)
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=training.lr, weight_decay=training.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=training.lr,
                                                   total_steps=training.epochs * steps_per_epoch)
    classifier.train()
    for _ in range(training.epochs):
        order = torch.randperm(x.shape[0], generator=rng)
        for start_index in range(0, x.shape[0], training.batch_size):
            index = order[start_index:start_index + training.batch_size]
            batch = _random_shift(x[index], max_shift, rng)
            if training.flip:
                flipped = torch.rand(batch.shape[0], generator=rng) < 0.5
                batch = torch.where(flipped[:, None, None, None], batch.flip(-1), batch)
            if batch.shape[0] > 1:  # batch norm cannot normalise a single image in training mode
                loss = F.cross_entropy(classifier.head(classifier.features_of_input(batch)), y[index],
                                       label_smoothing=training.label_smoothing)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            schedule.step()  # every planned step, so the one-cycle schedule ends where it was planned to
    classifier.eval()
    val_accuracy = class_accuracy(classifier, val.inputs, val.labels)
    settings = {**asdict(training), "max_shift": max_shift, "arch": arch, "width": width,
                "num_threads": torch.get_num_threads(), "seconds": round(time.perf_counter() - start, 2)}
    extra = {"classes": classes, "data": train.source, "val": val.source, "train": settings,
             "val_accuracy": val_accuracy}
    return save_domain_classifier(classifier, out_dir, extra)


def train_classifier(out: str = "runs/demo/domain_classifier", data: str | None = None, val: str | None = None,
                     val_fraction: float = ClassifierData.val_fraction, image_size: int | None = None,
                     epochs: int = ClassifierTraining.epochs, seed: int = ClassifierTraining.seed,
                     batch_size: int = ClassifierTraining.batch_size, lr: float = ClassifierTraining.lr,
                     arch: str = RESNET, width: int = 16, flip: bool = ClassifierTraining.flip,
                     resize: bool = ClassifierData.resize) -> float:
    """Train the domain classifier into `out`, print where it went and its val accuracy, and return that.

    Args:
        out: directory for model.safetensors + config.json.
        data: an ImageFolder tree (class sub-folders) or image shards (folder of .tar, one .tar or a brace
            pattern); None: the embedded digits.
        val: validation images in the format and with the classes of `data`; None: hold out `val_fraction`.
        val_fraction: share of `data` held out for validation (chosen with `seed`) when `val` is None.
        image_size: the classifier's input size; None: the data's own size (16 for the digits). Images of
            other sizes, at training and at evaluation, are resized to it (bilinear, antialiased).
        epochs: passes over the training images.
        seed: seeds the initial weights, the split, the shuffling and the augmentation.
        batch_size: images per optimiser step.
        lr: peak learning rate (AdamW, one-cycle schedule); a few hundred images take few steps and
            learn faster at about 1e-2.
        arch: `resnet` (timm's ResNet sized to image_size) or a timm model name.
        width: channels of the first ResNet stage (doubled at each of the next three).
        flip: random horizontal flips (for data whose mirror images keep their class).
        resize: resize images to image_size when reading them (needed for data stored at mixed sizes);
            False: every image must be stored at the first one's square size.
    """
    weights = train_domain_classifier(out, ClassifierData(data, val, val_fraction, resize),
                                      ClassifierTraining(epochs=epochs, seed=seed, batch_size=batch_size, lr=lr,
                                                         flip=flip), image_size=image_size, arch=arch, width=width)
    meta = json.loads((weights.parent / CONFIG_NAME).read_text())
    config = meta["config"]
    print(f"{weights}: val accuracy {meta['val_accuracy']:.4f} on {meta['val']['num_images']} images "
          f"({len(meta['classes'])} classes, {config['image_size']} px, {epochs} epochs, "
          f"{meta['train']['seconds']} s)")
    return meta["val_accuracy"]


__all__ = ["ClassifierData", "ClassifierTraining", "MAX_IN_MEMORY_BYTES", "load_classifier_data",
           "train_domain_classifier", "train_classifier"]
