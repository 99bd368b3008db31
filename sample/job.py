"""A sampling job's plan: which global image indices exist, their labels, their batches and seeds, and
which are already on disk, so an interrupted or multi-GPU run yields exactly N images, each once.

Image i belongs to batch i // batch_size; batch k draws from a generator seeded by (seed, k), so the
images depend on (model, seed, batch_size, settings) but not on the number of devices or on restarts.
Running the batches is `sample/__main__.py`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

LabelScheme = Literal["uniform", "balanced"]


def image_path(out: Path, index: int) -> Path:
    return out / "images" / f"{index:06d}.png"


def plan_labels(num_samples: int, num_classes: int, scheme: LabelScheme, seed: int) -> torch.Tensor:
    """int64 [N]: uniform at random (LlamaGen's FID protocol) or class-balanced (i % C, shuffled)."""
    generator = torch.Generator().manual_seed(seed)
    if scheme == "uniform":
        return torch.randint(0, num_classes, (num_samples,), generator=generator)
    if scheme == "balanced":
        return (torch.arange(num_samples) % num_classes)[torch.randperm(num_samples, generator=generator)]
    raise ValueError(f"label scheme must be 'uniform' or 'balanced', got {scheme!r}")


def batch_seed(seed: int, batch: int) -> int:
    """A 63-bit seed per batch, stable across processes and machines."""
    digest = hashlib.sha256(f"engram-vision-sample:{seed}:{batch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@dataclass(frozen=True)
class SamplePlan:
    """The fixed partition of N images into batches."""

    num_samples: int
    batch_size: int

    def __post_init__(self) -> None:
        for name in ("num_samples", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"SamplePlan.{name} must be >= 1, got {getattr(self, name)}")

    @property
    def num_batches(self) -> int:
        return -(-self.num_samples // self.batch_size)

    def indices(self, batch: int) -> range:
        start = batch * self.batch_size
        return range(start, min(start + self.batch_size, self.num_samples))

    def pending(self, out: Path, rank: int = 0, world_size: int = 1) -> list[int]:
        """This rank's batches (k % world_size == rank) with at least one image missing on disk."""
        return [k for k in range(rank, self.num_batches, world_size)
                if not all(image_path(out, i).is_file() for i in self.indices(k))]
