"""Tests for token extraction (`train.prepare.extract_tokens`): images -> token shards and meta.json.

CPU only. The tokenizer is a random vq-tiny saved with `save_vq`: its codes are whatever they are, so every
check compares against `tokenizer.encode` on the same views. Covers the centre + flip and ten-crop views,
corrupt images, the command line, resuming an interrupted run, and real 2-process DDP (gloo).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback
from PIL import Image

from tokenizers_vq import vq_config
from tokenizers_vq.checkpoint import load_tokenizer
from tokenizers_vq.files import file_sha256
from train.data.digits import digits_split
from train.data.image_shards import ImageShardsDataModule
from train.data.images import DigitsDataModule, ImageFolderDataModule
from train.data.transforms import CorruptImageWarning, ImageSizeError, center_crop_arr
from train.data.views import DigitsViews
from train.prepare.__main__ import main
from train.prepare.extract_tokens import extract_tokens
from train.prepare.write_shards import write_shards

REPO = Path(__file__).resolve().parents[3]
CPU = {"accelerator": "cpu", "devices": 1}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ref64(tok: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Digits val (centre + flip) in shards of 64, written through the command line: the uninterrupted
    reference."""
    out = tmp_path_factory.mktemp("ref64")
    main(["tokens", "--tokenizer", str(tok), "--data", "train.data.images.DigitsDataModule", "--split", "val",
          "--out", str(out), "--shard_size", "64", "--batch_size", "32", "--accelerator", "cpu",
          "--devices", "1"])
    assert "DigitsDataModule" in (out / "extract_config.yaml").read_text()  # the resolved config is kept
    return out


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.tar"))}


def encode_views(tok: Path, views: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return load_tokenizer(tok).encode(views).numpy()


def test_digits_center_flip_shards_and_meta(tok: Path, val100: Path, read_tars) -> None:
    samples = read_tars(val100)
    _, labels = digits_split("val")
    assert sorted(samples) == [f"{i:09d}" for i in range(297)]
    assert all(t.dtype == np.int16 and t.shape == (2, 4, 4) for t, _ in samples.values())
    assert [samples[f"{i:09d}"][1] for i in range(297)] == labels.tolist()
    dataset = DigitsViews("val", "center_flip")
    images = next(iter(DigitsDataModule(batch_size=297).val_dataloader()))[0]
    views = torch.stack([dataset[i][1] for i in range(297)])  # [297,2,3,16,16]
    assert torch.equal(views[:, 0], images) and torch.equal(views[:, 1], images.flip(-1))
    expected = encode_views(tok, views.flatten(0, 1)).reshape(297, 2, 4, 4)
    got = np.stack([samples[f"{i:09d}"][0] for i in range(297)])
    np.testing.assert_array_equal(got, expected)
    meta = json.loads((val100 / "meta.json").read_text())
    assert meta["weights_sha256"] == file_sha256(tok / "model.safetensors")
    assert meta["tokenizer_config"] == vq_config("vq-tiny").to_dict()
    assert {k: meta[k] for k in ("codebook_size", "image_size", "grid", "views", "num_views", "num_classes",
                                 "num_samples", "split", "dtype", "num_shards", "num_skipped")} == {
        "codebook_size": 64, "image_size": 16, "grid": [4, 4], "views": "center_flip", "num_views": 2,
        "num_classes": 10, "num_samples": 297, "split": "val", "dtype": "int16", "num_shards": 3,
        "num_skipped": 0}  # fmt: skip
    assert meta["tokenizer"] == str(tok) and not list(val100.glob("*.tmp"))


def test_ten_crop_views_and_corrupt_images(tok: Path, tmp_path: Path, read_tars) -> None:
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (tmp_path / "train" / name).mkdir(parents=True)
        for k in range(3):
            pixels = rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / f"train/{name}/{k}.jpg", quality=95)
    (tmp_path / "train/a/9_bad.jpg").write_bytes(b"not an image")  # global index 3 (sorted after 2.jpg)
    with pytest.raises(ImageSizeError, match=r"0.jpg: image is 40x32 pixels, not the 24x24"):  # never silently
        extract_tokens(str(tok), ImageFolderDataModule(str(tmp_path), image_size=24, num_workers=0, val_dir=None),
                       str(tmp_path / "refused"), views="ten_crop", **CPU)
    assert not (tmp_path / "refused" / "meta.json").exists()
    data = ImageFolderDataModule(str(tmp_path), image_size=24, resize=True, num_workers=0, val_dir=None)
    out = tmp_path / "tokens"
    with pytest.warns(CorruptImageWarning):
        meta = extract_tokens(str(tok), data, str(out), views="ten_crop", shard_size=4, batch_size=3, **CPU)
    assert meta["num_samples"] == 6 and meta["num_views"] == 10 and meta["grid"] == [6, 6]
    assert [s["index"] for s in meta["skipped"]] == [3] and meta["skipped"][0]["name"].endswith("9_bad.jpg")
    samples = read_tars(out)
    assert sorted(samples) == [f"{i:09d}" for i in (0, 1, 2, 4, 5, 6)]
    dataset = data.views_dataset("train", "ten_crop")
    views = dataset[0][1]
    assert views.shape == (10, 3, 24, 24)
    for k in range(5):  # the flip half: view 5 + k is crop k mirrored
        assert torch.equal(views[5 + k], views[k].flip(-1))
    big = np.asarray(center_crop_arr(Image.open(tmp_path / "train/a/0.jpg").convert("RGB"), 26))
    for k, (x, y) in enumerate([(1, 1), (0, 0), (2, 0), (0, 2), (2, 2)]):  # centre, TL, TR, BL, BR
        crop = torch.from_numpy(big[y : y + 24, x : x + 24].copy()).permute(2, 0, 1).float() / 255 * 2 - 1
        torch.testing.assert_close(views[k], crop)
    np.testing.assert_array_equal(samples["000000000"][0], encode_views(tok, views))
    assert samples["000000004"][1] == 1
    # The same images as webdataset shards (JPEG bytes kept as they are; keys = the folder indices, 3 absent).
    with pytest.warns(CorruptImageWarning):
        write_shards(root=str(tmp_path / "train"), out=str(tmp_path / "images"), shard_size=4)
    shards = ImageShardsDataModule(str(tmp_path / "images"), image_size=24, resize=True, num_workers=0)
    extract_tokens(str(tok), shards, str(tmp_path / "tokens2"), views="ten_crop", shard_size=4, **CPU)
    again = read_tars(tmp_path / "tokens2")
    assert sorted(again) == sorted(samples)
    assert all(np.array_equal(again[k][0], samples[k][0]) and again[k][1] == samples[k][1] for k in samples)


