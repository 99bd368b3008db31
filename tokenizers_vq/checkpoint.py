"""Tokenizer weights on disk: LlamaGen `.pt` files (safe, strict), our safetensors + config, and a loader
that picks the right one for a path.

LlamaGen pickles an `argparse.Namespace` beside the weights, so its files are read with
`torch.load(weights_only=True)` plus an allow-list of exactly that class, never with `weights_only=False`.
Our weights are `model.safetensors` with `config.json` beside them, written atomically; the generic file
helpers (atomic writes, hashes, safe loading, the model-folder format and its checks for unfinished,
corrupt or mismatched folders) are `tokenizers_vq.files`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from tokenizers_vq.config import VQConfig, vq_config
from tokenizers_vq.files import load_state_dict_checked, safe_torch_load
from tokenizers_vq.model import VQModel
from tokenizers_vq.model_dir import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    read_json_object,
    read_model_config,
    read_model_dir,
    save_model_dir,
)

VQ_KIND = "engram-vision-vq"
# Buffers that are bookkeeping, not weights: absent from some files, never a reason to refuse one.
_OPTIONAL_KEYS = ("quantize.codebook_used",)
LLAMAGEN_VQ_SOURCE = ("download LlamaGen's released tokenizer from the Hugging Face hub (repo FoundationVision/LlamaGen: "
                      "vq_ds16_c2i.pt for vq-16, vq_ds8_c2i.pt for vq-8) and pass the file's path with --tokenizer "
                      "(python -m sample, python -m train.prepare tokens; --tokenizer_size names its size)")


def load_llamagen_vq(path: str | Path, config: VQConfig | str = "vq-16", key: str = "model") -> VQModel:
    """A LlamaGen VQ checkpoint (e.g. `vq_ds16_c2i.pt`) as a VQModel in eval mode.

    config: a VQConfig or a named size (`vq-16` for vq_ds16_c2i.pt, `vq-8` for vq_ds8_c2i.pt).
    key: which entry of the file holds the weights (`model`; `ema` when trained with EMA).
    """
    config = vq_config(config) if isinstance(config, str) else config
    if not Path(path).is_file():
        raise FileNotFoundError(f"LlamaGen VQ checkpoint {path} not found: {LLAMAGEN_VQ_SOURCE}")
    payload = safe_torch_load(path)
    if not isinstance(payload, Mapping):
        raise ValueError(f"{path} is not a LlamaGen checkpoint (expected a dict, got {type(payload).__name__})")
    state_dict = payload.get(key, payload if all(isinstance(v, torch.Tensor) for v in payload.values()) else None)
    if state_dict is None:
        raise ValueError(f"{path} has no {key!r} entry; it holds {sorted(payload)}")
    model = VQModel(config)
    load_state_dict_checked(model, state_dict, str(path), _OPTIONAL_KEYS)
    return model.eval()


def save_vq(model: VQModel, directory: str | Path) -> Path:
    """Save `model.safetensors` + `config.json` into `directory`; returns the weights path."""
    return save_model_dir(model, model.config.to_dict(), VQ_KIND, directory)


def load_vq(directory: str | Path) -> VQModel:
    """Our saved tokenizer (`save_vq`) as a VQModel in eval mode; an unfinished, corrupt or mismatched folder
    is refused naming the file and the field (`tokenizers_vq.model_dir.read_model_dir`)."""
    config = read_model_config(directory, VQ_KIND, VQConfig)  # before the weights are read
    _, state_dict, source = read_model_dir(directory, VQ_KIND)
    model = VQModel(config)
    load_state_dict_checked(model, state_dict, source, _OPTIONAL_KEYS)
    return model.eval()


def load_tokenizer(path: str | Path, size: str | None = None) -> torch.nn.Module:
    """Any supported tokenizer behind `encode`/`decode`: our directory, a diffusers VQModel directory,
    or a LlamaGen `.pt` (then `size` names its config, default `vq-16`)."""
    path = Path(path)
    if path.is_dir() and (path / CONFIG_NAME).is_file():
        meta = read_json_object(path / CONFIG_NAME)  # names the file when it is not JSON
        # Ours (load_vq names a bad field or another kind) unless it is a diffusers config (`_class_name`).
        if "kind" in meta or ("_class_name" not in meta and (path / WEIGHTS_NAME).is_file()):
            return load_vq(path)
        from tokenizers_vq.diffusers_backend import DiffusersVQTokenizer  # optional heavy import

        return DiffusersVQTokenizer.from_pretrained(path)
    if path.is_dir() and (path / WEIGHTS_NAME).is_file():
        return load_vq(path)  # our folder without its config.json: the unfinished-save error
    if path.suffix == ".pt":
        return load_llamagen_vq(path, size or "vq-16")
    raise FileNotFoundError(f"no tokenizer at {path}: expected a directory with {CONFIG_NAME} "
                            f"(ours or diffusers) or a LlamaGen .pt file ({LLAMAGEN_VQ_SOURCE})")

