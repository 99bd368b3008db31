"""Checks of a token-shard `meta.json` against itself and against the tokenizer it names.

`train.prepare.extract_tokens` records in meta.json the tokenizer (its path, named size, config, weights
SHA-256) beside what the AR prior is built from (`codebook_size`, `grid`, `downsample_factor`,
`image_size`, `views` / `num_views`, `dtype`). When these disagree (a hand-edited meta.json, or a tokenizer
folder retrained in place), the prior trains without complaint and fails only when sampling decodes its
codes. `check_meta_consistency(meta)` checks the fields against each other; `check_meta_against_tokenizer`
also against the tokenizer on disk. Both raise one ValueError listing every mismatch, naming the meta.json,
the tokenizer and both values. The token DataModule calls them at setup (`train.data.tokens`); the probes and
sampling may call `check_meta_against_tokenizer` with the tokenizer they load. Loading tokenizers is
`tokenizers_vq.checkpoint`'s job; only their config files (and, on request, weights hashes) are read here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers_vq.config import VQ_SIZES
from tokenizers_vq.files import file_sha256
from tokenizers_vq.model_dir import CONFIG_NAME, WEIGHTS_NAME
from train.data.transforms import NUM_VIEWS

__all__ = ["check_meta_consistency", "check_meta_against_tokenizer", "tokenizer_facts"]

_OURS = "engram-vision-vq"  # tokenizers_vq.checkpoint.VQ_KIND (not imported: that pulls in the model code)
_WEIGHT_FILES = (WEIGHTS_NAME, "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def _where(meta: dict[str, Any]) -> str:
    return str(meta.get("path", "meta.json"))


def check_meta_consistency(meta: dict[str, Any]) -> None:
    """ValueError when fields of token meta.json `meta` contradict each other (only fields present are
    compared): views vs num_views, grid vs image_size / downsample_factor, dtype vs codebook_size, and the
    shard list's sample counts vs num_samples."""
    problems = []
    views, num_views = meta.get("views"), meta.get("num_views")
    if views in NUM_VIEWS and num_views is not None and NUM_VIEWS[views] != num_views:
        problems.append(f"views {views!r} means {NUM_VIEWS[views]} views per image, but num_views is {num_views}")
    grid, size, factor = meta.get("grid"), meta.get("image_size"), meta.get("downsample_factor")
    if grid is not None and size is not None and factor:
        expected = [int(size) // int(factor)] * 2
        if list(grid) != expected:
            problems.append(f"grid {list(grid)} is not image_size {size} / downsample_factor {factor} = {expected}")
    codebook, dtype = meta.get("codebook_size"), meta.get("dtype")
    if codebook is not None and dtype is not None:
        needed = "int16" if int(codebook) <= 32767 else "int32"
        if dtype != needed:
            problems.append(f"dtype {dtype} cannot be the codes of a {codebook}-entry codebook ({needed})")
    shards = meta.get("shards")
    if isinstance(shards, list) and meta.get("num_samples") is not None:
        listed = sum(int(s.get("num_samples", 0)) for s in shards)
        if listed != int(meta["num_samples"]):
            problems.append(f"its shards list {listed} samples in all, num_samples says {meta['num_samples']}")
    if problems:
        raise ValueError(f"token shards' {_where(meta)} contradicts itself: " + "; ".join(problems)
                         + ". Rerun `python -m train.prepare tokens` into an empty folder to rewrite it")


def tokenizer_facts(tokenizer: str | Path, size: str | None = None) -> dict[str, Any]:
    """What a tokenizer on disk says about its codes, from its config alone (no weights are loaded):
    {"codebook_size", "downsample_factor", "config" (ours: the VQConfig dict; else None), "weights" (the
    weights file, or None)}. `size` names the config of a LlamaGen `.pt` (default `vq-16`)."""
    path = Path(tokenizer)
    if path.is_dir() and (path / CONFIG_NAME).is_file():
        raw = json.loads((path / CONFIG_NAME).read_text())
        weights = next((path / n for n in _WEIGHT_FILES if (path / n).is_file()), None)
        if raw.get("kind") == _OURS:
            config = raw["config"]
            return {"codebook_size": int(config["codebook_size"]),
                    "downsample_factor": 2 ** (len(config["encoder_ch_mult"]) - 1), "config": config,
                    "weights": weights}  # fmt: skip
        # a diffusers VQModel: its quantiser has num_vq_embeddings codes; one halving per block but the last
        return {"codebook_size": int(raw["num_vq_embeddings"]),
                "downsample_factor": 2 ** (len(raw["block_out_channels"]) - 1), "config": None,
                "weights": weights}  # fmt: skip
    if path.is_file() and path.suffix == ".pt":
        config = VQ_SIZES.get(size or "vq-16")
        if config is None:
            raise ValueError(f"unknown LlamaGen tokenizer size {size!r} for {path}; known: {sorted(VQ_SIZES)}")
        return {"codebook_size": config.codebook_size, "downsample_factor": config.downsample_factor,
                "config": config.to_dict(), "weights": path}  # fmt: skip
    raise FileNotFoundError(f"no tokenizer at {path}: expected a directory with {CONFIG_NAME} or a LlamaGen "
                            f".pt file")


def check_meta_against_tokenizer(meta: dict[str, Any], tokenizer_dir: str | Path,
                                 check_weights: bool = True) -> None:
    """Raise one ValueError naming meta.json `meta` (as `train.data.tokens.read_token_meta` returns it) and
    `tokenizer_dir` when they disagree: codebook size, downsample factor, grid (image_size / factor), the
    tokenizer config recorded in meta.json, and (with `check_weights`) the weights' SHA-256. The fields of
    meta.json are first checked against each other (`check_meta_consistency`). A FileNotFoundError when
    there is no tokenizer at `tokenizer_dir`."""
    check_meta_consistency(meta)
    facts = tokenizer_facts(tokenizer_dir, meta.get("tokenizer_size"))
    problems = []
    for key in ("codebook_size", "downsample_factor"):
        if meta.get(key) is not None and int(meta[key]) != facts[key]:
            problems.append(f"{key} is {meta[key]} in meta.json but {facts[key]} for the tokenizer")
    if meta.get("image_size") is not None and meta.get("grid") is not None:
        expected = [int(meta["image_size"]) // facts["downsample_factor"]] * 2
        if list(meta["grid"]) != expected:
            problems.append(f"grid {list(meta['grid'])} in meta.json, but the tokenizer makes {expected} codes "
                            f"of {meta['image_size']} px images")
    recorded = meta.get("tokenizer_config")
    if facts["config"] is not None and isinstance(recorded, dict):
        differ = sorted(k for k in set(recorded) | set(facts["config"]) if recorded.get(k) != facts["config"].get(k))
        if differ:
            problems.append("tokenizer_config differs in " + ", ".join(
                f"{k} ({recorded.get(k)} in meta.json, {facts['config'].get(k)} in the tokenizer)" for k in differ[:5]))
    if check_weights and meta.get("weights_sha256") and facts["weights"] is not None:
        digest = file_sha256(facts["weights"])
        if digest != meta["weights_sha256"]:
            problems.append(f"weights_sha256 is {meta['weights_sha256'][:12]}... in meta.json but "
                            f"{digest[:12]}... for {facts['weights']} (the tokenizer was retrained or replaced)")
    if problems:
        raise ValueError(f"token shards' {_where(meta)} disagrees with the tokenizer {tokenizer_dir}: "
                         + "; ".join(problems) + ". The codes were made by another tokenizer: use the tokenizer "
                         "that made them, or rerun `python -m train.prepare tokens` with this one into an "
                         "empty folder")
