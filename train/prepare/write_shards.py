"""Write one ImageFolder split as webdataset shards: `python -m train.prepare shards --root DIR --out DIR`.

Each sample holds `__key__` (the zero-padded global index of the source file), `jpg` (the file's own bytes
when it already is an RGB or grayscale JPEG, else a quality-95 re-encode of its 8-bit RGB conversion,
`train.data.transforms.to_rgb`) and `cls` (the class index, torchvision's sorted folder order); `classes.json`
maps index -> folder name. Shard k holds source files
[k * shard_size, (k+1) * shard_size), so shard contents never depend on which other shards exist, and a
rerun can skip finished shards. Each shard is written under a temporary name beside it and renamed once
complete (a crash or a full disk leaves no half shard; the rerun removes the temporary file), after a
`<prefix>-NNNNNN.json` summary beside it (its sample count and tar size, which the readers check to catch
truncated copies). A symlink loop, a file reached twice or class folders differing only in case stop the
run before any shard is written (`train.data.folder_files`). Corrupt or truncated
images are skipped, warned about, listed in their shard's summary, and totalled in the printed line and
the returned summary. Reading the shards is `train.data.image_shards`' job.
"""

from __future__ import annotations

import io
import json
import os
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import webdataset as wds
from PIL import Image

from tokenizers_vq.files import atomic_write, atomic_write_text, remove_stale_temps
from train.data.folder_files import find_classes_checked, make_dataset_checked
from train.data.transforms import UNREADABLE_IMAGE_ERRORS, CorruptImageWarning, to_rgb

__all__ = ["write_shards", "encode_jpeg", "KEY_DIGITS"]

KEY_DIGITS = 9  # __key__ width: room for 10^9 images, so keys sort like indices
_TAR_MTIME = 0.0  # fixed member mtime: the same input gives byte-identical shards


# JPEG modes kept byte for byte. CMYK / YCCK JPEGs are re-encoded as RGB: not every reader of the shards
# (metrics, other tools) converts them, and Adobe's inverted CMYK is easy to get wrong.
_KEPT_JPEG_MODES = ("RGB", "L")


def encode_jpeg(path: str | Path, quality: int = 95) -> bytes:
    """JPEG bytes for an image file: the original bytes if it is an RGB or grayscale JPEG, else a re-encode
    of its 8-bit RGB conversion (`to_rgb`: 16-bit scaled, CMYK converted).

    The file is fully decoded either way (`load()`), so truncated or corrupt files raise one of
    `train.data.transforms.UNREADABLE_IMAGE_ERRORS` here rather than when training reads the shard.
    """
    raw = Path(path).read_bytes()
    with Image.open(io.BytesIO(raw)) as image:
        image.load()
        if image.format == "JPEG" and image.mode in _KEPT_JPEG_MODES:
            return raw  # keep the original bytes: re-encoding would add a second generation of artefacts
        rgb = to_rgb(image)
    buffer = io.BytesIO()
    rgb.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _write_one_shard(job: dict[str, Any]) -> dict[str, Any]:
    """Write shard `job["name"]` from `job["files"]` (list of (path, class index)) unless it exists.

    Returns its summary: {"shard", "first_index", "num_files", "num_samples", "skipped", "reused"}.
    """
    out, name, first, files = Path(job["out"]), job["name"], job["first_index"], job["files"]
    final, summary_path = out / f"{name}.tar", out / f"{name}.json"
    if final.is_file():
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
        if summary and (summary["first_index"], summary["num_files"]) != (first, len(files)):
            raise ValueError(
                f"{final} holds files {summary['first_index']}..+{summary['num_files']}, but this run "
                f"would put {first}..+{len(files)} there: was it written with another shard_size or tree?"
            )
        size = os.path.getsize(final)
        if summary.get("num_bytes") not in (None, size):
            raise ValueError(
                f"{final} has {size} bytes but {summary_path} records {summary['num_bytes']}: the shard is "
                f"truncated or was replaced; delete it and its .json and rerun to re-write it"
            )
        return {**summary, "shard": final.name, "reused": True}

    # One process writes a shard: temporary files of its name are leftovers of a killed run.
    remove_stale_temps(final)
    remove_stale_temps(summary_path)
    summary: dict[str, Any] = {"shard": final.name, "first_index": first, "num_files": len(files)}
    skipped: list[str] = []

    def write_tar(tmp: str) -> None:
        written = 0
        with open(tmp, "wb") as stream, wds.TarWriter(stream, encoder=False, mtime=_TAR_MTIME) as sink:
            for offset, (path, label) in enumerate(files):
                try:
                    data = encode_jpeg(path, job["quality"])
                except UNREADABLE_IMAGE_ERRORS as exn:
                    warnings.warn(f"skipping unreadable image {path}: {exn}", CorruptImageWarning, stacklevel=1)
                    skipped.append(str(path))
                    continue
                sink.write({"__key__": f"{first + offset:0{KEY_DIGITS}d}", "jpg": data,
                            "cls": str(label).encode()})
                written += 1
        # num_samples and num_bytes let every reader tell a whole shard from a truncated copy.
        summary.update(num_samples=written, num_bytes=os.path.getsize(tmp), skipped=skipped)
        atomic_write_text(summary_path, json.dumps(summary, indent=1))  # before the tar is renamed into place

    atomic_write(final, write_tar, sync=True)  # the shard appears complete or not at all
    return {**summary, "reused": False}


