"""Reference statistics for FID/KID/PR, from an ADM `.npz`, an image folder or webdataset shards, cached.

Sources, picked by what `source` is:
  * `.npz` with `mu`/`sigma` (ADM reference batch): used as is, FID only (no features for KID/PR);
  * `.npz` with `arr_0` uint8 [N,H,W,3] (ADM sample layout): images, features extracted here;
  * a folder of PNG/JPEG files (searched recursively, sorted, so ImageFolder layouts work);
  * webdataset shards: a `.tar`, a brace pattern (`shard-{000..009}.tar`) or a folder of `.tar` files;
    only `jpg`/`jpeg`/`png` members are decoded (never `.pyd`/`.pth`), other members are skipped.
Image sources are cached at `<cache_dir>/<name>-<data_hash[:12]>-<extractor>-<weights_hash[:12]>.npz` with
`mu`, `sigma`, `num_samples` and `features`. The data hash is sha256 of the file bytes for `.npz`, and
sha256 over "relative name<TAB>size" lines of the sorted files for folders and shards (cheap; a file edited
in place with the same size is not noticed). A cache file that cannot be read or holds malformed or
non-finite statistics is computed again (with a warning naming it), and the temporary file of a run killed
while writing the cache is removed first. An image that cannot be decoded is an error naming the file.
Metric formulas live in `metrics.fid` / `metrics.evaluate`.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from torchvision.io import ImageReadMode, decode_image

from metrics.checks import check_stats, require_finite
from metrics.features import FeatureExtractor
from metrics.fid import FeatureStats
from tokenizers_vq.files import file_sha256, remove_stale_temps

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_CHUNK = 256  # images decoded per extractor call: bounds memory for 50k-image references


@dataclass
class Reference:
    """Reference statistics; `features` [N,D] float32 when computed from images (KID/PR need them)."""

    stats: FeatureStats
    features: np.ndarray | None
    source: str
    kind: str  # "npz-stats" | "npz-images" | "folder" | "shards"
    data_sha256: str
    cache_path: Path | None = None


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/engram-vision/reference-stats` (or ~/.cache/...)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "engram-vision" / "reference-stats"


def _listing_hash(files: list[Path], root: Path) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.relative_to(root).as_posix()}\t{f.stat().st_size}\n".encode())
    return h.hexdigest()


def image_files(folder: str | Path) -> list[Path]:
    """PNG/JPEG files under `folder`, recursively, sorted by relative path."""
    root = Path(folder)
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def shard_files(source: str) -> list[Path]:
    """The `.tar` shards a source names: one file, a brace pattern, or a folder of shards."""
    path = Path(source)
    if path.is_dir():
        return sorted(path.glob("*.tar"))
    import braceexpand  # a webdataset dependency

    files = [Path(p) for p in braceexpand.braceexpand(source)]
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"shards not found: {missing[:5]}")
    return files


SOURCE_FORMS = "an ADM .npz (mu/sigma or arr_0 images), an image folder or webdataset shards"


def npz_keys(path: str | Path, what: str = "reference") -> list[str]:
    """The arrays an `.npz` holds; a ValueError naming the file when it is no readable zip archive."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return list(data.files)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise ValueError(f"{what} {path} is not a readable .npz ({type(error).__name__}: {error}); it is cut "
                         f"short or another format: write it again") from error


def source_kind(source: str | Path, what: str = "reference") -> str:
    """Which loader applies to `source` (see the module docstring); `what` names it in errors."""
    path = Path(source)
    if path.suffix == ".npz":
        if not path.is_file():
            raise FileNotFoundError(f"{what} {path} does not exist: pass {SOURCE_FORMS}")
        files = npz_keys(path, what)
        if "arr_0" in files:
            return "npz-images"
        if "mu" in files and "sigma" in files:
            return "npz-stats"
        raise KeyError(f"{path}: expected 'arr_0' (images) or 'mu'+'sigma' (stats), found {files}")
    if path.is_dir():
        if image_files(path):
            return "folder"
        if list(path.glob("*.tar")):
            return "shards"
        raise FileNotFoundError(f"{what} {path} holds no PNG/JPEG images and no .tar shards: pass {SOURCE_FORMS}")
    if ".tar" in str(source):
        return "shards"
    if not path.exists():
        raise FileNotFoundError(f"{what} {source} does not exist: pass {SOURCE_FORMS}")
    raise FileNotFoundError(f"{what} {source} is not an .npz, an image folder or webdataset shards")


