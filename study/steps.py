"""Records of the study runner's steps: the settings each step's output was made with, and whether the
step got to its end.

Each resumable step of `study/runner.py` (train, sample, evaluate, probe, reconstruct) writes
`study_<step>.json` beside its output twice: with `"complete": false` and its settings before it writes
anything, and with `"complete": true` and the files it made once its last file is in place. A rerun
therefore tells, for every step:

- finished: the record is complete, its settings are the ones the study names now, and every file it
  lists is there (with the recorded sha256 where one is kept): the step is skipped;
- interrupted (killed, or stopped by an error): the record is incomplete but its settings are today's, so
  the step runs again and resumes what it can (training from last.ckpt, sampling the missing batches);
- made with other settings, or outputs without any record (an older runner, or made by hand): the runner
  refuses, naming each differing setting, unless it runs with `rerun_changed`; then the step's old
  outputs move to `<study>/replaced/<time>/<their path>` (nothing is overwritten or deleted) and the step
  is redone.

A `Ledger` makes these calls; in a dry pass it only looks, so the runner can name every changed step of
the study in one error before any work. What a step's settings are and how it runs is the runner's job.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenizers_vq.files import atomic_write_text, file_sha256

RECORD_FORMAT = "engram-vision-study-step"
REPLACED_DIR = "replaced"
NO_RECORD = ("outputs without a record of the settings they were made with (an older runner, or made by "
             "hand)")


def record_path(folder: Path, step: str) -> Path:
    """Where the record of `step` lies: `<folder>/study_<step>.json`."""
    return folder / f"study_{step}.json"


def canonical(value: Any) -> Any:
    """`value` as JSON reads it back (tuples become lists, keys strings), so old and new compare alike."""
    return json.loads(json.dumps(value, sort_keys=True))


def settings_digest(settings: Any) -> str:
    """sha256 of the settings' canonical JSON: what a later step records as its input."""
    return hashlib.sha256(json.dumps(canonical(settings), sort_keys=True).encode()).hexdigest()


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: value}


def _short(value: Any) -> str:
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value[:12]  # a sha256: its start tells two apart
    text = json.dumps(value)
    return text if len(text) <= 120 else text[:117] + "..."


def differences(old: Any, new: Any) -> list[str]:
    """`key: old -> new` for every (dotted, nested) setting that differs; `(unset)` for a missing one."""
    before, after = _flatten(old), _flatten(new)
    missing = object()
    lines = []
    for key in sorted(set(before) | set(after)):
        a, b = before.get(key, missing), after.get(key, missing)
        if a != b:
            lines.append(f"{key or '(settings)'}: {'(unset)' if a is missing else _short(a)} -> "
                         f"{'(unset)' if b is missing else _short(b)}")
    return lines


def path_digest(path: str | Path) -> str | None:
    """sha256 of a file, or of a folder's files (names and contents, hidden files aside); None if absent."""
    path = Path(path)
    if path.is_file():
        return file_sha256(path)
    if not path.is_dir():
        return None
    digest = hashlib.sha256()
    for item in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")):
        digest.update(f"{item.relative_to(path).as_posix()}\0{file_sha256(item)}\n".encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class Change:
    """A finished (or started) step whose settings differ from the study's."""

    folder: Path
    """The step's folder."""
    step: str
    """The step's name (train, sample, evaluate, ...)."""
    differences: list[str]
    """`key: old -> new` lines, or why the settings are unknown."""

    def describe(self, out: Path) -> str:
        where = _relative(self.folder, out)
        return f"  {where} ({self.step}): " + "; ".join(self.differences)


class StaleResultsError(ValueError):
    """Steps of the study were made with other settings than the study names now."""


class NotDone(Exception):
    """Raised in a dry pass by the first step of a chain that would run: the later steps depend on it."""


def stale_message(changes: list[Change], out: Path) -> str:
    count = f"{len(changes)} step{'s' if len(changes) != 1 else ''}"
    return (f"study {out}: {count} already made with other settings than the study names now (their results "
            f"are kept, nothing ran):\n" + "\n".join(change.describe(out) for change in changes) +
            f"\nEither give the study a new `out` folder (or restore the old settings), or rerun with "
            f"`--rerun_changed true` to redo these steps and the ones that depend on them; their old outputs "
            f"then move to {out / REPLACED_DIR}/<time>/.")


def _relative(path: Path, out: Path) -> str:
    try:
        return str(path.resolve().relative_to(out.resolve()))
    except ValueError:
        return str(path)


def _log(message: str) -> None:
    print(f"[study] {message}", flush=True)


def _read(path: Path) -> dict[str, Any] | None:
    """The record, or None when it is missing or not one (an unreadable record says nothing of the settings)."""
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) and record.get("format") == RECORD_FORMAT else None


