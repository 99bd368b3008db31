"""A full disk while writing: every writer of samples, checkpoints, exported models and shards goes
through `tokenizers_vq.files.atomic_write`, so an OSError(ENOSPC) mid-write raises an error naming the
file, leaves no partial file under the final name (the previous version, if any, stays intact) and no
temporary file, and a rerun after space is freed completes.

The disk is filled by a fake of the lowest write each writer makes (it writes part of the data into the
temporary file, then raises ENOSPC), since a real full file system cannot be had in a test. Writers:
the helper itself; exported models (`save_model_dir`: ExportModel, save_vq, save_gpt); Lightning
checkpoints through `train.checkpoints.AtomicCheckpointIO`; sample PNGs (`python -m sample`); token shards
(`train.prepare.extract_tokens`); image shards (`train.prepare.write_shards`). CPU, tiny models, a few seconds each.
"""

from __future__ import annotations

import errno
import re
import tarfile
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import webdataset as wds
from lightning.pytorch.callbacks import ModelCheckpoint
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from engram_vision.checkpoint import save_gpt
from engram_vision.config import ModelConfig
from sample import job as sample_job
from tokenizers_vq import VQModel, vq_config
from tokenizers_vq import model_dir as vq_model_dir
from tokenizers_vq.checkpoint import load_vq, save_vq
from tokenizers_vq.files import atomic_write, atomic_write_text
from train.checkpoints import AtomicCheckpointIO, use_atomic_checkpoints
from train.data.images import DigitsDataModule
from train.lit_ar import LitAR
from train.prepare.extract_tokens import extract_tokens
from train.prepare.write_shards import write_shards

CPU = {"accelerator": "cpu", "devices": 1}


def _full_disk() -> OSError:
    return OSError(errno.ENOSPC, "No space left on device")


def _files(folder: Path) -> list[str]:
    """Every file under `folder` (hidden temporary files included), relative and sorted."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def _no_temps(folder: Path) -> bool:
    return not [name for name in _files(folder) if name.endswith(".tmp")]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_atomic_write_names_the_file_and_keeps_the_old_version(tmp_path):
    target = tmp_path / "metrics.json"
    atomic_write_text(target, '{"old": true}')

    def half_then_full(tmp: str) -> None:
        Path(tmp).write_text('{"ne')
        raise _full_disk()

    with pytest.raises(OSError, match=f"could not write {re.escape(str(target))}: No space left") as error:
        atomic_write(target, half_then_full)
    assert error.value.errno == errno.ENOSPC
    assert _files(tmp_path) == ["metrics.json"] and target.read_text() == '{"old": true}'

    class LibraryError(Exception):  # e.g. safetensors' SafetensorError, torch.save's RuntimeError
        pass

    def library_fails(tmp: str) -> None:
        raise LibraryError("IoError: StorageFull")

    with pytest.raises(RuntimeError, match=r"could not write .*new\.bin: IoError: StorageFull"):
        atomic_write(tmp_path / "new.bin", library_fails)
    assert _files(tmp_path) == ["metrics.json"]


def test_exported_model_keeps_the_previous_weights(tmp_path, monkeypatch):
    torch.manual_seed(0)
    old = VQModel(vq_config("vq-tiny"))
    save_vq(old, tmp_path)
    new = VQModel(vq_config("vq-tiny"))
    save_file = vq_model_dir.save_file

    def full(tensors, tmp, metadata=None):
        Path(tmp).write_bytes(b"\0" * 100)
        raise _full_disk()

    monkeypatch.setattr(vq_model_dir, "save_file", full)
    with pytest.raises(OSError, match=r"could not write .*model\.safetensors: No space left"):
        save_vq(new, tmp_path)
    assert _files(tmp_path) == ["config.json", "model.safetensors"]
    assert torch.equal(load_vq(tmp_path).encoder.conv_in.weight, old.encoder.conv_in.weight)
    monkeypatch.setattr(vq_model_dir, "save_file", save_file)  # space freed
    save_vq(new, tmp_path)
    assert torch.equal(load_vq(tmp_path).encoder.conv_in.weight, new.encoder.conv_in.weight)


class _Tokens(L.LightningDataModule):
    def train_dataloader(self):
        generator = torch.Generator().manual_seed(0)
        data = torch.randint(0, 16, (64, 16), generator=generator), torch.randint(0, 4, (64,), generator=generator)
        return DataLoader(TensorDataset(*data), batch_size=8)


def _fit(root: Path, max_steps: int, resume: str | None = None) -> L.Trainer:
    config = ModelConfig(dim=32, n_layer=2, n_head=2, multiple_of=32, vocab_size=16, num_classes=4, block_size=16)
    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, default_root_dir=root,
                        callbacks=[ModelCheckpoint(dirpath=root, save_last=True, save_top_k=0, every_n_train_steps=1)])
    use_atomic_checkpoints(trainer)
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    trainer.fit(LitAR(config, lr=1e-3), _Tokens(), ckpt_path=resume, weights_only=True)
    return trainer


def test_lightning_checkpoint_keeps_the_previous_last_ckpt(tmp_path, monkeypatch):
    save = torch.save
    saves = []

    def full_on_third_save(obj, path, *args, **kwargs):
        saves.append(path)
        if len(saves) == 3:  # last.ckpt after step 3: half of it reaches the disk
            Path(path).write_bytes(b"PK\x03\x04 half a checkpoint")
            raise _full_disk()
        return save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_on_third_save)
    with pytest.raises(OSError, match=r"could not write .*last\.ckpt: No space left"):
        _fit(tmp_path, max_steps=6)
    assert _files(tmp_path) == ["last.ckpt"]
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 2  # the previous one, whole
    monkeypatch.setattr(torch, "save", save)  # space freed: resume
    trainer = _fit(tmp_path, max_steps=6, resume="last")
    assert trainer.global_step == 6 and _files(tmp_path) == ["last.ckpt"]
    steps = {float(s["step"]) for s in torch.load(tmp_path / "last.ckpt", weights_only=True)["optimizer_states"][0]["state"].values()}
    assert steps == {6.0}  # the resumed run continued the optimizer, it did not restart


@pytest.fixture(scope="module")
def weights(random_model, tiny_config, tmp_path_factory):
    root = tmp_path_factory.mktemp("weights")
    save_gpt(random_model(tiny_config()), root / "gpt")
    torch.manual_seed(0)
    save_vq(VQModel(vq_config("vq-tiny")), root / "vq")
    return root


def test_sample_pngs_on_a_full_disk_then_the_rerun(weights, tmp_path, monkeypatch):
    run = dict(model=str(weights / "gpt"), tokenizer=str(weights / "vq"), num_samples=10, batch_size=4, seed=3, **CPU)
    write_bytes = Path.write_bytes

    def full_at_image_5(self, data):
        if self.name.startswith(".000005.png."):
            write_bytes(self, data[: len(data) // 2])
            raise _full_disk()
        return write_bytes(self, data)

    monkeypatch.setattr(Path, "write_bytes", full_at_image_5)
    with pytest.raises(OSError, match=r"could not write .*images/000005\.png: No space left"):
        sample_job.sample_images(out=str(tmp_path / "run"), **run)
    assert _files(tmp_path / "run") == ["images/000000.png", "images/000001.png", "images/000002.png",
                                        "images/000003.png", "images/000004.png", "manifest.json"]
    monkeypatch.setattr(Path, "write_bytes", write_bytes)  # space freed
    sample_job.sample_images(out=str(tmp_path / "run"), **run)
    sample_job.sample_images(out=str(tmp_path / "reference"), **run)
    assert _files(tmp_path / "run") == _files(tmp_path / "reference")
    assert len(_files(tmp_path / "run" / "images")) == 10 and _no_temps(tmp_path / "run")
    resumed, reference = (np.load(tmp_path / d / "samples.npz") for d in ("run", "reference"))
    assert np.array_equal(resumed["arr_0"], reference["arr_0"])


def _fail_tar_write_at(monkeypatch, sample_number: int) -> None:
    """webdataset's TarWriter.write: the sample_number-th write (over all shards) hits a full disk."""
    write = wds.TarWriter.write
    calls = []

    def full(self, obj):
        calls.append(obj["__key__"])
        if len(calls) == sample_number:
            self.tarstream.fileobj.write(b"\0" * 700)  # part of the member reaches the disk
            raise _full_disk()
        return write(self, obj)

    monkeypatch.setattr(wds.TarWriter, "write", full)


