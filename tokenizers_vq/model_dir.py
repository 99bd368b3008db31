"""The model-folder format every saved model uses: `model.safetensors` + `config.json`, and typed configs
read from JSON with errors that name the file and the field.

A model folder is complete when its `config.json` exists: `save_model_dir` writes it last, with the size and
SHA-256 of the weights, and the weights carry their own copy of the config in their safetensors metadata, so
`read_model_dir` refuses a half-written folder, a truncated file and a config.json that belongs to other
weights, each naming the file. What a model folder holds (a tokenizer, the AR prior) and how its config is
typed is left to the packages that save them (`tokenizers_vq.checkpoint`, `engram_vision.checkpoint`);
deciding when to re-export a folder is left to the jobs (`model_dir_complete`). Writing and hashing files is
`tokenizers_vq.files`.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from tokenizers_vq.files import CorruptFileError, atomic_write, atomic_write_text, file_sha256

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
MODEL_META_KEY = "engram_vision.model"
MODEL_DIR_FIELDS = ("kind", "config", "weights_bytes", "weights_sha256")
"""The fields of a model folder's config.json (the last two are absent in folders of older versions)."""
_REFIT = "copy the whole folder again or re-export the model"

T = TypeVar("T")


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
