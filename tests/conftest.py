"""Shared pytest fixtures: paths to the LlamaGen reference vectors and deterministic torch settings."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

# A copy of ../shared/reference/llamagen (data made by running LlamaGen with random weights; no LlamaGen
# code), kept in the repo so a clean CI clone always checks compatibility instead of skipping.
REFERENCE = Path(__file__).resolve().parent / "reference" / "llamagen"


@pytest.fixture
def reference_dir() -> Path:
    """tests/reference/llamagen: LlamaGen's key/shape table and random-weight test vectors."""
    assert REFERENCE.is_dir(), f"LlamaGen reference vectors missing at {REFERENCE}"
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
