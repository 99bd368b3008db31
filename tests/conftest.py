"""Shared pytest fixtures: paths to the LlamaGen reference vectors and deterministic torch settings."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO.parent / "shared" / "reference" / "llamagen"


@pytest.fixture
def reference_dir() -> Path:
    """../shared/reference/llamagen; tests that need it skip (with the reason) when a checkout lacks it."""
    if not REFERENCE.is_dir():
        pytest.skip(f"LlamaGen reference vectors not found at {REFERENCE}")
    return REFERENCE


@pytest.fixture(autouse=True)
def _seed_and_threads() -> None:
    torch.manual_seed(0)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """GPU-marked tests skip without CUDA instead of failing."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