def test_token_shards_on_a_full_disk_then_the_rerun(tmp_path, monkeypatch):
    torch.manual_seed(0)
    save_vq(VQModel(vq_config("vq-tiny")), tmp_path / "tok")
    out = tmp_path / "tokens"
    run = dict(split="val", views="center", shard_size=100, batch_size=100, **CPU)
    _fail_tar_write_at(monkeypatch, 150)  # in shard 1
    with pytest.raises(OSError, match=r"could not write .*val-000001\.tar: No space left"):
        extract_tokens(str(tmp_path / "tok"), DigitsDataModule(), str(out), **run)
    assert _files(out) == ["val-000000.json", "val-000000.tar"]
    monkeypatch.undo()  # space freed
    meta = extract_tokens(str(tmp_path / "tok"), DigitsDataModule(), str(out), **run)
    assert meta["num_samples"] == 297 and _no_temps(out)
    keys = [key for shard in sorted(out.glob("*.tar")) for key in _tar_keys(shard)]
    assert keys == [f"{i:09d}" for i in range(297)]  # each image once


def _tar_keys(path: Path) -> list[str]:
    with tarfile.open(path) as tar:
        return [name.removesuffix(".cls") for name in tar.getnames() if name.endswith(".cls")]


def test_image_shards_on_a_full_disk_then_the_rerun(tmp_path, monkeypatch):
    for label in ("a", "b"):
        (tmp_path / "tree" / label).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(tmp_path / "tree" / label / f"{i}.png")
    out = tmp_path / "shards"
    _fail_tar_write_at(monkeypatch, 4)  # the second image of shard 1
    with pytest.raises(OSError, match=r"could not write .*tree-000001\.tar: No space left"):
        write_shards(str(tmp_path / "tree"), str(out), shard_size=2)
    assert _files(out) == ["classes.json", "tree-000000.json", "tree-000000.tar"]
    monkeypatch.undo()
    summary = write_shards(str(tmp_path / "tree"), str(out), shard_size=2)
    assert summary["num_samples"] == 6 and _no_temps(out)
    assert [k for shard in sorted(out.glob("*.tar")) for k in _tar_keys(shard)] == [f"{i:09d}" for i in range(6)]