@dataclass
class Ledger:
    """Decides for each step of one study run whether it is finished, to resume, or changed."""

    out: Path
    """The study directory (replaced outputs go under `<out>/replaced/<time>/`)."""
    rerun_changed: bool = False
    """Redo changed steps (moving their old outputs aside) instead of refusing."""
    dry: bool = False
    """Only look: collect changes and raise `NotDone` at the first step that would run."""
    changes: list[Change] = field(default_factory=list)
    """What a dry pass found."""
    _stamp: Path | None = None
    _hashes: dict[tuple[str, int, int], str] = field(default_factory=dict)

    def file_hash(self, path: Path) -> str:
        """file_sha256, once per file and process (a rerun checks the same model from several steps)."""
        stat = path.stat()
        key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        if key not in self._hashes:
            self._hashes[key] = file_sha256(path)
        return self._hashes[key]

    def done(self, folder: Path, step: str, settings: dict[str, Any], owned: tuple[str, ...]) -> bool:
        """True when `step` in `folder` finished with `settings`; False when it is to run (resumed when its
        record is today's but incomplete). `owned`: the step's outputs, relative to `folder` ("." for the
        whole folder), which a changed step moves aside."""
        settings = canonical(settings)
        record = _read(record_path(folder, step))
        if record is not None and record.get("settings") == settings:
            problems = self._output_problems(folder, record) if record.get("complete") else None
            if problems == []:
                return True
            if problems and any("sha256" in problem for problem in problems):
                return self._changed(folder, step, problems, owned)
            if self.dry:
                raise NotDone
            where = _relative(folder, self.out)
            if problems is None:
                _log(f"{where}: the {step} step was interrupted; running it again with the same settings")
            else:
                _log(f"{where}: the {step} step's {', '.join(problems)}; running it again")
            return False
        present = [name for name in owned if _present(folder, name)]
        if record is None and not present:
            if self.dry:
                raise NotDone
            return False
        diffs = [NO_RECORD] if record is None else differences(record.get("settings"), settings)
        return self._changed(folder, step, diffs or ["settings differ"], owned)

    def _output_problems(self, folder: Path, record: dict[str, Any]) -> list[str]:
        problems = []
        for name, sha in (record.get("outputs") or {}).items():
            path = folder / name
            if not path.exists():
                problems.append(f"{name} is missing")
            elif sha is not None and path.is_file() and self.file_hash(path) != sha:
                problems.append(f"{name} was changed after the step (sha256 {sha[:12]} recorded, "
                                f"{self.file_hash(path)[:12]} now)")
        return problems

    def _changed(self, folder: Path, step: str, diffs: list[str], owned: tuple[str, ...]) -> bool:
        change = Change(folder, step, diffs)
        if self.dry:
            self.changes.append(change)
            raise NotDone
        if not self.rerun_changed:
            raise StaleResultsError(stale_message([change], self.out))
        moved = self._move_aside(folder, step, owned)
        _log(f"{_relative(folder, self.out)}: the {step} step's settings changed ({'; '.join(diffs)}); its old "
             f"outputs are now under {_relative(moved, self.out)}; redoing it")
        return False

    def _move_aside(self, folder: Path, step: str, owned: tuple[str, ...]) -> Path:
        if self._stamp is None:
            base = self.out / REPLACED_DIR / time.strftime("%Y%m%d-%H%M%S")
            stamp, n = base, 1
            while stamp.exists():
                n += 1
                stamp = base.with_name(f"{base.name}-{n}")
            self._stamp = stamp
        target = self._stamp / _relative(folder, self.out)
        names = ["."] if "." in owned else [*owned, record_path(folder, step).name]
        for name in names:
            source = folder if name == "." else folder / name
            if not source.exists():
                continue
            destination = target if name == "." else target / name
            if destination.exists():  # e.g. the folder was replaced once already in this call
                raise FileExistsError(f"cannot move {source} aside: {destination} exists; move it away by hand")
            destination.parent.mkdir(parents=True, exist_ok=True)
            # a rename within the study directory: nothing is copied or deleted
            os.replace(source, destination) if source.is_file() else shutil.move(str(source), str(destination))
        return target

    def start(self, folder: Path, step: str, settings: dict[str, Any]) -> None:
        """Record the step's settings before it writes anything (incomplete until `finish`)."""
        self._write(folder, step, settings, False, {})

    def finish(self, folder: Path, step: str, settings: dict[str, Any], outputs: dict[str, str | None]) -> None:
        """Mark the step complete, last, once every file in `outputs` (name: sha256 or None) is in place."""
        missing = [name for name in outputs if not (folder / name).exists()]
        if missing:
            raise RuntimeError(f"{folder}: the {step} step ended without writing {missing}")
        self._write(folder, step, settings, True, outputs)

    def _write(self, folder: Path, step: str, settings: dict[str, Any], complete: bool,
               outputs: dict[str, str | None]) -> None:
        record = {"format": RECORD_FORMAT, "step": step, "complete": complete, "settings": canonical(settings),
                  "outputs": outputs}
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(record_path(folder, step), json.dumps(record, indent=2, sort_keys=True) + "\n")


def _present(folder: Path, name: str) -> bool:
    if name == ".":
        return folder.is_dir() and any(folder.iterdir())
    return (folder / name).exists()


__all__ = ["Change", "Ledger", "NotDone", "StaleResultsError", "differences", "path_digest", "record_path",
           "settings_digest", "stale_message"]
