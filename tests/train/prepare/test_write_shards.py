"""Tests for `train.prepare.write_shards`: an ImageFolder tree -> webdataset image shards (layout, skipped
corrupt files, JPEG bytes kept), a rerun through `python -m train.prepare shards` that rewrites nothing, and
crash recovery that resumes to byte-identical shards.

CPU only and fast: the tree and its shards are the `tree` fixture of tests/train/conftest.py.
"""

from __future__ import annotations

import importlib
import json
import tarfile
from pathlib import Path

import pytest

from train.data.images import CorruptImageWarning

ws = importlib.import_module("train.prepare.write_shards")  # the module, to patch what its functions call
prepare_main = importlib.import_module("train.prepare.__main__").main


def test_write_shards_layout(tree: dict) -> None:
    summary, shards = tree["summary"], tree["shards"]
    assert summary["num_shards"] == 3 and summary["shards_written"] == 3  # 12 files / 4
    assert summary["num_samples"] == 10 and summary["num_skipped"] == 2
    assert sorted(Path(p).name for p in summary["skipped"]) == ["corrupt.jpg", "truncated.jpg"]
    assert json.loads((shards / "classes.json").read_text()) == {"0": "cat", "1": "dog"}
    assert sorted(p.name for p in shards.glob("*.tar")) == [f"train-00000{k}.tar" for k in range(3)]
    assert not list(shards.glob("*.tmp"))
    names = [m for k in range(3) for m in tarfile.open(shards / f"train-00000{k}.tar").getnames()]
    keys = sorted({n.split(".")[0] for n in names})
    # In sorted order global index 0 is cat/corrupt.jpg and 11 is dog/truncated.jpg: both absent.
    assert keys == [f"{i:09d}" for i in range(1, 11)]
    with tarfile.open(shards / "train-000000.tar") as tar:  # JPEG originals are stored byte for byte
        assert tar.extractfile("000000001.jpg").read() == (tree["split"] / "cat" / "img0.jpg").read_bytes()


def test_write_shards_rerun_and_crash_recovery(tree: dict, tmp_path: Path, monkeypatch, capsys) -> None:
    shards = tree["shards"]
    before = {p.name: p.stat().st_mtime_ns for p in shards.iterdir()}
    # Rerun through the command-line parser: nothing is rewritten or duplicated.
    summary = prepare_main(["shards", "--root", str(tree["split"]), "--out", str(shards), "--shard_size", "4"])
    assert "0 written, 3 already complete" in capsys.readouterr().out
    assert (summary["shards_written"], summary["shards_reused"], summary["num_samples"]) == (0, 3, 10)
    assert summary["num_skipped"] == 2  # from the per-shard summaries, without re-reading the images
    assert {p.name: p.stat().st_mtime_ns for p in shards.iterdir()} == before

    # A crash in the middle of shard 1 leaves shard 0 complete and no partial file behind.
    calls = {"n": 0}
    real = ws.encode_jpeg

    def crashing(path, quality=95):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return real(path, quality)

    monkeypatch.setattr(ws, "encode_jpeg", crashing)
    out = tmp_path / "again"
    with pytest.raises(KeyboardInterrupt), pytest.warns(CorruptImageWarning):
        ws.write_shards(root=str(tree["split"]), out=str(out), shard_size=4)
    assert sorted(p.name for p in out.glob("*.tar*")) == ["train-000000.tar"]
    monkeypatch.setattr(ws, "encode_jpeg", real)
    with pytest.warns(CorruptImageWarning):
        summary = ws.write_shards(root=str(tree["split"]), out=str(out), shard_size=4)
    assert (summary["shards_written"], summary["shards_reused"], summary["num_samples"]) == (2, 1, 10)
    for k in range(3):  # fixed member mtimes: the resumed shards equal the uninterrupted ones byte for byte
        assert (out / f"train-00000{k}.tar").read_bytes() == (shards / f"train-00000{k}.tar").read_bytes()
    with pytest.raises(ValueError, match="shard_size"):
        ws.write_shards(root=str(tree["split"]), out=str(out), shard_size=5)
