"""Shared pytest fixtures: the LlamaGen reference vectors, deterministic torch settings, and the factories
many tests share (small random GPTs, a random saved tokenizer, token shards written without a tokenizer, a
seeded fake feature extractor).

Factories are session-scoped fixtures that return plain functions, so module-scoped fixtures can use them
and a test can build as many models or shard folders as it needs.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from engram_vision.config import EngramConfig, ModelConfig, model_config
from engram_vision.model import EngramGPT
from metrics.features import FeatureExtractor, register_extractor
from tokenizers_vq import VQModel, vq_config
from tokenizers_vq.checkpoint import save_vq

# A copy of LlamaGen's reference data (made by running LlamaGen with random weights; no LlamaGen code),
# kept in the repo so a clean CI clone always checks compatibility instead of skipping.
REFERENCE = Path(__file__).resolve().parent / "reference" / "llamagen"

TINY_ENGRAM = EngramConfig(layers=(0, 1), heads_per_order=2, head_dim=8, rows_per_head=31, conv_dilation=2)


@pytest.fixture
def reference_dir() -> Path:
    """tests/reference/llamagen: LlamaGen's key/shape table and random-weight test vectors."""
    assert REFERENCE.is_dir(), f"LlamaGen reference vectors missing at {REFERENCE}"
    return REFERENCE


@pytest.fixture(autouse=True)
def _seed_and_threads() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module (tiny convolutions run fastest so, and some CPU quotas make two
    threads crawl); the previous count is restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """GPU-marked tests skip without CUDA instead of failing."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# ------------------------------------------------------------------------------------------ small models


@pytest.fixture(scope="session")
def tiny_engram() -> EngramConfig:
    """Two Engram layers with small tables (31 rows per head) and a dilated conv: every path is exercised."""
    return TINY_ENGRAM


def _tiny_config(engram: EngramConfig | None = TINY_ENGRAM, **overrides) -> ModelConfig:
    return model_config("gpt-tiny", engram=engram, **overrides)


def _random_model(config: ModelConfig, seed: int = 0) -> EngramGPT:
    """EngramGPT in eval mode whose zero-initialised parts (head, conv) are random, so every path matters."""
    torch.manual_seed(seed)
    model = EngramGPT(config).eval()
    with torch.no_grad():
        torch.nn.init.normal_(model.output.weight, std=0.5)
        for memory in model.engram_layers():
            if memory.config.use_conv:
                torch.nn.init.normal_(memory.conv.weight, std=0.3)
    return model


@pytest.fixture(scope="session")
def tiny_config() -> Callable[..., ModelConfig]:
    """`tiny_config(engram=TINY_ENGRAM, **overrides)`: the gpt-tiny config with that memory (None: baseline)."""
    return _tiny_config


@pytest.fixture(scope="session")
def random_model() -> Callable[..., EngramGPT]:
    """`random_model(config, seed=0)`: a seeded EngramGPT in eval mode with random head and conv weights."""
    return _random_model


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random vq-tiny tokenizer saved as a model folder (seeded, so every module gets the same one)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tok")
    save_vq(VQModel(vq_config("vq-tiny")), path)
    return path


# ------------------------------------------------------------------------------------------ token shards


def _token_shards(folder: Path, codes: list[np.ndarray], labels: list[int], codebook: int = 16,
                  num_classes: int = 4, grid: tuple[int, int] = (4, 4)) -> Path:
    """Token shards as `train.prepare.extract_tokens` writes them: one tar (key = index) and meta.json."""
    folder.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(folder / "tok-000000.tar"), encoder=False) as sink:
        for index, (tokens, label) in enumerate(zip(codes, labels, strict=True)):
            buffer = io.BytesIO()
            np.save(buffer, tokens.astype(np.int16), allow_pickle=False)
            sink.write({"__key__": f"{index:09d}", "tokens.npy": buffer.getvalue(), "cls": str(label).encode()})
    meta = {"format": "engram-vision-tokens", "codebook_size": codebook, "num_classes": num_classes,
            "grid": list(grid), "num_samples": len(codes), "num_views": 1, "dtype": "int16",
            "shards": [{"name": "tok-000000.tar", "first_index": 0, "num_samples": len(codes)}]}  # fmt: skip
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def _constant_codes(n: int, grid: tuple[int, int] = (4, 4)) -> list[np.ndarray]:
    return [np.full((1, *grid), i % 16) for i in range(n)]


@pytest.fixture(scope="session")
def token_shards() -> Callable[..., Path]:
    """`token_shards(folder, codes, labels, codebook=16, num_classes=4, grid=(4, 4))`: one tar + meta.json."""
    return _token_shards


@pytest.fixture(scope="session")
def constant_codes() -> Callable[..., list[np.ndarray]]:
    """`constant_codes(n, grid=(4, 4))`: n single-view code grids, image i filled with i % 16."""
    return _constant_codes


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
        x = torch.nn.functional.adaptive_avg_pool2d(images.float() / 255.0, 4).flatten(1)
        feats = torch.tanh(x @ self.w_feat)
        return feats, feats @ self.w_logit


@pytest.fixture(scope="session")
def fake_extractor() -> type[FakeExtractor]:
    """Registers `FakeExtractor` as "fake-test" for `build_extractor` (so no test loads the real Inception)
    and returns the class (`.calls` counts its forward passes)."""
    register_extractor("fake-test", FakeExtractor, overwrite=True)
    return FakeExtractor


REPO = Path(__file__).resolve().parents[1]
SUBPROCESS_ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
"""Environment of the commands the kill-and-resume tests start: the checkout importable, one thread each."""


def _kill_when(cmd: list[str], ready: Callable[[], bool], log: Path, timeout: float = 60.0,
               poll: float = 0.01) -> None:
    """Run `cmd`, SIGKILL it as soon as `ready()` holds; fail if it ends by itself first."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=SUBPROCESS_ENV, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        try:
            while not ready():
                assert proc.poll() is None, f"ended (rc {proc.returncode}) before the kill:\n{log.read_text()[-3000:]}"
                assert time.monotonic() < deadline, f"no progress in {timeout} s:\n{log.read_text()[-3000:]}"
                time.sleep(poll)
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            if proc.poll() is None:  # a failed assertion above: do not leave it running
                proc.kill()
            proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, log.read_text()[-3000:]


@pytest.fixture(scope="session")
def kill_when() -> Callable[..., None]:
    """`kill_when(cmd, ready, log, timeout=60, poll=0.01)`: start a command and SIGKILL it mid-phase."""
    return _kill_when