def write_shards(
    root: str,
    out: str,
    shard_size: int = 1000,
    prefix: str | None = None,
    quality: int = 95,
    num_workers: int = 1,
) -> dict[str, Any]:
    """Write the ImageFolder split `root` (one subfolder per class) as webdataset shards in `out`.

    Args:
        root: ImageFolder split folder, e.g. /data/imagenet/train.
        out: Output folder for `<prefix>-NNNNNN.tar`, their `.json` summaries and `classes.json`.
        shard_size: Source files per shard (corrupt files count, so boundaries are stable across reruns).
        prefix: Shard name prefix; None uses the name of `root` (e.g. `train`).
        quality: JPEG quality for images that are not JPEG already.
        num_workers: Processes writing shards in parallel (1 = in this process).

    Returns:
        Summary: num_shards, shards_written, shards_reused, num_samples, num_skipped, skipped (paths).
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    root_path, out_path = Path(root), Path(out)
    prefix = prefix or root_path.resolve().name
    classes, class_to_idx = find_classes_checked(root_path)
    # Classes and files in sorted order (torchvision's), so global indices are reproducible; each real
    # file once, so a symlink loop or a doubly linked file is an error, not a bigger data set.
    files = make_dataset_checked(root_path, class_to_idx)
    out_path.mkdir(parents=True, exist_ok=True)

    classes_json = json.dumps({str(i): name for i, name in enumerate(classes)}, indent=1)
    classes_path = out_path / "classes.json"
    if not classes_path.is_file():
        atomic_write_text(classes_path, classes_json)
    elif json.loads(classes_path.read_text()) != json.loads(classes_json):
        raise ValueError(f"{classes_path} lists other classes than {root}: use another --out")

    jobs = [
        {"out": str(out_path), "name": f"{prefix}-{k:06d}", "first_index": start,
         "files": files[start : start + shard_size], "quality": quality}
        for k, start in enumerate(range(0, len(files), shard_size))
    ]  # fmt: skip
    if num_workers > 1:
        with ProcessPoolExecutor(num_workers) as pool:
            results = list(pool.map(_write_one_shard, jobs))
    else:
        results = [_write_one_shard(job) for job in jobs]

    skipped = [path for r in results for path in r.get("skipped", [])]
    summary = {
        "num_shards": len(results),
        "shards_written": sum(not r["reused"] for r in results),
        "shards_reused": sum(r["reused"] for r in results),
        "num_samples": sum(r.get("num_samples", 0) for r in results),
        "num_skipped": len(skipped),
        "skipped": skipped,
    }
    print(
        f"{out_path}: {summary['num_shards']} shards ({summary['shards_written']} written, "
        f"{summary['shards_reused']} already complete), {summary['num_samples']} images, "
        f"{len(classes)} classes, {len(skipped)} unreadable images skipped"
    )
    for path in skipped:
        print(f"  skipped: {path}")
    return summary
