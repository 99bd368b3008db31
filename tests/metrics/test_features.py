"""Tests for `metrics.features`: the Inception wrapper (missing weights name the file and where to get it;
an explicit weights file loads without a download) and the domain-classifier plugin found by name (also under
its deprecated name digits-classifier).

Never downloads Inception: the weights file holds a random-weight network built here.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from metrics.features import INCEPTION_WEIGHTS_FILE, available_extractors, build_extractor


def _images(n: int, seed: int, size: int = 8) -> np.ndarray:
    """uint8 [N,H,W,3] (ADM layout)."""
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_missing_inception_weights_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError, match=INCEPTION_WEIGHTS_FILE) as err:
        build_extractor("inception-v3-compat")
    assert "hub" in str(err.value) and "https://github.com/toshas/torch-fidelity/releases" in str(err.value)
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        build_extractor("inception-v3-compat", weights=str(tmp_path / "nowhere.pth"))


def test_inception_wrapper_uses_explicit_weights_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Random-weight Inception saved to a file: the wrapper loads it (no download) and gives 2048-d features."""
    import torch_fidelity.feature_extractor_inceptionv3 as tf_incv3

    with monkeypatch.context() as patch:  # build the architecture once without any weights to make a file
        patch.setattr(tf_incv3.torch, "load", lambda *a, **k: None)
        patch.setattr(tf_incv3.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
        net = tf_incv3.FeatureExtractorInceptionV3("x", ["2048"], feature_extractor_weights_path="unused")
    weights = tmp_path / INCEPTION_WEIGHTS_FILE
    torch.save(net.state_dict(), weights)
    fx = build_extractor("inception-v3-compat", weights=str(weights), batch_size=2)
    feats, logits = fx.features_and_logits(torch.from_numpy(_images(3, 6, size=32)).permute(0, 3, 1, 2))
    assert feats.shape == (3, 2048) and logits.shape == (3, 1008)
    assert len(fx.weights_sha256) == 64


@pytest.mark.parametrize("name", ["domain-classifier", "digits-classifier"])
def test_domain_extractor_is_found_by_name_in_a_fresh_process(name: str) -> None:
    assert name in available_extractors()
    code = ("from metrics.features import build_extractor\n"
            f"try:\n    build_extractor({name!r}, weights=None)\n"
            "except FileNotFoundError as e:\n    print('missing-weights:', e)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    # Reaching the missing-weights error (not 'unknown feature extractor') means the plugin was imported.
    assert "missing-weights:" in result.stdout and "python -m study classifier" in result.stdout, result.stderr
    assert "'domain-classifier' extractor needs weights" in result.stdout
