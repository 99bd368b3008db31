"""Security, part 2: files whose unpickling would run code never do.

LlamaGen `.pt` loaders and a `--ckpt_path` resume through `train.cli` refuse a file whose unpickling
would create a marker file (it is never created), while argparse.Namespace + tensors still load.
Token- and image-shard readers read every sample of a shard whose samples also carry malicious
`.pyd`/`.pth`/`.pickle` members, and never open those members. The source scan is `test_security_scan.py`.
"""

from __future__ import annotations

import argparse
import io
import json
import pickle
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

REPO = Path(__file__).resolve().parents[2]


# --- checkpoints: a pickle that would run code is refused ---------------------------------------------------

class _Payload:
    """Unpickling this calls `open(marker, 'w')`: harmless proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    """A path that only the payload's code would create; checks first that the payload really creates it."""
    path = tmp_path / "code-ran"
    call, args = _Payload(path).__reduce__()
    call(*args).close()
    assert path.is_file()
    path.unlink()
    return path


def _loaders():
    from engram_vision.checkpoint import load_any_gpt, load_llamagen_gpt
    from tokenizers_vq.checkpoint import load_llamagen_vq, load_tokenizer
    from tokenizers_vq.files import safe_torch_load

    return {"safe_torch_load": safe_torch_load,
            "load_llamagen_vq": lambda p: load_llamagen_vq(p, "vq-tiny"),
            "load_tokenizer": lambda p: load_tokenizer(p, "vq-tiny"),
            "load_llamagen_gpt": lambda p: load_llamagen_gpt(p, "gpt-tiny"),
            "load_any_gpt": lambda p: load_any_gpt(p, "gpt-tiny")}


@pytest.mark.parametrize("loader", ["safe_torch_load", "load_llamagen_vq", "load_tokenizer",
                                    "load_llamagen_gpt", "load_any_gpt"])
