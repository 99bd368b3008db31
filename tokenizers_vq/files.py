"""File helpers every package uses: atomic writes, file hashes, safe `torch.load`, strict state-dict
loading with a readable mismatch report, and the model-folder format (`model.safetensors` + `config.json`).

`atomic_write` is the project's one way to write a file (a temporary file beside it, then a rename;
errors name the file; the file gets the mode a plain `open(path, "w")` of a new file would give under the
process umask; leftovers of a killed writer of the same name are removed). A model folder is complete when
its `config.json` exists: `save_model_dir` writes it last, with the size and SHA-256 of the weights, and the
weights carry their own copy of the config in their safetensors metadata, so `read_model_dir` refuses a
half-written folder, a truncated file and a config.json that belongs to other weights, each naming the file.
What a model folder holds (a tokenizer, the AR prior) and how its config is typed is left to the packages
that save them (`tokenizers_vq.checkpoint`, `engram_vision.checkpoint`); deciding when to re-export a
folder is left to the jobs (`model_dir_complete`).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import pickle
import secrets
import stat
import threading
import types
import typing
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

try:  # POSIX: a writer locks its temporary file, so a leftover of a killed writer can be told apart
    import fcntl
except ImportError:  # pragma: no cover - Windows: no locks, leftovers only go through remove_stale_temps
    fcntl = None  # type: ignore[assignment]

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
TEMP_SUFFIX = ".tmp"
MODEL_META_KEY = "engram_vision.model"
"""safetensors metadata key of the JSON {kind, config} a model's weights were saved with."""
MODEL_DIR_FIELDS = ("kind", "config", "weights_bytes", "weights_sha256")
"""The fields of a model folder's config.json (the last two are absent in folders of older versions)."""
_TEMP_SLOTS = 4  # fixed temporary names tried first, so the next writer finds leftovers without a listing
_RANDOM_TRIES = 100
_REFIT = "copy the whole folder again or re-export the model"

T = TypeVar("T")


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


# ------------------------------------------------------------------------------------------ typed configs