class _Interrupt(Callback):
    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx == 2:  # 96 images seen: shard 0 (0..63) is written, shard 1 only half collected
            raise RuntimeError("simulated crash")


def test_interrupted_extraction_resumes_exactly(tok: Path, ref64: Path, tmp_path: Path, read_tars) -> None:
    run = dict(split="val", shard_size=64, batch_size=32, **CPU)
    with pytest.raises(RuntimeError, match="simulated crash"):
        extract_tokens(str(tok), DigitsDataModule(), str(tmp_path), callbacks=[_Interrupt()], **run)
    assert [p.name for p in sorted(tmp_path.glob("*.tar"))] == ["val-000000.tar"]
    assert not (tmp_path / "meta.json").exists()
    extract_tokens(str(tok), DigitsDataModule(), str(tmp_path), **run)
    assert digests(tmp_path) == digests(ref64) and len(digests(ref64)) == 5  # byte-identical shards
    assert sorted(read_tars(tmp_path)) == [f"{i:09d}" for i in range(297)]
    # A lost shard plus the .tmp of a crash mid-write: only that shard is redone.
    (tmp_path / "val-000002.tar").unlink()
    (tmp_path / ".val-000002.tar.x1y2z3.tmp").write_bytes(b"half a shard")  # atomic_write's temporary name
    meta = extract_tokens(str(tok), DigitsDataModule(), str(tmp_path), **run)
    assert digests(tmp_path) == digests(ref64) and not list(tmp_path.glob("*.tmp"))
    assert meta == json.loads((ref64 / "meta.json").read_text())
    with pytest.raises(ValueError, match="another extraction"):  # same folder, other views: refused
        extract_tokens(str(tok), DigitsDataModule(), str(tmp_path), **{**run, "views": "center"})


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def test_ddp_extraction_matches_single_process(tok: Path, ref64: Path, tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "train.prepare", "tokens", "--tokenizer", str(tok), "--data",
           "train.data.images.DigitsDataModule", "--split", "val", "--out", str(tmp_path), "--shard_size",
           "64", "--batch_size", "32", "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp"]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[rank 1/2] 2 of 2 shards" in proc.stdout and "[rank 0/2] 3 of 3 shards" in proc.stdout
    assert digests(tmp_path) == digests(ref64)
    assert json.loads((tmp_path / "meta.json").read_text())["num_samples"] == 297
