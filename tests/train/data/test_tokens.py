"""Tests for token extraction (`train.prepare.extract_tokens`) and token shards (`train.data.tokens`).

CPU only. The tokenizer is a random vq-tiny saved with `save_vq`: its codes are whatever they are, so every
check compares against `tokenizer.encode` on the same views. Two tests run real 2-process DDP (gloo).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import subprocess
import sys
import tarfile
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
from train.data.tokens import TokenShardsDataModule
from train.data.transforms import CorruptImageWarning, center_crop_arr
from train.data.views import DigitsViews
from train.prepare.__main__ import main
from train.prepare.extract_tokens import extract_tokens
from train.prepare.write_shards import write_shards

REPO = Path(__file__).resolve().parents[3]
CPU = {"accelerator": "cpu", "devices": 1}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny convolutions: one thread is fastest, and some CPU quotas make two threads crawl.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def val100(tok: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Digits val (297 images), centre + flip, shards of 100."""
    out = tmp_path_factory.mktemp("val100")
    extract_tokens(str(tok), DigitsDataModule(), str(out), split="val", shard_size=100, batch_size=64, **CPU)
    return out


@pytest.fixture(scope="module")
def ref64(tok: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same, shards of 64, written through the command line: the uninterrupted reference."""
    out = tmp_path_factory.mktemp("ref64")
    main(["tokens", "--tokenizer", str(tok), "--data", "train.data.images.DigitsDataModule", "--split", "val",
          "--out", str(out), "--shard_size", "64", "--batch_size", "32", "--accelerator", "cpu",
          "--devices", "1"])
    assert "DigitsDataModule" in (out / "extract_config.yaml").read_text()  # the resolved config is kept
    return out


def read_tars(folder: Path) -> dict[str, tuple[np.ndarray, int]]:
    """key -> (tokens, label) over every .tar in a folder, asserting that no key repeats."""
    samples: dict[str, dict[str, bytes]] = {}
    keys: list[str] = []
    for path in sorted(folder.glob("*.tar")):
        with tarfile.open(path) as tar:
            for member in tar:
                key, ext = member.name.split(".", 1)
                if ext == "cls":
                    keys.append(key)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    assert len(keys) == len(set(keys)), "duplicate keys"
    return {key: (np.load(io.BytesIO(s["tokens.npy"]), allow_pickle=False), int(s["cls"]))
            for key, s in samples.items()}  # fmt: skip


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.tar"))}


def encode_views(tok: Path, views: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return load_tokenizer(tok).encode(views).numpy()


def test_digits_center_flip_shards_and_meta(tok: Path, val100: Path) -> None:
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


def test_ten_crop_views_and_corrupt_images(tok: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (tmp_path / "train" / name).mkdir(parents=True)
        for k in range(3):
            pixels = rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / f"train/{name}/{k}.jpg", quality=95)
    (tmp_path / "train/a/9_bad.jpg").write_bytes(b"not an image")  # global index 3 (sorted after 2.jpg)
    data = ImageFolderDataModule(str(tmp_path), image_size=24, num_workers=0, val_dir=None)
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
    shards = ImageShardsDataModule(str(tmp_path / "images"), image_size=24, num_workers=0)
    extract_tokens(str(tok), shards, str(tmp_path / "tokens2"), views="ten_crop", shard_size=4, **CPU)
    again = read_tars(tmp_path / "tokens2")
    assert sorted(again) == sorted(samples)
    assert all(np.array_equal(again[k][0], samples[k][0]) and again[k][1] == samples[k][1] for k in samples)


class _Interrupt(Callback):
    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx == 2:  # 96 images seen: shard 0 (0..63) is written, shard 1 only half collected
            raise RuntimeError("simulated crash")


def test_interrupted_extraction_resumes_exactly(tok: Path, ref64: Path, tmp_path: Path) -> None:
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


def test_token_datamodule_round_trip(val100: Path) -> None:
    dm = TokenShardsDataModule(str(val100), str(val100), batch_size=16, num_workers=2, shuffle_buffer=50)
    assert (dm.vocab_size, dm.num_classes, dm.grid, dm.num_train_samples) == (64, 10, (4, 4), 297)
    samples = read_tars(val100)
    ordered = [samples[k] for k in sorted(samples)]
    tokens, labels = (torch.cat(x) for x in zip(*dm.val_dataloader(), strict=True))
    # Val: every sample once, view 0; two workers take shards {0, 2} and {1} in turn.
    by_seq = {tuple(t[0].reshape(-1).tolist()): lab for t, lab in ordered}
    assert tokens.shape == (297, 16) and tokens.dtype == torch.int64 and labels.dtype == torch.int64
    assert sorted(map(tuple, tokens.tolist())) == sorted(by_seq)
    assert all(by_seq[tuple(t)] == lab for t, lab in zip(tokens.tolist(), labels.tolist(), strict=True))
    # Train: fixed-size batches of one random view per sample; both views appear, labels stay attached.
    view_of = {tuple(t[v].reshape(-1).tolist()): (v, lab) for t, lab in ordered for v in range(2)}
    batches = list(dm.train_dataloader())
    assert len(batches) == 19 and all(b[0].shape == (16, 16) and b[1].shape == (16,) for b in batches)
    seen = [(view_of[tuple(t)], lab)
            for b in batches for t, lab in zip(b[0].tolist(), b[1].tolist(), strict=True)]  # fmt: skip
    assert all(v_lab[1] == lab for v_lab, lab in seen) and {v for (v, _), _ in seen} == {0, 1}
    flat = torch.cat([b[0] for b in batches])
    assert 0 <= int(flat.min()) and int(flat.max()) < 64


def test_batches_per_epoch_is_fixed(val100: Path) -> None:
    dm = TokenShardsDataModule(str(val100), batch_size=8, num_workers=2, batches_per_epoch=7,
                               shuffle_buffer=10)
    loader = dm.train_dataloader()
    epochs = [list(loader) for _ in range(2)]
    assert len(loader) == 7 and [len(e) for e in epochs] == [7, 7]
    assert not torch.equal(epochs[0][0][0], epochs[1][0][0])  # the epoch reseeds the streams
    assert dm.state_dict() == {"train_epoch": 2}
    single = TokenShardsDataModule(str(val100), batch_size=100, num_workers=0, resampled=False)
    assert single.num_train_batches() == 3 and single.num_train_batches(world_size=2) == 2
    assert [len(b[1]) for b in single.train_dataloader()] == [100, 100, 100]


def test_ddp_ranks_take_equal_steps_over_few_shards(val100: Path, tmp_path: Path) -> None:
    # 3 shards < 2 ranks x 2 workers; per rank and epoch ceil(297 / (8 x 2)) = 19 training batches.
    script = REPO / "tests/train/data/ddp_token_steps.py"
    proc = subprocess.run([sys.executable, str(script), str(val100), str(tmp_path)], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert counts[0] == counts[1]
    assert counts[0]["train_steps"] == 2 * 19 and counts[0]["train_samples"] == 2 * 19 * 8
    assert counts[0]["val_samples"] == 2 * 297  # every rank validates on the whole set, each epoch


def test_meta_and_token_errors(val100: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="meta.json"):
        _ = TokenShardsDataModule(str(tmp_path)).vocab_size
    for name in ("val-000000.tar", "val-000001.tar"):
        (tmp_path / name).write_bytes((val100 / name).read_bytes())
    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        _ = TokenShardsDataModule(str(tmp_path)).vocab_size
    (tmp_path / "meta.json").write_text(json.dumps({"codebook_size": 64}))
    with pytest.raises(ValueError, match="missing"):
        _ = TokenShardsDataModule(str(tmp_path)).grid
    meta = json.loads((val100 / "meta.json").read_text())
    meta = {**meta, "codebook_size": 4, "shards": meta["shards"][:2]}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="out of range"):
        list(TokenShardsDataModule(str(tmp_path), num_workers=0).train_dataloader())
    with pytest.raises(ValueError, match="differ from the training shards"):
        TokenShardsDataModule(str(val100), str(tmp_path), num_workers=0).val_dataloader()


def test_pickle_members_are_never_decoded(val100: Path, tmp_path: Path) -> None:
    class Boom:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    with tarfile.open(tmp_path / "val-000000.tar", "w") as tar:
        for key, (tokens, label) in list(read_tars(val100).items())[:20]:
            buffer = io.BytesIO()
            np.save(buffer, tokens)
            for ext, data in (("tokens.npy", buffer.getvalue()), ("cls", str(label).encode()),
                              ("x.pyd", pickle.dumps(Boom()))):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    meta = json.loads((val100 / "meta.json").read_text())
    (tmp_path / "meta.json").write_text(json.dumps({**meta, "num_samples": 20, "shards": meta["shards"][:1]}))
    data = TokenShardsDataModule(str(tmp_path), batch_size=20, num_workers=0)
    tokens, _ = next(iter(data.train_dataloader()))
    assert tokens.shape == (20, 16) and not (tmp_path / "pwned").exists()


def test_token_histogram_counts_every_view(val100: Path) -> None:
    from train.data.tokens import token_histogram

    counts = token_histogram(str(val100))
    expected = np.zeros(64, dtype=np.int64)
    for codes, _ in read_tars(val100).values():
        expected += np.bincount(codes.reshape(-1), minlength=64)
    assert counts.sum() == 297 * 2 * 16 and np.array_equal(counts, expected)


def test_read_token_set_is_view_zero_in_shard_order_and_class_balanced(val100: Path) -> None:
    from train.data.tokens import read_token_set

    samples = read_tars(val100)
    ordered = [samples[k] for k in sorted(samples, key=int)]  # keys are image indices, in shard order
    tokens, labels = read_token_set(str(val100))
    assert tokens.shape == (297, 16) and tokens.dtype == torch.int64
    assert torch.equal(tokens, torch.from_numpy(np.stack([t[0].reshape(-1) for t, _ in ordered]).astype(np.int64)))
    assert labels.tolist() == [lab for _, lab in ordered]
    subset, subset_labels = read_token_set(str(val100), per_class=3)
    assert torch.bincount(subset_labels, minlength=10).tolist() == [3] * 10
    first = [i for c in range(10) for i in [j for j, lab in enumerate(labels.tolist()) if lab == c][:3]]
    assert torch.equal(subset, tokens[sorted(first)])
