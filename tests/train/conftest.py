"""Fixtures shared by the training tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tokenizers_vq import VQModel, vq_config
from tokenizers_vq.checkpoint import save_vq


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random vq-tiny tokenizer saved as a model folder (seeded, so every module gets the same one)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tok")
    save_vq(VQModel(vq_config("vq-tiny")), path)
    return path