def _accepts(hint: Any, value: Any) -> bool:
    """Whether `value` (read from JSON) can be a `hint`; hints it cannot judge accept anything."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(arg, value) for arg in args)
    if hint is type(None):
        return value is None
    if origin is typing.Literal:
        return any(value == arg and type(value) is type(arg) for arg in args)
    if hint is bool:
        return type(value) is bool
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_accepts(args[0], item) for item in value)
        return not args or (len(args) == len(value) and all(map(_accepts, args, value)))
    if dataclasses.is_dataclass(hint):
        return isinstance(value, dict | hint)
    return True


def _nested_dataclass(hint: Any) -> type | None:
    candidates = [hint, *typing.get_args(hint)]
    return next((c for c in candidates if isinstance(c, type) and dataclasses.is_dataclass(c)), None)


def config_from_dict(cls: type[T], values: Any, source: str | Path, prefix: str = "config") -> T:
    """`cls(**values)` for a typed config dataclass read from file `source`, with every error naming the file
    and the field (`prefix`.name): not an object, an unknown field, a value of the wrong type, or one the
    config's own checks refuse (CorruptFileError). Nested config dataclasses (ModelConfig.engram) are built
    the same way. A field the file lacks takes its default: files saved before the field existed still load.
    """
    if not isinstance(values, dict):
        raise CorruptFileError(f"{source}: field {prefix} must be a JSON object of {cls.__name__} fields, got "
                               f"{type(values).__name__}; {_REFIT}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise CorruptFileError(f"{source}: unknown field {prefix}.{unknown[0]} (not a {cls.__name__} field; "
                               f"known: {', '.join(known)}): the file was edited or written by another version; "
                               f"remove the field or re-export the model")
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        if not _accepts(hint, value):
            raise CorruptFileError(f"{source}: field {prefix}.{name} = {value!r} is not a valid "
                                   f"{known[name].type} ({cls.__name__}.{name}); fix the field or re-export "
                                   f"the model")
        nested = _nested_dataclass(hint)
        if nested is not None and isinstance(value, dict):
            value = config_from_dict(nested, value, source, f"{prefix}.{name}")
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as error:  # the config's own checks name Class.field
        raise CorruptFileError(f"{source}: {prefix} is not a valid {cls.__name__}: {error}; fix the field or "
                               f"re-export the model") from error


# ------------------------------------------------------------------------------------------ model folders


def read_json_object(path: str | Path) -> dict[str, Any]:
    """A JSON object from `path`; CorruptFileError naming the file when it is not JSON or not an object."""
    path = Path(path)
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except json.JSONDecodeError as error:
        raise CorruptFileError(f"{path} is not valid JSON ({error.msg} at line {error.lineno}, column "
                               f"{error.colno}): the file is corrupt or cut; {_REFIT}") from error
    except UnicodeDecodeError as error:
        raise CorruptFileError(f"{path} is not UTF-8 text ({error.reason}): the file is corrupt; {_REFIT}") from error
    if not isinstance(value, dict):
        raise CorruptFileError(f"{path} holds a JSON {type(value).__name__}, not an object; {_REFIT}")
    return value


def save_model_dir(model: torch.nn.Module, config: dict[str, Any], kind: str, directory: str | Path) -> Path:
    """Write `model.safetensors` + `config.json` ({kind, config, weights_bytes, weights_sha256}) atomically;
    returns the weights path. Shared by every model this project saves (tokenizers here, the AR prior in
    engram_vision).

    config.json is the completion marker: it is removed just before the new weights are renamed into place
    and written last, so a kill at any moment leaves either the previous complete folder or one without
    config.json that `model_dir_complete` calls unfinished (never new weights under an old config). The
    weights' safetensors metadata holds {kind, config} too (`MODEL_META_KEY`), which `read_model_dir`
    compares with config.json.
    """
    directory = Path(directory)
    record = json.dumps({"kind": kind, "config": config}, sort_keys=True)  # before any write: JSON-able?
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    weights, config_path = directory / WEIGHTS_NAME, directory / CONFIG_NAME
    atomic_write(weights, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt", MODEL_META_KEY: record}),
                 before_replace=lambda: config_path.unlink(missing_ok=True))
    meta = {"kind": kind, "config": config, "weights_bytes": weights.stat().st_size,
            "weights_sha256": file_sha256(weights)}
    atomic_write_text(config_path, json.dumps(meta, indent=2) + "\n")
    return weights


def _inspect_model_dir(directory: Path, kind: str | None) -> dict[str, Any]:
    """config.json of a complete model folder (cheap checks: parts, fields, kind, weights size), else raise:
    FileNotFoundError for a missing part, CorruptFileError for a bad file, ValueError for another kind."""
    config_path, weights = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if not directory.is_dir():
        raise FileNotFoundError(f"model folder {directory} does not exist: pass the folder that holds {CONFIG_NAME} "
                                f"and {WEIGHTS_NAME} (a run's exported model/ or tokenizer/)")
    has_config, has_weights = config_path.is_file(), weights.is_file()
    if not has_config and not has_weights:
        raise FileNotFoundError(f"model directory {directory} has no {CONFIG_NAME} and no {WEIGHTS_NAME}: it is "
                                f"not a saved model; pass the folder an export wrote (a run's model/ or tokenizer/)")
    if not has_config:
        raise FileNotFoundError(f"model directory {directory} is incomplete: it has {WEIGHTS_NAME} but no "
                                f"{CONFIG_NAME}, which is written last, so the save was interrupted (or the copy "
                                f"is partial); re-export it (rerun the step that wrote it: training resumes from "
                                f"last.ckpt and exports again) or copy the whole folder again")
    if not has_weights:
        raise FileNotFoundError(f"model directory {directory} is incomplete: it has {CONFIG_NAME} but no "
                                f"{WEIGHTS_NAME}; {_REFIT}")
    meta = read_json_object(config_path)
    unknown = sorted(set(meta) - set(MODEL_DIR_FIELDS))
    if unknown:
        raise CorruptFileError(f"{config_path}: unknown field {unknown[0]!r} (known: {', '.join(MODEL_DIR_FIELDS)}): "
                               f"edited or written by another version; remove the field or re-export the model")
    for field, ok, what in (("kind", lambda v: isinstance(v, str), "the model type, a string"),
                            ("config", lambda v: isinstance(v, dict), "the model's typed config, an object")):
        if field not in meta:
            raise CorruptFileError(f"{config_path} has no {field!r} field ({what}); {_REFIT}")
        if not ok(meta[field]):
            raise CorruptFileError(f"{config_path}: field {field!r} must be {what}, got {meta[field]!r:.60}; {_REFIT}")
    if kind is not None and meta["kind"] != kind:
        raise ValueError(f"{config_path} holds a {meta['kind']!r} model, not {kind!r}: pass the folder of the "
                         f"right model (the tokenizer's folder where a tokenizer is asked for, the AR model's "
                         f"where a model is)")
    size, digest = meta.get("weights_bytes"), meta.get("weights_sha256")
    if "weights_bytes" in meta and not (isinstance(size, int) and not isinstance(size, bool) and size >= 0):
        raise CorruptFileError(f"{config_path}: field 'weights_bytes' must be a byte count, got {size!r}; {_REFIT}")
    if "weights_sha256" in meta and not (isinstance(digest, str) and len(digest) == 64
                                         and all(c in "0123456789abcdef" for c in digest)):
        raise CorruptFileError(f"{config_path}: field 'weights_sha256' must be 64 hex digits, got {digest!r:.80}; "
                               f"{_REFIT}")
    if size is not None and (actual := weights.stat().st_size) != size:
        raise CorruptFileError(f"{weights} is truncated or corrupt: {actual} bytes, but {config_path} records "
                               f"{size} (weights_bytes); {_REFIT}")
    return meta


def model_dir_problem(directory: str | Path, kind: str | None = None) -> str | None:
    """Why `directory` is not a complete model folder (of `kind`, when given), or None when it is.

    Cheap: the parts, config.json's fields and the weights' recorded size (no hashing); `read_model_dir`
    checks the rest when loading.
    """
    try:
        _inspect_model_dir(Path(directory), kind)
    except (OSError, ValueError) as error:
        return str(error)
    return None


def model_dir_complete(directory: str | Path, kind: str | None = None) -> bool:
    """Whether a job may treat `directory` as a finished model export (see `model_dir_problem`)."""
    return model_dir_problem(directory, kind) is None


def _differences(saved: Any, current: Any, prefix: str) -> list[tuple[str, Any, Any]]:
    if isinstance(saved, dict) and isinstance(current, dict):
        return [d for key in sorted({*saved, *current})
                for d in _differences(saved.get(key, "<absent>"), current.get(key, "<absent>"), f"{prefix}.{key}")]
    return [] if saved == current else [(prefix, saved, current)]


def _weights_record(weights: Path) -> dict[str, Any] | None:
    """The {kind, config} stored in the weights' safetensors metadata (None for files of older versions)."""
    try:
        with safe_open(str(weights), "pt") as handle:
            metadata = handle.metadata() or {}
    except SafetensorError as error:
        raise CorruptFileError(f"{weights} is truncated or corrupt (safetensors: {error}); {_REFIT}") from error
    if MODEL_META_KEY not in metadata:
        return None
    try:
        return json.loads(metadata[MODEL_META_KEY])
    except json.JSONDecodeError as error:
        raise CorruptFileError(f"{weights}: its metadata {MODEL_META_KEY!r} is not JSON; {_REFIT}") from error


