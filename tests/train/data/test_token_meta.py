"""A token meta.json that disagrees with itself or with the tokenizer it names is refused at setup, naming
both (`train.data.token_meta.check_meta_against_tokenizer`, also called by the token DataModule).

CPU only; `val100` (made by the random vq-tiny `tok`: 64 codes, downsample 4, 16 px digits -> 4x4 grid,
center_flip) comes from tests/train/conftest.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from train.data.token_meta import check_meta_against_tokenizer, check_meta_consistency
from train.data.tokens import TokenShardsDataModule, read_token_meta

pytestmark = pytest.mark.usefixtures("one_thread")


def _edited(val100: Path, tmp_path: Path, **changes) -> Path:
    out = tmp_path / "tokens"
    shutil.copytree(val100, out)
    meta = json.loads((out / "meta.json").read_text())
    (out / "meta.json").write_text(json.dumps({**meta, **changes}))
    return out


def test_the_extracted_meta_agrees_with_its_tokenizer(val100: Path, tok: Path) -> None:
    meta = read_token_meta(str(val100))
    assert meta["tokenizer"] == str(tok)
    check_meta_against_tokenizer(meta, tok)  # nothing raised
    TokenShardsDataModule(str(val100), str(val100), num_workers=0).setup("fit")


@pytest.mark.parametrize(("changes", "message"), [
    ({"codebook_size": 128}, r"codebook_size is 128 in meta.json but 64 for the tokenizer"),
    ({"downsample_factor": 2, "grid": [8, 8]}, r"downsample_factor is 2 in meta.json but 4"),
    ({"weights_sha256": "0" * 64}, r"weights_sha256 is 000000000000\.\.\. in meta.json"),
    ({"tokenizer_config": {"codebook_size": 64}}, r"tokenizer_config differs in"),
], ids=["codebook", "downsample", "weights", "config"])
def test_a_meta_that_disagrees_with_its_tokenizer_is_refused_at_setup(val100: Path, tok: Path, tmp_path: Path,
                                                                      changes: dict, message: str) -> None:
    folder = _edited(val100, tmp_path, **changes)
    meta = read_token_meta(str(folder))
    with pytest.raises(ValueError, match=message) as caught:
        check_meta_against_tokenizer(meta, tok)
    assert str(folder / "meta.json") in str(caught.value) and str(tok) in str(caught.value)
    with pytest.raises(ValueError, match=message):
        TokenShardsDataModule(str(folder), num_workers=0).setup("fit")


def test_grid_against_the_tokenizer(val100: Path, tok: Path, tmp_path: Path) -> None:
    # the grid alone edited (kept consistent with nothing else): both checks name it
    meta = read_token_meta(str(_edited(val100, tmp_path, grid=[8, 8])))
    with pytest.raises(ValueError, match=r"grid \[8, 8\] is not image_size 16 / downsample_factor 4"):
        check_meta_consistency(meta)
    with pytest.raises(ValueError, match=r"grid \[8, 8\]"):
        check_meta_against_tokenizer(meta, tok)


def test_a_meta_that_contradicts_itself_is_refused(val100: Path, tmp_path: Path) -> None:
    for changes, message in (({"num_views": 1}, r"views 'center_flip' means 2 views per image, but num_views is 1"),
                             ({"num_samples": 300}, r"shards list 297 samples in all, num_samples says 300"),
                             ({"dtype": "int32"}, r"dtype int32 cannot be the codes of a 64-entry codebook")):
        folder = _edited(val100, tmp_path / str(len(list(tmp_path.iterdir()))), **changes)
        with pytest.raises(ValueError, match=message):
            TokenShardsDataModule(str(folder), num_workers=0).setup("fit")


def test_a_tokenizer_that_is_gone_is_not_checked(val100: Path, tmp_path: Path) -> None:
    folder = _edited(val100, tmp_path, tokenizer=str(tmp_path / "moved-away"), codebook_size=64)
    TokenShardsDataModule(str(folder), num_workers=0).setup("fit")  # nothing raised
    with pytest.raises(FileNotFoundError, match="no tokenizer at"):
        check_meta_against_tokenizer(read_token_meta(str(folder)), tmp_path / "moved-away")
