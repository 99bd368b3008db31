"""`python tests/study/study_command.py run --config STUDY.yaml`: `python -m study` with one more feature
extractor registered, `fake-subprocess` (a fixed random projection of 4x4-pooled pixels, like the test
suite's `fake-test`), so tests can run and kill a whole study in a subprocess without Inception weights.
"""

from __future__ import annotations

import sys

import torch

from metrics.features import FeatureExtractor, register_extractor
from study.__main__ import main


class SubprocessExtractor(FeatureExtractor):
    """4x4 average pool -> fixed random projections: features [N,8], logits [N,10]."""

    name = "fake-subprocess"
    weights_sha256 = "1" * 64

    def __init__(self, weights: str | None = None, device: str = "cpu", batch_size: int = 16) -> None:
        super().__init__(device, batch_size)
        g = torch.Generator().manual_seed(1)
        self.w_feat = torch.randn(48, 8, generator=g)
        self.w_logit = torch.randn(8, 10, generator=g)

    def _forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.nn.functional.adaptive_avg_pool2d(images.float() / 255.0, 4).flatten(1)
        feats = torch.tanh(x @ self.w_feat)
        return feats, feats @ self.w_logit


if __name__ == "__main__":
    register_extractor(SubprocessExtractor.name, SubprocessExtractor, overwrite=True)
    main(sys.argv[1:])
