"""Checks that a webdataset shard holds what its writer recorded: no truncation, no repeated key or file.

A tar cut at a member boundary (as an interrupted copy leaves it) reads as a shorter, valid tar; webdataset
and `tarfile` raise nothing. The writers therefore record per shard how many samples they wrote and how
many bytes the tar has (`train.prepare.write_shards`: `<prefix>-NNNNNN.json`; `train.prepare.extract_tokens`:
the shard list of `meta.json`), and every reader compares:

- `check_shard_files` before a job reads anything (cheap: one `stat` per shard when the byte size is
  recorded, else one pass over the tar headers, no member data);
- `counted_samples` as each shard's stream ends (a shard that shrank later, or remote shards);
- `scan_tar` for readers that index a tar by its headers anyway (random access).

A mismatch is a `TruncatedShardError`, a key repeated inside a shard or a shard listed twice a
`DuplicateSampleError`; both name the shard, what was expected and found, and the fix. Shards without a
record (written by another tool or an older version) are read as before, with a warning that their counts
cannot be checked. Which records a format has, and where they live, is the readers' business
(`train.data.tokens`, `train.data.image_shards`, `train.data.views`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import tarfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import webdataset as wds

from train.data.folder_files import DuplicateInputError

log = logging.getLogger(__name__)

__all__ = ["ShardRecord", "TarScan", "TruncatedShardError", "DuplicateSampleError", "scan_tar",
           "check_shard_files", "counted_samples", "summary_records", "is_local"]  # fmt: skip

# webdataset's key rule: the key is the member path up to the first dot of its base name.
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


class TruncatedShardError(ValueError):
    """A shard holds fewer (or more) samples or bytes than its writer recorded."""


class DuplicateSampleError(DuplicateInputError):
    """A sample key repeats inside a shard, or the same shard file is listed twice."""


@dataclass(frozen=True)
class ShardRecord:
    """What the writer recorded about one shard."""

    num_samples: int | None
    """Samples written into the shard (None: not recorded)."""
    num_bytes: int | None = None
    """Size of the tar file in bytes (None: not recorded, e.g. shards written by an older version)."""
    source: str = "its record"
    """The file that holds the record (named in errors)."""


@dataclass
class TarScan:
    """The samples of a local tar found from its headers alone (no member data is read)."""

    url: str
    samples: list[tuple[str, dict[str, tuple[int, int]]]] = field(default_factory=list)
    """(key, {extension: (data offset, size)}) of every sample with all the required members, in order."""
    incomplete: list[tuple[str, dict[str, tuple[int, int]]]] = field(default_factory=list)
    """Samples lacking a required member, or whose data runs past the end of the file."""
    duplicates: list[str] = field(default_factory=list)
    """Keys that occur in more than one sample."""

    @property
    def num_samples(self) -> int:
        return len(self.samples)


def is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def scan_tar(url: str, required: tuple[str, ...], wanted: tuple[str, ...] | None = None) -> TarScan:
    """Index local tar `url` by its headers: its samples grouped as webdataset groups them (consecutive
    members of one key; a repeated extension starts a new sample). Only extensions in `wanted` (default:
    `required`) are recorded; a sample counts when it has every `required` extension and all their data lies
    inside the file. Raises ValueError naming the file when it is no (uncompressed) tar."""
    wanted = wanted or required
    scan = TarScan(url)
    size = os.path.getsize(url)
    groups: list[tuple[str, dict[str, tuple[int, int]], bool]] = []  # key, members, every member whole
    try:
        with tarfile.open(url, "r:") as tar:  # "r:": uncompressed, so member offsets are file offsets
            for member in _members(tar):
                match = _KEY_EXT.match(member.name)
                if not member.isfile() or match is None:
                    continue
                key, ext = match.group(1), match.group(2)
                whole = member.offset_data + member.size <= size
                if not groups or groups[-1][0] != key or ext in groups[-1][1]:
                    groups.append((key, {}, True))
                if ext in wanted:
                    groups[-1][1][ext] = (member.offset_data, member.size)
                if not whole:
                    groups[-1] = (groups[-1][0], groups[-1][1], False)
    except tarfile.TarError as exn:  # tarfile's messages do not name the file
        raise ValueError(f"shard {url} is not a readable (uncompressed) tar file: {exn}") from exn
    seen: set[str] = set()
    for key, members, whole in groups:
        if key in seen:
            scan.duplicates.append(key)
        seen.add(key)
        if whole and all(ext in members for ext in required):
            scan.samples.append((key, members))
        else:
            scan.incomplete.append((key, members))
    return scan


def _members(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    """The members of `tar`; a file cut inside a member ends the list (the count then tells) instead of
    raising, unless not even the first header is readable."""
    while True:
        try:
            member = tar.next()
        except tarfile.ReadError:
            if tar.offset == 0:
                raise
            return
        if member is None:
            return
        yield member


def _fix(kind: str) -> str:
    return {"tokens": "re-copy it, or rerun `python -m train.prepare tokens` into an empty folder",
            "images": "re-copy it, or delete it and its .json summary and rerun `python -m train.prepare "
                      "shards` to re-write it"}.get(kind, "re-copy or re-write it")  # fmt: skip


def truncated_error(url: str, record: ShardRecord, found: int, kind: str, size: int | None = None) -> TruncatedShardError:
    """The error for shard `url` holding `found` samples against `record`."""
    sizes = f", {size} of the {record.num_bytes} bytes recorded" if size is not None and record.num_bytes else ""
    return TruncatedShardError(
        f"shard {url} holds {found} samples but {record.source} records {record.num_samples}{sizes}: the "
        f"file is truncated (an interrupted copy?) or was replaced; {_fix(kind)}")


def duplicate_key_error(url: str, key: str, kind: str) -> DuplicateSampleError:
    return DuplicateSampleError(
        f"shard {url} holds key {key!r} more than once: its samples would be read twice; {_fix(kind)} "
        f"(each key must occur once per shard)")


def check_shard_files(urls: list[str], records: dict[str, ShardRecord], required: tuple[str, ...],
                      kind: str) -> None:
    """Before anything is read: the same file twice is a DuplicateSampleError; a local shard whose size
    (or, without a recorded size, header count) disagrees with its record a TruncatedShardError. Shards
    without a record are warned about (counts cannot be checked). `kind`: "tokens" or "images" (the fix)."""
    real: dict[str, str] = {}
    for url in urls:
        if not is_local(url):
            continue
        path = os.path.realpath(url)
        if path in real:
            raise DuplicateSampleError(f"shard {url} is listed twice (also as {real[path]}): its samples would "
                                       f"be read twice; list each shard once")
        real[path] = url
    unchecked = []
    for url in urls:
        record = records.get(url)
        if not is_local(url) or record is None or record.num_samples is None:
            unchecked.append(url)
            continue
        size = os.path.getsize(url)
        if record.num_bytes is not None and size == record.num_bytes:
            continue  # the tar the writer closed, byte for byte in length: nothing was cut off
        scan = scan_tar(url, required)
        if scan.duplicates:
            raise duplicate_key_error(url, scan.duplicates[0], kind)
        if record.num_bytes is not None or scan.num_samples != record.num_samples:
            raise truncated_error(url, record, scan.num_samples, kind, size)
    if unchecked:
        log.warning("%d shard(s) (e.g. %s) have no recorded sample count (written by another tool or an "
                    "older version): their counts cannot be checked, so a truncated copy would read as "
                    "less data; re-write them to record it", len(unchecked), unchecked[0])


def counted_samples(urls: Iterable[dict[str, Any]], records: dict[str, ShardRecord], required: tuple[str, ...],
                    kind: str, select_files: Callable[[str], bool] | None = None,
                    handler: Callable[[BaseException], bool] = wds.reraise_exception) -> Iterator[dict[str, Any]]:
    """webdataset samples of each shard in `urls` (dicts with "url"), shard by shard; a key repeated inside a
    shard raises DuplicateSampleError, and a shard whose stream ends with another number of complete samples
    (all `required` members) than its record raises TruncatedShardError (never passed to `handler`)."""
    for item in urls:
        url = item["url"]
        keys: set[str] = set()
        found = 0
        for sample in wds.tarfile_to_samples(handler=handler, select_files=select_files)([{"url": url}]):
            key = sample.get("__key__")
            if key in keys:
                raise duplicate_key_error(url, key, kind)
            keys.add(key)
            found += all(ext in sample for ext in required)
            yield sample
        record = records.get(url)
        if record is not None and record.num_samples is not None and found != record.num_samples:
            raise truncated_error(url, record, found, kind)


def summary_records(urls: list[str]) -> dict[str, ShardRecord]:
    """Records of local shards from the `<name>.json` summary beside each `<name>.tar`
    (`train.prepare.write_shards` and `extract_tokens` write them); shards without one are left out."""
    records = {}
    for url in urls:
        if not is_local(url):
            continue
        path = Path(url).with_suffix(".json")
        if not path.is_file():
            continue
        try:
            summary = json.loads(path.read_text())
        except json.JSONDecodeError:
            continue
        if isinstance(summary, dict) and isinstance(summary.get("num_samples"), int):
            records[url] = ShardRecord(summary["num_samples"], summary.get("num_bytes"), str(path))
    return records
