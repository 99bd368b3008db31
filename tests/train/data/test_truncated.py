"""Shards cut short (as an interrupted copy leaves them) are errors naming the shard and the fix, in every
reader: the token DataModule (setup, train and val streams), `read_token_set`, `token_histogram`, the image
shard DataModule and token extraction's image-shard reader (`TarViews`); shards written before sizes were
recorded are counted by their headers, and shards without any record are read with a warning.

CPU only: `val100` (Digits val token shards, 3 shards of 100/100/97) and `tree` (image shards of 4) come
from tests/train/conftest.py.
"""

from __future__ import annotations

import json
import logging
import shutil
import tarfile
from pathlib import Path

import pytest

from train.data.image_shards import ImageShardsDataModule
from train.data.shard_integrity import TruncatedShardError
from train.data.tokens import (
    TokenEvalStream,
    TokenShardsDataModule,
    read_token_set,
    token_histogram,
    token_records,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _cut(path: Path, keep: int, mid_member: bool = False) -> None:
    """Cut tar `path` at the header of sample `keep` (a member boundary), or inside its first member."""
    with tarfile.open(path) as tar:
        members = [m for m in tar.getmembers() if m.isfile()]
    keys = list(dict.fromkeys(m.name.split(".", 1)[0] for m in members))
    first = next(m for m in members if m.name.startswith(keys[keep] + "."))
    end = first.offset_data + 5 if mid_member else first.offset
    path.write_bytes(path.read_bytes()[:end])


def _copy(folder: Path, tmp_path: Path) -> Path:
    out = tmp_path / folder.name
    shutil.copytree(folder, out)
    return out


def test_writers_record_counts_and_sizes(val100: Path, tree: dict) -> None:
    meta = json.loads((val100 / "meta.json").read_text())
    assert [(s["num_samples"], s["num_bytes"]) for s in meta["shards"]] == [
        (n, (val100 / s["name"]).stat().st_size) for n, s in zip((100, 100, 97), meta["shards"], strict=True)]
    summaries = sorted(tree["shards"].glob("train-*.json"))
    assert [json.loads(p.read_text())["num_samples"] for p in summaries] == [3, 4, 3]  # 12 files, 2 unreadable
    assert all(json.loads(p.read_text())["num_bytes"] == p.with_suffix(".tar").stat().st_size for p in summaries)


@pytest.mark.parametrize("sizes", [True, False], ids=["recorded-size", "older-meta-counted-by-headers"])
def test_truncated_token_shard_is_an_error_in_every_reader(val100: Path, tmp_path: Path, sizes: bool) -> None:
    shards = _copy(val100, tmp_path)
    if not sizes:  # as an older extraction wrote meta.json: counts but no sizes
        meta = json.loads((shards / "meta.json").read_text())
        for shard in meta["shards"]:
            del shard["num_bytes"]
        (shards / "meta.json").write_text(json.dumps(meta))
    _cut(shards / "val-000001.tar", 60)
    expected = r"val-000001.tar holds 60 samples but .*meta.json records 100.*truncated.*re-copy it"
    data = TokenShardsDataModule(str(shards), str(shards), batch_size=16, num_workers=0)
    for stage in ("fit", "validate"):
        with pytest.raises(TruncatedShardError, match=expected):
            data.setup(stage)
    with pytest.raises(TruncatedShardError, match=expected):
        read_token_set(str(shards), per_class=2)  # even when the subset is complete before the cut
    with pytest.raises(TruncatedShardError, match=expected):
        token_histogram(str(shards))
    # the streams check too (a shard cut after setup): validation as the shard ends, training on first open
    meta = data.meta
    urls = [str(shards / s["name"]) for s in meta["shards"]]
    stream = TokenEvalStream(urls, 50, 64, (4, 4), 10, token_records(urls, meta), 2)
    with pytest.raises(TruncatedShardError, match=expected):
        list(stream)
    train = TokenShardsDataModule(str(shards), batch_size=16, num_workers=0, resampled=False, shuffle_buffer=0)
    with pytest.raises(TruncatedShardError, match=expected):
        list(train.train_dataloader())


def test_token_shard_cut_inside_a_member_is_an_error(val100: Path, tmp_path: Path) -> None:
    shards = _copy(val100, tmp_path)
    _cut(shards / "val-000002.tar", 90, mid_member=True)
    with pytest.raises(TruncatedShardError, match=r"val-000002.tar holds 90 samples but .* records 97"):
        TokenShardsDataModule(str(shards)).setup("fit")


def test_truncated_image_shard_is_an_error_in_every_reader(tree: dict, tmp_path: Path) -> None:
    shards = _copy(tree["shards"], tmp_path)
    _cut(shards / "train-000001.tar", 1)
    expected = r"train-000001.tar holds 1 samples but .*train-000001.json records 4.*python -m train.prepare shards"
    data = ImageShardsDataModule(str(shards), str(shards), batch_size=4, num_workers=0)
    with pytest.raises(TruncatedShardError, match=expected):
        data.train_dataloader()
    with pytest.raises(TruncatedShardError, match=expected):
        data.val_dataloader()
    with pytest.raises(TruncatedShardError, match=expected):  # token extraction's reader
        data.views_dataset("train", "center")
    # cut after the loader was built: the stream's count at the shard's end catches it
    whole = _copy(tree["shards"], tmp_path / "later")
    loader = ImageShardsDataModule(str(whole), str(whole), batch_size=4, num_workers=0).val_dataloader()
    _cut(whole / "train-000000.tar", 1)
    with pytest.raises(TruncatedShardError, match=r"train-000000.tar holds 1 samples but .* records 3"):
        list(loader)


def test_shards_without_records_still_read_with_a_warning(tree: dict, tmp_path: Path, caplog) -> None:
    shards = _copy(tree["shards"], tmp_path)
    for summary in shards.glob("train-*.json"):
        summary.unlink()
    data = ImageShardsDataModule(str(shards), str(shards), batch_size=4, num_workers=0)
    with caplog.at_level(logging.WARNING):
        images, _ = zip(*data.val_dataloader(), strict=True)
    assert sum(len(b) for b in images) == 10
    assert "counts cannot be checked" in caplog.text


def test_rerun_of_write_shards_refuses_a_truncated_shard(tree: dict, tmp_path: Path) -> None:
    from train.prepare.write_shards import write_shards

    shards = _copy(tree["shards"], tmp_path)
    _cut(shards / "train-000002.tar", 1)
    with pytest.raises(ValueError, match=r"train-000002.tar has \d+ bytes but .*records \d+.*delete it"):
        write_shards(root=str(tree["split"]), out=str(shards), shard_size=4)
