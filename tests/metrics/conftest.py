"""Fixtures shared by the metrics tests: a tiny fake feature extractor registered as "fake-test" (so no test
loads the real Inception), and the digits classifier that stands in for Inception on the embedded data set.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from metrics.features import FeatureExtractor, register_extractor
from study.domain_classifier import train_domain_classifier


class FakeExtractor(FeatureExtractor):
    """4x4 average pool -> fixed random projections: features [N,8], logits [N,5]. Counts forward calls."""

    name = "fake-test"
    weights_sha256 = "0" * 64
    calls = 0

    def __init__(self, weights: str | None = None, device: str = "cpu", batch_size: int = 16) -> None:
        super().__init__(device, batch_size)
        g = torch.Generator().manual_seed(1)
        self.w_feat = torch.randn(48, 8, generator=g)
        self.w_logit = torch.randn(8, 5, generator=g)

    def _forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        type(self).calls += 1
        x = F.adaptive_avg_pool2d(images.float() / 255.0, 4).flatten(1)
        feats = torch.tanh(x @ self.w_feat)
        return feats, feats @ self.w_logit


@pytest.fixture(scope="session")
def fake_extractor() -> type[FakeExtractor]:
    """Registers `FakeExtractor` as "fake-test" for `build_extractor` and returns the class (`.calls` counts
    its forward passes)."""
    register_extractor("fake-test", FakeExtractor, overwrite=True)
    return FakeExtractor


@pytest.fixture(scope="session")
def digits_classifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits classifier trained once per session on CPU (about 10 s, seed 0): its model.safetensors."""
    return train_domain_classifier(tmp_path_factory.mktemp("domain") / "classifier", seed=0)
