"""Up-front checks of the metrics command's inputs, run before any feature is extracted: the extractor
name, the samples and the reference (they exist, their files are readable, `.npz` keys, dtypes and shapes
read from the array headers without loading the images, no empty image file in a folder), the statistics
of a mu/sigma reference against the extractor's feature size, and the metrics.json already at `--out`.

Every error names the input (the flag) and the fix. What the sources are and how they are read is
`metrics.reference`; the metric formulas and the order of the job are `metrics.evaluate`.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from metrics.features import FeatureExtractor, available_extractors
from metrics.reference import SOURCE_FORMS, image_files, npz_keys, shard_files


@dataclass(frozen=True)
class SourceInfo:
    """What the header of an image source says, read without decoding its images."""

    kind: str
    """`metrics.reference.source_kind`: npz-images, npz-stats, folder or shards."""
    count: int | None
    """Images it holds (None for shards, whose members are only counted when read)."""
    image_shape: tuple[int, int] | None
    """(H, W) of an `.npz`'s images; None where only decoding would tell."""
    feature_dim: int | None = None
    """D of a mu/sigma statistics file."""


def check_extractor_name(name: str) -> None:
    if name not in available_extractors():
        raise ValueError(f"--extractor {name!r} is not a known feature extractor: choose one of "
                         f"{available_extractors()}")


def npz_array_header(path: Path, key: str, what: str) -> tuple[tuple[int, ...], np.dtype] | None:
    """(shape, dtype) of array `key` in an `.npz`, read from its .npy header (the data is not loaded);
    None when the archive has no such array; a ValueError naming the file when it cannot be read."""
    try:
        with zipfile.ZipFile(path) as archive:
            if f"{key}.npy" not in archive.namelist():
                return None
            with archive.open(f"{key}.npy") as handle:
                version = np.lib.format.read_magic(handle)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                    np.lib.format.read_array_header_2_0
                shape, _, dtype = read(handle)
                return tuple(shape), np.dtype(dtype)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise ValueError(f"{what} {path} is not a readable .npz ({type(error).__name__}: {error}); it is cut short "
                         f"or another format: write it again") from error


def check_source(source: str | Path, kind: str, what: str) -> SourceInfo:
    """The format of an image or statistics source of `kind` (`source_kind`'s answer), named `what`."""
    path = Path(source)
    if kind == "npz-images":
        npz_keys(path, what)  # a readable archive, else the error names it
        header = npz_array_header(path, "arr_0", what)
        if header is None:
            raise ValueError(f"{what} {path} has no 'arr_0' images")
        shape, dtype = header
        if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3:
            raise ValueError(f"{what} {path}: arr_0 must be uint8 [N,H,W,3] (the ADM layout), got {dtype} {shape}")
        return SourceInfo(kind, shape[0], (shape[1], shape[2]))
    if kind == "npz-stats":
        mu, sigma = (npz_array_header(path, key, what) for key in ("mu", "sigma"))
        if mu is None or sigma is None or len(mu[0]) != 1 or sigma[0] != (mu[0][0], mu[0][0]):
            raise ValueError(f"{what} {path}: mu must be [D] and sigma [D,D], got mu {mu and mu[0]} and sigma "
                             f"{sigma and sigma[0]}; pass statistics written by FeatureStats.save_npz or ADM")
        return SourceInfo(kind, None, None, mu[0][0])
    if kind == "folder":
        files = image_files(path)
        empty = [str(f) for f in files if f.stat().st_size == 0]
        if empty:
            raise ValueError(f"{what} {path} holds {len(empty)} empty image file(s): {', '.join(empty[:5])}; delete "
                             f"them (samples: then rerun the same `python -m sample` command, which samples them "
                             f"again)")
        return SourceInfo(kind, len(files), None)
    if kind == "shards":
        shard_files(str(source))  # a missing shard is named here
        return SourceInfo(kind, None, None)
    raise ValueError(f"{what} {path} is {kind}, not {SOURCE_FORMS}")


def probe_extractor(extractor: FeatureExtractor, image_shape: tuple[int, int] | None) -> tuple[int, int]:
    """(feature size D, number of logits C) of `extractor`, from one black image of the samples' size."""
    height, width = image_shape or (32, 32)
    feats, logits = extractor.features_and_logits(torch.zeros(1, 3, height, width, dtype=torch.uint8))
    return int(feats.shape[1]), int(logits.shape[1])


def check_stats_dim(info: SourceInfo, source: str, feature_dim: int, extractor: str) -> None:
    if info.feature_dim is not None and info.feature_dim != feature_dim:
        raise ValueError(f"--reference {source} holds statistics of {info.feature_dim}-dimensional features, but "
                         f"--extractor {extractor} gives {feature_dim}-dimensional ones: pass the statistics made "
                         f"with this extractor, or the extractor they were made with")


def read_previous(out: Path) -> dict[str, Any] | None:
    """The metrics.json already at `out` (None when there is none)."""
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder: pass the path of a .json file")
    if not out.is_file():
        return None
    try:
        return json.loads(out.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}


def check_previous(out: Path, settings: dict[str, Any], overwrite: bool) -> str | None:
    """None when `out` may be written: absent, or made with exactly `settings`. Otherwise a ValueError
    naming the settings that differ, unless `overwrite`; then the line to print about replacing it."""
    previous = read_previous(out)
    if previous is None:
        return None
    recorded = previous.get("settings") if isinstance(previous, dict) else None
    if recorded == settings:
        return f"{out}: recomputing a result made with the same settings and samples"
    if recorded is None:
        why = "records no settings (not valid JSON, or written by an earlier version)"
    else:
        changed = sorted(k for k in settings.keys() | recorded.keys() if recorded.get(k) != settings.get(k))
        why = "was made with other settings or samples: " + ", ".join(
            f"{k} {recorded.get(k)!r} -> {settings.get(k)!r}" for k in changed[:6])
    if overwrite:
        return f"{out} {why}; replacing it (--overwrite true)"
    raise ValueError(f"{out} {why}; it is kept: pass --out NEW.json to keep both results, or --overwrite true "
                     f"to replace it")
