"""File helpers every package uses: atomic writes, file hashes, safe `torch.load` and strict state-dict
loading with a readable mismatch report.

`atomic_write` is the project's one way to write a file (a temporary file beside it, then a rename;
errors name the file; the file gets the mode a plain `open(path, "w")` of a new file would give under the
process umask; leftovers of a killed writer of the same name are removed). The model-folder format
(`model.safetensors` + `config.json`) built on these is `tokenizers_vq.model_dir`.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import pickle
import secrets
import stat
import threading
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

try:  # POSIX: a writer locks its temporary file, so a leftover of a killed writer can be told apart
    import fcntl
except ImportError:  # pragma: no cover - Windows: no locks, leftovers only go through remove_stale_temps
    fcntl = None  # type: ignore[assignment]

TEMP_SUFFIX = ".tmp"
"""safetensors metadata key of the JSON {kind, config} a model's weights were saved with."""
_TEMP_SLOTS = 4  # fixed temporary names tried first, so the next writer finds leftovers without a listing
_RANDOM_TRIES = 100


class CorruptFileError(ValueError):
    """A file that is truncated, not in its format, or contradicts the files beside it (the message names
    the file and, for a config, the field, and says how to get a good copy)."""


# ------------------------------------------------------------------------------------------ torch files


def _looks_like_torch_file(path: Path) -> bool:
    """A torch.save zip archive or a legacy torch pickle (protocol >= 2): the refusals of the safe
    unpickler on such a file are security refusals, not corruption."""
    if zipfile.is_zipfile(path):
        return True
    with open(path, "rb") as handle:
        return handle.read(1) == b"\x80"


def _corrupt_message(path: Path, error: BaseException, what: str) -> str:
    first = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
    size = path.stat().st_size if path.exists() else 0
    return (f"{path} is truncated or corrupt ({size} bytes; {what}: {type(error).__name__}: {first}): copy it "
            f"again from where it came from (a LlamaGen file: download it again; a Lightning checkpoint: copy it "
            f"again or resume from an earlier one; our model folder: re-export it)")


def safe_torch_load(path: str | Path) -> Any:
    """`torch.load` that unpickles tensors, containers and argparse.Namespace only.

    A class or call outside that list raises torch's `pickle.UnpicklingError` (nothing runs). A truncated or
    corrupt file (cut copy, zero bytes, not a torch file) raises CorruptFileError naming it, instead of a
    zip, EOF or unpickler error that suggests loading it unsafely.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if _looks_like_torch_file(path):
            raise  # an object outside the allow-list: the security refusal, in torch's own words
        # torch's own message would suggest weights_only=False: never advice to give about a damaged file
        raise CorruptFileError(_corrupt_message(path, ValueError("neither a torch zip archive nor a torch pickle"),
                                                "torch.load")) from error
    except (PermissionError, MemoryError):
        raise
    except Exception as error:  # RuntimeError (zip), EOFError, OSError(EINVAL), KeyError...: a bad file
        raise CorruptFileError(_corrupt_message(path, error, "torch.load")) from error


def state_dict_mismatch(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], source: str,
                        optional_keys: tuple[str, ...] = ()) -> str | None:
    """None when `state_dict` fits `model` exactly; else a short report naming the missing, unexpected and
    wrong-shape keys (the first five of each), instead of torch's wall of keys."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict and k not in optional_keys]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
             for k, v in state_dict.items() if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    if not (missing or unexpected or wrong):
        return None
    lines = [f"{source} does not fit this model config ({len(missing)} missing, {len(unexpected)} "
             f"unexpected, {len(wrong)} wrong-shape keys); is it the right checkpoint and size?"]
    for title, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if keys:
            lines.append(f"  {title}: " + ", ".join(keys[:5]) + (" ..." if len(keys) > 5 else ""))
    return "\n".join(lines)


def load_state_dict_checked(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], source: str,
                            optional_keys: tuple[str, ...] = ()) -> None:
    """Strict load that raises `state_dict_mismatch`'s report (ValueError) when the file does not fit.

    Keys that differ are first offered to the model's own load hooks (an older layout they convert, e.g.
    EngramMemory's separate key/value projections); the report is raised only when something is still left
    over, missing or of the wrong shape. A model that raised is half-loaded: callers discard it.
    optional_keys: bookkeeping buffers the file may lack (the model keeps its own values for them).
    """
    report = state_dict_mismatch(model, state_dict, source, optional_keys)
    try:
        result = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as error:  # wrong shapes
        raise ValueError(report or f"{source}: {error}") from error
    if report and ([k for k in result.missing_keys if k not in optional_keys] or result.unexpected_keys):
        raise ValueError(report)


