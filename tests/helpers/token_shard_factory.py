"""Token shards as `train.extract_tokens` writes them, built directly (no tokenizer) for data tests."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import webdataset as wds


def token_shards(
    folder: Path,
    codes: list[np.ndarray],
    labels: list[int],
    codebook: int = 16,
    num_classes: int = 4,
    grid: tuple[int, int] = (4, 4),
) -> Path:
    """Token shards as `train.extract_tokens` writes them: one tar (key = index) and meta.json."""
    folder.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(folder / "tok-000000.tar"), encoder=False) as sink:
        for index, (tokens, label) in enumerate(zip(codes, labels, strict=True)):
            buffer = io.BytesIO()
            np.save(buffer, tokens.astype(np.int16), allow_pickle=False)
            sink.write(
                {"__key__": f"{index:09d}", "tokens.npy": buffer.getvalue(), "cls": str(label).encode()}
            )
    meta = {"format": "engram-vision-tokens", "codebook_size": codebook, "num_classes": num_classes,
            "grid": list(grid), "num_samples": len(codes), "num_views": 1, "dtype": "int16",
            "shards": [{"name": "tok-000000.tar", "first_index": 0, "num_samples": len(codes)}]}  # fmt: skip
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def constant_codes(n: int, grid: tuple[int, int] = (4, 4)) -> list[np.ndarray]:
    return [np.full((1, *grid), i % 16) for i in range(n)]