def test_llamagen_loaders_refuse_code_in_the_pickle(loader: str, marker: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # as torch < 2.6: only an explicit flag helps
    path = tmp_path / "c2i_evil.pt"
    torch.save({"model": {"tok_embeddings.weight": torch.zeros(2, 2)}, "args": _Payload(marker)}, path)
    with pytest.raises(pickle.UnpicklingError):
        _loaders()[loader](path)
    assert not marker.exists()


def test_safe_torch_load_allows_namespace_and_tensors_only(tmp_path: Path) -> None:
    from tokenizers_vq.files import safe_torch_load

    path = tmp_path / "vq_ds16_c2i.pt"
    weights = {"encoder.conv_in.weight": torch.randn(4, 3, 3, 3)}
    torch.save({"model": weights, "steps": 7, "args": argparse.Namespace(vq_model="VQ-16", lr=1e-4)}, path)
    payload = safe_torch_load(path)
    assert payload["args"] == argparse.Namespace(vq_model="VQ-16", lr=1e-4) and payload["steps"] == 7
    assert torch.equal(payload["model"]["encoder.conv_in.weight"], weights["encoder.conv_in.weight"])
    # The allow-list is argparse.Namespace alone: a harmless look-alike class is refused too.
    torch.save({"model": weights, "args": types.SimpleNamespace(vq_model="VQ-16")}, path)
    with pytest.raises(pickle.UnpicklingError):
        safe_torch_load(path)


@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter", "ignore:Experiment logs directory")
def test_cli_resume_refuses_code_in_the_checkpoint(marker: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from train.cli import run_stage, with_safe_loading

    assert with_safe_loading(["fit", "-c", "a.yml"]) == ["fit", "--weights_only=true", "-c", "a.yml"]
    assert with_safe_loading(["--help"]) == ["--help"]
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # what Lightning's default None would read
    # `--ckpt_path last`, as study/runner.py and study/demo.py resume: LightningCLI does not pre-read this one
    # (it does read an explicit file, with weights_only=True), so only trainer.fit's weights_only guards it.
    run_dir = tmp_path / "vq"
    (run_dir / "checkpoints").mkdir(parents=True)
    torch.save({"state_dict": {}, "callbacks": _Payload(marker)}, run_dir / "checkpoints" / "last.ckpt")
    args = ["fit", "--config", str(REPO / "configs/vq/digits.yaml"), "--trainer.logger.init_args.save_dir",
            str(run_dir), "--trainer.max_epochs", "1", "--model.tokenizer.base_channels", "8",
            "--model.tokenizer.norm_groups", "4", "--model.tokenizer.z_channels", "8", "--ckpt_path", "last"]
    with pytest.raises(pickle.UnpicklingError):
        run_stage("tokenizer", args)
    assert not marker.exists()


# --- shards: pickle members are never opened ----------------------------------------------------------------

N = 6  # samples per test shard


def _evil_members(marker: Path) -> dict[str, bytes]:
    pth = io.BytesIO()
    torch.save({"weights": torch.zeros(1), "payload": _Payload(marker)}, pth)
    blob = pickle.dumps(_Payload(marker))
    return {"pyd": blob, "pickle": blob, "pth": pth.getvalue()}


def _write_shard(path: Path, samples: list[dict[str, bytes]]) -> None:
    with wds.TarWriter(str(path), encoder=False) as sink:
        for i, sample in enumerate(samples):
            sink.write({"__key__": f"{i:09d}", **sample})


def test_token_shard_readers_skip_pickle_members(marker: Path, tmp_path: Path) -> None:
    from train.data.tokens import FORMAT, TokenShardsDataModule, read_token_set, token_histogram

    rng = np.random.default_rng(0)
    codes = rng.integers(0, 16, (N, 2, 2, 2), dtype=np.int16)  # [N, views, h, w]
    labels = [i % 2 for i in range(N)]
    samples = []
    for c, label in zip(codes, labels, strict=True):
        buffer = io.BytesIO()
        np.save(buffer, c, allow_pickle=False)
        samples.append({"tokens.npy": buffer.getvalue(), "cls": str(label).encode(), **_evil_members(marker)})
    _write_shard(tmp_path / "val-000000.tar", samples)
    (tmp_path / "meta.json").write_text(json.dumps({
        "format": FORMAT, "codebook_size": 16, "num_classes": 2, "grid": [2, 2], "num_samples": N,
        "num_views": 2, "dtype": "int16", "weights_sha256": "0" * 64}))  # fmt: skip
    view0 = torch.from_numpy(codes[:, 0].reshape(N, 4).astype(np.int64))

    data = TokenShardsDataModule(str(tmp_path), str(tmp_path), batch_size=N, num_workers=0, shuffle_buffer=0,
                                 resampled=False)  # fmt: skip
    tokens, got_labels = next(iter(data.train_dataloader()))
    assert tokens.shape == (N, 4) and sorted(got_labels.tolist()) == sorted(labels)
    (val_tokens, val_labels), = list(data.val_dataloader())
    assert torch.equal(val_tokens, view0) and val_labels.tolist() == labels
    set_tokens, set_labels = read_token_set(str(tmp_path))
    assert torch.equal(set_tokens, view0) and set_labels.tolist() == labels
    assert np.array_equal(token_histogram(str(tmp_path)), np.bincount(codes.reshape(-1), minlength=16))
    assert not marker.exists()


def test_image_shard_readers_skip_pickle_members(marker: Path, tmp_path: Path) -> None:
    from train.data.image_shards import ImageShardsDataModule

    rng = np.random.default_rng(0)
    labels = [i % 2 for i in range(N)]
    samples = []
    for label in labels:
        jpg = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(jpg, format="JPEG", quality=95)
        samples.append({"jpg": jpg.getvalue(), "cls": str(label).encode(), **_evil_members(marker)})
    _write_shard(tmp_path / "train-000000.tar", samples)
    data = ImageShardsDataModule(train_shards=str(tmp_path), val_shards=str(tmp_path), image_size=8,
                                 batch_size=N, num_workers=0, shuffle_buffer=0, train_crop="center",
                                 flip=False, num_classes=2)  # fmt: skip
    for loader in (data.train_dataloader(), data.val_dataloader()):
        (images, got_labels), = list(loader)
        assert images.shape == (N, 3, 8, 8) and sorted(got_labels.tolist()) == sorted(labels)
    views = data.views_dataset("val", "center")  # train.data.views.TarViews: random access into the tar
    items = [views[i] for i in range(len(views))]
    assert [i for i, _, _ in items] == list(range(N)) and [label for _, _, label in items] == labels
    assert all(v is not None and v.shape == (1, 3, 8, 8) for _, v, _ in items)
    assert data.skipped_images == 0 and not marker.exists()