UNREADABLE_FIX = ("delete it; if it is a sample (<out>/images/NNNNNN.png), rerun the same `python -m sample` "
                  "command, which samples missing images again; if it is a reference image, replace it")


def _decode(data: bytes | torch.Tensor, image_size: int | None, name: str = "image") -> torch.Tensor:
    """uint8 [3,H,W] of one encoded image; `name` (its file) is in the error when it cannot be decoded."""
    raw = data if isinstance(data, torch.Tensor) else torch.frombuffer(bytearray(data), dtype=torch.uint8)
    if raw.numel() == 0:
        raise ValueError(f"{name} is empty (0 bytes): {UNREADABLE_FIX}")
    try:
        img = decode_image(raw, mode=ImageReadMode.RGB)
    except RuntimeError as error:
        raise ValueError(f"{name} is not a readable image ({error}): {UNREADABLE_FIX}") from error
    return _decode_resize(img, image_size) if image_size is not None else img


def _batches(images: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
    chunk: list[torch.Tensor] = []
    for img in images:
        chunk.append(img)
        if len(chunk) == _CHUNK:
            yield _stack(chunk)
            chunk = []
    if chunk:
        yield _stack(chunk)


def _stack(chunk: list[torch.Tensor]) -> torch.Tensor:
    sizes = {tuple(t.shape) for t in chunk}
    if len(sizes) > 1:
        raise ValueError(f"images differ in size {sorted(sizes)[:3]}...; pass image_size to resize and crop")
    return torch.stack(chunk)


def npz_images(path: str | Path) -> torch.Tensor:
    """`arr_0` uint8 [N,H,W,3] of an ADM-layout `.npz` as uint8 [N,3,H,W]."""
    with np.load(path, allow_pickle=False) as data:
        arr = data["arr_0"]
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"{path}: arr_0 must be uint8 [N,H,W,3], got {arr.dtype} {arr.shape}")
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def iter_image_batches(source: str | Path, kind: str, image_size: int | None = None) -> Iterator[torch.Tensor]:
    """uint8 [B,3,H,W] batches of the images in `source` (kind from `source_kind`), in a fixed order."""
    if kind == "npz-images":
        images = npz_images(source)
        if image_size is not None:
            images = torch.stack([_decode_resize(im, image_size) for im in images])
        yield from images.split(_CHUNK)
    elif kind == "folder":
        yield from _batches(_decode(f.read_bytes(), image_size, str(f)) for f in image_files(source))
    elif kind == "shards":
        yield from _batches(_shard_images(shard_files(str(source)), image_size))
    else:
        raise ValueError(f"{source} ({kind}) holds no images")


def _decode_resize(img: torch.Tensor, image_size: int) -> torch.Tensor:
    # Shorter side to image_size, then centre crop (how ADM-style reference batches are made).
    return TF.center_crop(TF.resize(img, image_size, antialias=True), [image_size, image_size])


def _shard_images(shards: list[Path], image_size: int | None) -> Iterator[torch.Tensor]:
    for shard in shards:
        count = 0
        with tarfile.open(shard) as tar:
            for member in tar:
                if member.isfile() and Path(member.name).suffix.lower() in IMAGE_SUFFIXES:
                    count += 1
                    yield _decode(tar.extractfile(member).read(), image_size,  # type: ignore[union-attr]
                                  f"{shard}:{member.name}")
        _check_recorded_count(shard, count)