def read_model_config(directory: str | Path, kind: str, config_type: type[T]) -> T:
    """The typed config of a complete model folder of `kind`, before any weights are read: errors name
    config.json and the field (see `config_from_dict`)."""
    directory = Path(directory)
    meta = _inspect_model_dir(directory, kind)
    return config_from_dict(config_type, meta["config"], directory / CONFIG_NAME)


def read_model_dir(directory: str | Path, kind: str) -> tuple[dict[str, Any], dict[str, torch.Tensor], str]:
    """(config dict, state dict, weights path) of a `save_model_dir` directory of the given kind.

    Refuses (naming the folder, the file and the fix) a missing part or another kind (as
    `model_dir_problem`), a config.json whose kind or config differs from the one saved inside the weights
    (the first differing fields), weights whose size or SHA-256 differ from config.json's record, and a
    truncated or corrupt safetensors file. Folders of older versions (no record, no metadata) still load.
    """
    directory = Path(directory)
    meta = _inspect_model_dir(directory, kind)
    config_path, weights = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    record = _weights_record(weights)
    if record is not None:
        diff = _differences(record, {"kind": meta["kind"], "config": meta["config"]}, "")
        if diff:
            shown = "; ".join(f"{field[1:]} is {json.dumps(now)} in {CONFIG_NAME} but {json.dumps(saved)} in the "
                              f"weights" for field, saved, now in diff[:3]) + (" ..." if len(diff) > 3 else "")
            raise CorruptFileError(f"{config_path} does not belong to the weights {weights} (field {diff[0][0][1:]}): "
                                   f"{shown}; one of them was edited or copied from another model folder: restore "
                                   f"this folder's own config.json and weights, or re-export the model")
    if "weights_sha256" in meta and (actual := file_sha256(weights)) != meta["weights_sha256"]:
        raise CorruptFileError(f"{weights} is not the file {config_path} describes (SHA-256 {actual[:12]}..., "
                               f"weights_sha256 {meta['weights_sha256'][:12]}...): the weights were replaced or "
                               f"damaged after the save; {_REFIT}")
    try:
        state_dict = load_file(str(weights))
    except SafetensorError as error:
        raise CorruptFileError(f"{weights} is truncated or corrupt (safetensors: {error}); {_REFIT}") from error
    return meta["config"], state_dict, str(weights)
