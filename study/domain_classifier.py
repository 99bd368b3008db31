"""Training the digits domain classifier that `metrics.domain` turns into a feature extractor.

Plain torch on `digits_split("train")` with small random shifts, deterministically for a seed; saved with
its training settings and val accuracy in `config.json` (`python -m study classifier --out DIR`). The
network, its file format and its use as an extractor are `metrics.domain`; the data `train.data.digits`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from metrics.domain import DigitsClassifier, DomainClassifierConfig, class_accuracy, save_domain_classifier
from tokenizers_vq.files import CONFIG_NAME
from train.data.digits import digits_split


def _to_nchw(images_nhwc: Any) -> torch.Tensor:
    return torch.as_tensor(images_nhwc).permute(0, 3, 1, 2).contiguous()


def _random_shift(images: torch.Tensor, max_shift: int, rng: torch.Generator) -> torch.Tensor:
    """Translate each image [N,C,H,W] by its own (dy, dx) in [-max_shift, max_shift], filling with the
    minimum value (black background, as in the digits)."""
    n, _, h, w = images.shape
    fill = float(images.min())
    padded = F.pad(images, (max_shift,) * 4, value=fill)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, n), generator=rng)
    rows = dy[:, None] + torch.arange(h)[None]  # [N,H]
    cols = dx[:, None] + torch.arange(w)[None]  # [N,W]
    batch = torch.arange(n)[:, None, None]
    # Advanced indexing with the channel slice in the middle puts channels last: [N,H,W,C].
    return padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def train_domain_classifier(out_dir: str | Path, epochs: int = 12, seed: int = 0, batch_size: int = 64,
                            lr: float = 2e-3, max_shift: int = 2,
                            config: DomainClassifierConfig = DomainClassifierConfig()) -> Path:
    """Train on the digits train split, save into `out_dir`, return the weights path.

    Deterministic for a seed on a given machine and thread count: the initial weights, the shuffling and
    the shifts all come from `seed`, and the caller's global RNG is left untouched.
    """
    start = time.perf_counter()
    train_images, train_labels = digits_split("train")
    x, y = _to_nchw(train_images), torch.as_tensor(train_labels)
    with torch.random.fork_rng(devices=[]):  # module init draws from the global RNG; keep the caller's
        torch.manual_seed(seed)
        classifier = DigitsClassifier(config)
    rng = torch.Generator().manual_seed(seed)
    steps_per_epoch = -(-x.shape[0] // batch_size)
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch)
    # No dropout or norm layers, so train/eval mode never changes the outputs.
    for _ in range(epochs):
        order = torch.randperm(x.shape[0], generator=rng)
        for start_index in range(0, x.shape[0], batch_size):
            index = order[start_index:start_index + batch_size]
            batch = _random_shift(classifier.preprocess(x[index]), max_shift, rng)
            # label smoothing keeps logits moderate, so IS and softmax confidences are not saturated
            loss = F.cross_entropy(classifier.head(classifier.body(batch)), y[index], label_smoothing=0.05)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    val_images, val_labels = digits_split("val")
    val_accuracy = class_accuracy(classifier, _to_nchw(val_images), torch.as_tensor(val_labels))
    train = {"epochs": epochs, "seed": seed, "batch_size": batch_size, "lr": lr, "max_shift": max_shift,
             "seconds": round(time.perf_counter() - start, 2)}
    return save_domain_classifier(classifier, out_dir, {"train": train, "val_accuracy": val_accuracy})


def train_classifier(out: str = "runs/demo/domain_classifier", epochs: int = 12, seed: int = 0) -> float:
    """Train the domain classifier into `out` and print where it went and its val accuracy.

    Args:
        out: directory for model.safetensors + config.json.
        epochs: passes over the 1500 training digits.
        seed: seeds the initial weights, shuffling and shifts.
    """
    weights = train_domain_classifier(out, epochs=epochs, seed=seed)
    meta = json.loads((weights.parent / CONFIG_NAME).read_text())
    print(f"{weights}: val accuracy {meta['val_accuracy']:.4f} ({epochs} epochs, {meta['train']['seconds']} s)")
    return meta["val_accuracy"]
