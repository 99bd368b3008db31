"""File helpers every package uses: atomic writes, file hashes, safe `torch.load`, strict state-dict
loading with a readable mismatch report, and the model-folder format (`model.safetensors` + `config.json`).

`atomic_write` is the project's one way to write a file (a temporary file beside it, then a rename;
errors name the file). What a model folder holds (a tokenizer, the AR prior) is left to the packages that
save them (`tokenizers_vq.checkpoint`, `engram_vision.checkpoint`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
TEMP_SUFFIX = ".tmp"


def safe_torch_load(path: str | Path) -> Any:
    """`torch.load` that unpickles tensors, containers and argparse.Namespace only."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True)


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


def temp_pattern(path: str | Path) -> str:
    """Glob (in `path`'s folder) of the temporary files `atomic_write` makes for `path`."""
    return f".{Path(path).name}.*{TEMP_SUFFIX}"


def temp_target(tmp: str | Path) -> str | None:
    """The file name an `atomic_write` temporary file was for (`.<name>.<random>.tmp` -> `<name>`), else None."""
    name = Path(tmp).name
    if not (name.startswith(".") and name.endswith(TEMP_SUFFIX)) or name.count(".") < 3:
        return None
    return name[1:].removesuffix(TEMP_SUFFIX).rsplit(".", 1)[0]


def remove_stale_temps(path: str | Path) -> list[Path]:
    """Delete the temporary files a killed writer of `path` left behind; returns what was removed.
    Call it only where no other process is writing `path` at the same time."""
    path = Path(path)
    stale = sorted(path.parent.glob(temp_pattern(path))) if path.parent.is_dir() else []
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    return stale


def atomic_write(path: str | Path, write: Any, sync: bool = False) -> None:
    """Call `write(tmp_path)`, then rename tmp onto `path`: readers never see half a file.

    The temporary file sits beside `path` (`.<name>.<random>.tmp`: a rename within one file system is
    atomic; a move from /tmp to another disk is a copy) and is removed when anything fails, so a full
    disk leaves `path` as it was (absent, or its previous version) and no temporary file. Errors name
    `path`: an OSError keeps its class and errno, anything else becomes a RuntimeError.
    sync: fsync the file before the rename (shards, checkpoints: the rename must never expose data the
    disk has not got after a power cut).
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
        os.close(fd)
        write(tmp)
        if sync:
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as error:  # ENOSPC, EDQUOT, EACCES...: the same class, with the file that failed
        raise type(error)(error.errno, f"could not write {path}: {error.strerror or error}") from error
    except Exception as error:  # e.g. safetensors' or torch.save's own error types for a failed write
        raise RuntimeError(f"could not write {path}: {error}") from error
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


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


def save_model_dir(model: torch.nn.Module, config: dict[str, Any], kind: str, directory: str | Path) -> Path:
    """Write `model.safetensors` + `config.json` ({kind, config}) atomically; returns the weights path.
    Shared by every model this project saves (tokenizers here, the AR prior in engram_vision)."""
    directory = Path(directory)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    weights = directory / WEIGHTS_NAME
    atomic_write(weights, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write_text(directory / CONFIG_NAME, json.dumps({"kind": kind, "config": config}, indent=2))
    return weights


def read_model_dir(directory: str | Path, kind: str) -> tuple[dict[str, Any], dict[str, torch.Tensor], str]:
    """(config dict, state dict, weights path) of a `save_model_dir` directory of the given kind."""
    directory = Path(directory)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"model directory {directory} has no {name}")
    meta = json.loads((directory / CONFIG_NAME).read_text())
    if meta.get("kind") != kind:
        raise ValueError(f"{directory / CONFIG_NAME} holds a {meta.get('kind')!r} model, not {kind!r}")
    weights = str(directory / WEIGHTS_NAME)
    return meta["config"], load_file(weights), weights
