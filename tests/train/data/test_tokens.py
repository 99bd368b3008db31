"""Tests for token shards (`train.data.tokens`): `TokenShardsDataModule` (round trip, fixed epochs, equal
steps on every rank of a real 2-process DDP run (gloo), errors in meta.json and tokens, pickles never
decoded), `token_histogram` and `read_token_set`.

CPU only. The shards are `val100` (tests/train/conftest.py): Digits val extracted with a random vq-tiny.
"""

from __future__ import annotations

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

from train.data.tokens import TokenShardsDataModule

REPO = Path(__file__).resolve().parents[3]


pytestmark = pytest.mark.usefixtures("one_thread")


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def test_token_datamodule_round_trip(val100: Path, read_tars) -> None:
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
    assert dm.state_dict() == {"train_epoch": 2, "train_batches": 0}  # outside fit: the next epoch
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


def test_pickle_members_are_never_decoded(val100: Path, tmp_path: Path, read_tars) -> None:
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
    shard = {**meta["shards"][0], "num_samples": 20}  # the 20 written here (the sizes are not recorded)
    shard.pop("num_bytes", None)
    (tmp_path / "meta.json").write_text(json.dumps({**meta, "num_samples": 20, "shards": [shard]}))
    data = TokenShardsDataModule(str(tmp_path), batch_size=20, num_workers=0)
    tokens, _ = next(iter(data.train_dataloader()))
    assert tokens.shape == (20, 16) and not (tmp_path / "pwned").exists()


def test_token_histogram_counts_every_view(val100: Path, read_tars) -> None:
    from train.data.tokens import token_histogram

    counts = token_histogram(str(val100))
    expected = np.zeros(64, dtype=np.int64)
    for codes, _ in read_tars(val100).values():
        expected += np.bincount(codes.reshape(-1), minlength=64)
    assert counts.sum() == 297 * 2 * 16 and np.array_equal(counts, expected)


def test_read_token_set_is_view_zero_in_shard_order_and_class_balanced(val100: Path, read_tars) -> None:
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