def _check_recorded_count(shard: Path, count: int) -> None:
    """A truncated copy of a reference shard must not become a reference of fewer images: compare with the
    count the shard writer recorded in `<name>.json` (python -m train.prepare shards), when there is one."""
    summary = shard.with_suffix(".json")
    try:
        recorded = json.loads(summary.read_text()).get("num_samples") if summary.is_file() else None
    except (OSError, ValueError):
        recorded = None
    if isinstance(recorded, int) and recorded != count:
        raise ValueError(f"reference shard {shard} holds {count} images but {summary} records {recorded}: the "
                         f"shard is truncated or was replaced; copy it again or rewrite it with python -m "
                         f"train.prepare shards")


def extract(extractor: FeatureExtractor, batches: Iterator[torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
    """Features [N,D] and logits [N,C] (float32 numpy) over all batches."""
    feats, logits = [], []
    for batch in batches:
        f, lg = extractor.features_and_logits(batch)
        feats.append(f.numpy())
        logits.append(lg.numpy())
    if not feats:
        raise ValueError("no images found")
    return np.concatenate(feats), np.concatenate(logits)


def data_hash(source: str | Path, kind: str) -> str:
    """sha256 identifying the reference data (see the module docstring for the scheme)."""
    if kind.startswith("npz"):
        return file_sha256(source)
    if kind == "folder":
        return _listing_hash(image_files(source), Path(source))
    shards = shard_files(str(source))
    return _listing_hash(shards, Path(os.path.commonpath([s.parent for s in shards])))


def load_reference(source: str | Path, extractor: FeatureExtractor, cache_dir: str | Path | None = None,
                   name: str | None = None, image_size: int | None = None, digest: str | None = None) -> Reference:
    """Reference stats for `source` under `extractor`, computed once and then read from the cache.

    digest: `data_hash(source)` when the caller has it already (hashing a large .npz takes seconds)."""
    source = str(source)
    kind = source_kind(source)
    digest = digest or data_hash(source, kind)
    if kind == "npz-stats":
        return Reference(FeatureStats.load_npz(source), None, source, kind, digest)
    cache_path = reference_cache_path(source, extractor, digest, cache_dir, name, image_size)
    if cache_path.is_file():
        try:
            stats, features = _read_cache(cache_path)
            stats.source = f"reference {source} (cached in {cache_path})"
            return Reference(stats, features, source, kind, digest, cache_path)
        except (ValueError, KeyError) as error:
            warnings.warn(f"reference statistics cache {cache_path} is unusable ({error}); computing it again",
                          stacklevel=2)
    # A run killed while writing the cache left its temporary file; nothing else writes this cache now.
    remove_stale_temps(cache_path)
    features, _ = extract(extractor, iter_image_batches(source, kind, image_size))
    stats = FeatureStats.from_features(features, f"reference {source}")
    stats.save_npz(cache_path, features=features)
    stats.source = f"reference {source}"
    return Reference(stats, features, source, kind, digest, cache_path)


def reference_cache_path(source: str, extractor: FeatureExtractor, digest: str, cache_dir: str | Path | None = None,
                         name: str | None = None, image_size: int | None = None) -> Path:
    """Where `load_reference` caches the statistics of `source` (data hash `digest`) under `extractor`."""
    name = name or Path(source.split("{")[0].rstrip("/")).stem or "reference"
    size_tag = f"-{image_size}px" if image_size is not None else ""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return cache / f"{name}{size_tag}-{digest[:12]}-{extractor.name}-{extractor.weights_sha256[:12]}.npz"


def _read_cache(path: Path) -> tuple[FeatureStats, np.ndarray]:
    """(stats, features [N,D]) of a cache file, or a ValueError/KeyError saying what is wrong with it."""
    stats = FeatureStats.load_npz(path)  # unreadable, truncated or non-finite mu/sigma: ValueError
    try:
        with np.load(path, allow_pickle=False) as data:
            if "features" not in data.files:
                raise KeyError(f"{path} has no 'features'")
            features = data["features"]
    except (OSError, EOFError, zipfile.BadZipFile) as error:
        raise ValueError(f"{path}: {error}") from error
    if features.ndim != 2 or features.shape[1] != stats.mu.size:
        raise ValueError(f"features {features.shape} do not match mu {stats.mu.shape}")
    require_finite(features, f"the features in {path}")
    check_stats(stats.mu, stats.sigma, f"the statistics in {path}")
    return stats, features