# ------------------------------------------------------------------------------------------ temporary files

# Temporary files this process is writing now, by (device, inode). Locks taken through NFS are per process,
# so another thread's lock would not stop a cleaner here: this set does. The lock orders a writer's check
# that its new file is still linked against a cleaner's removal.
_WRITING: set[tuple[int, int]] = set()
_WRITING_LOCK = threading.Lock()


def temp_pattern(path: str | Path) -> str:
    """Glob (in `path`'s folder) of the temporary files `atomic_write` makes for `path` (it also matches
    those of longer names, e.g. `path`.json: filter with `temp_target`)."""
    return f".{Path(path).name}.*{TEMP_SUFFIX}"


def temp_target(tmp: str | Path) -> str | None:
    """The file name an `atomic_write` temporary file was for (`.<name>.<random>.tmp` -> `<name>`), else None."""
    name = Path(tmp).name
    if not (name.startswith(".") and name.endswith(TEMP_SUFFIX)) or name.count(".") < 3:
        return None
    return name[1:].removesuffix(TEMP_SUFFIX).rsplit(".", 1)[0]


def _flock(fd: int) -> bool | None:
    """Try to lock `fd` exclusively without waiting: True locked, False another holder, None no locks here."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError:  # ENOLCK, ENOSYS, EINVAL: a file system without locks
        return None


def _remove_if_stale(tmp: str | Path, when_unknown: bool) -> bool:
    """Remove `tmp` when no live writer holds it (its writer locks it until the rename); True if removed.

    when_unknown: also remove it where locks cannot tell (no lock support, another user's file): only for a
    caller that knows no other writer of that name runs.
    """
    try:
        fd = os.open(tmp, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return False
    except OSError:
        if when_unknown:
            Path(tmp).unlink(missing_ok=True)
            return True
        return False
    try:
        with _WRITING_LOCK:
            held = os.fstat(fd)
            if (held.st_dev, held.st_ino) in _WRITING:
                return False  # another thread of this process is writing it
            state = _flock(fd)
            if state is False or (state is None and not when_unknown):
                return False
            try:
                now = os.stat(tmp)
            except FileNotFoundError:
                return False
            if (now.st_dev, now.st_ino) != (held.st_dev, held.st_ino):
                return False  # replaced since we opened it: not the file we locked
            os.unlink(tmp)  # while holding the lock: its writer, if it only now locks it, sees it unlinked
            return True
    finally:
        os.close(fd)


def remove_stale_temps(path: str | Path) -> list[Path]:
    """Delete the temporary files killed writers of `path` left behind (any name `atomic_write` ever used,
    older random ones included); returns what was removed.

    A temporary file a live writer holds locked is kept. Where the file system has no locks, every one is
    removed: call it only where no other process is writing `path` at the same time (`atomic_write` itself
    removes only the leftovers it can prove stale).
    """
    path = Path(path)
    if not path.parent.is_dir():
        return []
    candidates = sorted(t for t in path.parent.glob(temp_pattern(path)) if temp_target(t) == path.name)
    return [tmp for tmp in candidates if _remove_if_stale(tmp, when_unknown=True)]


def _create_temp(path: Path) -> tuple[str, int, tuple[int, int]]:
    """Create and lock a new temporary file for `path`: (name, fd, registry key (device, inode)).

    The fixed names `.<name>.0.tmp` to `.<name>.3.tmp` are tried first; one that exists is removed when its
    writer is dead (that is how a killed writer's leftover goes on the next write, without listing a folder
    of 50,000 PNGs), else skipped; random names follow when every fixed one is busy. The file is created with mode
    0666, so the kernel applies the umask (and a default ACL) exactly as for any new file.
    """
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    names = [str(slot) for slot in range(_TEMP_SLOTS)]
    attempt = 0
    while attempt < _TEMP_SLOTS + _RANDOM_TRIES:
        fixed = attempt < _TEMP_SLOTS
        tmp = os.path.join(path.parent, f".{path.name}.{names[attempt] if fixed else secrets.token_hex(4)}"
                                        f"{TEMP_SUFFIX}")
        try:
            fd = os.open(tmp, flags, 0o666)
        except FileExistsError:
            if not (fixed and _remove_if_stale(tmp, when_unknown=False)):
                attempt += 1  # a live writer's (or, without locks, an unknown one's): the next name
            continue
        if _flock(fd) is False:  # a cleaner got it between the create and the lock; it removes it
            os.close(fd)
            attempt += 1
            continue
        with _WRITING_LOCK:
            held = os.fstat(fd)
            try:
                now = os.stat(tmp)
            except FileNotFoundError:
                now = None
            if held.st_nlink and now is not None and (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino):
                key = (held.st_dev, held.st_ino)
                _WRITING.add(key)
                break
        os.close(fd)  # removed by a cleaner before we locked it
        attempt += 1
    else:
        raise FileExistsError(17, f"could not create a temporary file for {path}: all candidate names exist")
    for slot in names[attempt + 1:] if attempt < _TEMP_SLOTS else ():  # leftovers of concurrent killed writers
        other = os.path.join(path.parent, f".{path.name}.{slot}{TEMP_SUFFIX}")
        if os.path.lexists(other):
            _remove_if_stale(other, when_unknown=False)
    return tmp, fd, key


def _keep_mode_and_lock(tmp: str, mode: int, key: tuple[int, int], fds: list[int],
                        keys: list[tuple[int, int]]) -> None:
    """After `write(tmp)`: a writer that put a new file at `tmp` (safetensors writes its own 0600 temporary
    file and renames it there) gets the temporary file's mode back, and the new file is locked and
    registered like the first, so no cleaner takes it for a leftover."""
    now = os.stat(tmp)
    if (now.st_dev, now.st_ino) != key:
        fd = os.open(tmp, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
        fds.append(fd)
        _flock(fd)
        with _WRITING_LOCK:
            held = os.fstat(fd)
            keys.append((held.st_dev, held.st_ino))
            _WRITING.add(keys[-1])
    if stat.S_IMODE(now.st_mode) != mode:
        try:
            os.chmod(tmp, mode)
        except PermissionError:  # a file system without POSIX modes (some FUSE/SMB mounts): nothing to keep
            pass


def atomic_write(path: str | Path, write: Callable[[str], Any], sync: bool = False,
                 before_replace: Callable[[], Any] | None = None) -> None:
    """Call `write(tmp_path)`, then rename tmp onto `path`: readers never see half a file.

    The temporary file sits beside `path` (`.<name>.<slot or random>.tmp`: a rename within one file system
    is atomic; a move from /tmp to another disk is a copy) and is removed when anything fails, so a full
    disk leaves `path` as it was (absent, or its previous version) and no temporary file. Errors name
    `path`: an OSError keeps its class and errno, anything else becomes a RuntimeError.

    Mode: the file gets what a new file made by `open(path, "w")` gets, 0666 minus the process umask (0644
    under umask 022, 0664 under 002; a folder's default ACL applies too): the temporary file is created
    with mode 0666 and the kernel applies the umask itself, so the umask is never read or changed (an
    `os.umask` round trip would race with other threads); a `write` that puts its own file at the temporary
    name (safetensors does, as 0600) gets that mode back. A file that is replaced gets that mode too, not
    the old file's: a checkpoint an earlier version wrote as 0600 becomes readable on its next save, and a
    file's mode never depends on the history of its folder.

    Leftovers: the writer holds a lock on its temporary file until the rename, so a temporary file of the
    same name that nobody holds is a killed writer's and is removed here; other files' temporaries and live
    writers' are never touched, so any number of processes may write in one folder.
    sync: fsync the file before the rename (shards, checkpoints: the rename must never expose data the
    disk has not got after a power cut).
    before_replace: called after the temporary file is complete, just before the rename (e.g. to remove a
    marker that describes the previous version).
    """
    path = Path(path)
    tmp, fds, keys = None, [], []
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp, fd, key = _create_temp(path)
        fds.append(fd)
        keys.append(key)
        mode = stat.S_IMODE(os.fstat(fd).st_mode)  # what the kernel made of 0666 under the umask
        write(tmp)
        _keep_mode_and_lock(tmp, mode, key, fds, keys)
        if sync:
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
        tmp = None  # its name is free again: another writer may already be using it
    except OSError as error:  # ENOSPC, EDQUOT, EACCES...: the same class, with the file that failed
        raise type(error)(error.errno, f"could not write {path}: {error.strerror or error}") from error
    except Exception as error:  # e.g. safetensors' or torch.save's own error types for a failed write
        raise RuntimeError(f"could not write {path}: {error}") from error
    finally:
        if tmp is not None and os.path.lexists(tmp):
            os.unlink(tmp)
        with _WRITING_LOCK:
            _WRITING.difference_update(keys)
        for fd in fds:
            os.close(fd)  # releases the lock


def atomic_write_text(path: str | Path, text: str) -> None:
    """Atomically replace a text file (JSON reports, manifests)."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, the 'weights hash' that token shards and metrics record."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
