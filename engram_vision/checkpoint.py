"""AR-prior weights on disk: LlamaGen c2i `.pt` files (safe, strict) and our safetensors + config.json.

LlamaGen files carry a pickled argparse.Namespace and buffers we rebuild ourselves (`freqs_cis`, KV
caches, causal masks); those are dropped, everything else must fit exactly. Reading uses the tokenizer
package's safe loader and checked strict load, so both stages refuse bad files the same way (an unfinished,
corrupt or mismatched model folder too: `tokenizers_vq.model_dir.read_model_dir`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from engram_vision.config import ModelConfig, model_config
from engram_vision.model import EngramGPT
from tokenizers_vq.files import load_state_dict_checked, safe_torch_load
from tokenizers_vq.model_dir import CONFIG_NAME, read_model_config, read_model_dir, save_model_dir

KIND = "engram-vision-gpt"
_REBUILT_KEYS = ("freqs_cis", "kv_cache", "causal_mask")  # LlamaGen buffers that are not weights
LLAMAGEN_GPT_SOURCE = ("download LlamaGen's released c2i weights from the Hugging Face hub (repo "
                       "FoundationVision/LlamaGen: c2i_B_256.pt for gpt-b, c2i_L_256.pt for gpt-l, ...) and pass "
                       "the file's path with --model (python -m sample; --model_size names its size) or as a study "
                       "run's `model:`")


def load_llamagen_gpt(path: str | Path, config: ModelConfig | str = "gpt-b") -> EngramGPT:
    """A LlamaGen c2i checkpoint (e.g. `c2i_B_256.pt`) as an EngramGPT in eval mode.

    config: a ModelConfig or a size name (`gpt-b` ... `gpt-3b`); it must have no Engram layers.
    """
    config = model_config(config) if isinstance(config, str) else config
    if not Path(path).is_file():
        raise FileNotFoundError(f"LlamaGen checkpoint {path} not found: {LLAMAGEN_GPT_SOURCE}")
    payload = safe_torch_load(path)
    if not isinstance(payload, Mapping):
        raise ValueError(f"{path} is not a LlamaGen checkpoint (got {type(payload).__name__})")
    state_dict = next((payload[k] for k in ("model", "module", "state_dict") if k in payload), payload)
    state_dict = {k: v for k, v in state_dict.items() if not any(part in k for part in _REBUILT_KEYS)}
    model = EngramGPT(config)
    load_state_dict_checked(model, state_dict, str(path), optional_keys=())
    return model.eval()


def save_gpt(model: EngramGPT, directory: str | Path) -> Path:
    """Write `model.safetensors` + `config.json` (atomically); returns the weights path."""
    return save_model_dir(model, model.config.to_dict(), KIND, directory)


def load_gpt(directory: str | Path) -> EngramGPT:
    """A model saved by `save_gpt`, in eval mode; an unfinished, corrupt or mismatched folder is refused
    naming the file and the field (`tokenizers_vq.model_dir.read_model_dir`)."""
    config = read_model_config(directory, KIND, ModelConfig)  # before the weights are read
    _, state_dict, source = read_model_dir(directory, KIND)
    model = EngramGPT(config)
    load_state_dict_checked(model, state_dict, source, optional_keys=())
    return model.eval()


def load_any_gpt(path: str | Path, size: str | None = None) -> EngramGPT:
    """Our saved directory, or a LlamaGen `.pt` (then `size` names its config, default gpt-b)."""
    path = Path(path)
    if path.is_dir():
        return load_gpt(path)
    if path.suffix == ".pt":
        return load_llamagen_gpt(path, size or "gpt-b")
    raise FileNotFoundError(f"no model at {path}: expected our exported directory (with {CONFIG_NAME}) or a "
                            f"LlamaGen .pt ({LLAMAGEN_GPT_SOURCE})")


__all__ = ["load_any_gpt", "load_gpt", "load_llamagen_gpt", "save_gpt"]
