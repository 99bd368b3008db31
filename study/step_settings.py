"""What each step of the study runner depends on: the settings its record holds (`study/steps.py`), so a
rerun can tell a finished step from one the study now asks to make otherwise.

Settings are the parsed values a step runs with (not the text of the YAML, where that can be parsed
without running) plus the sha256 of every file that goes in (the training config, the model weights, the
tokenizer, the reference data, the extractor weights) or, for an input another step made, that step's
settings digest. Settings that change where a step runs but not its numbers (accelerator, devices,
strategy, compile, the reference-statistics cache folder) are left out, so a study may move to another
machine. Running the steps is `study/runner.py`'s job.
"""

from __future__ import annotations

from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from metrics.evaluate import EvaluateConfig
from study.members import Member
from study.steps import Ledger, path_digest
from tokenizers_vq.model_dir import WEIGHTS_NAME

# python -m sample arguments that say where sampling runs, not what it makes (the sample job's own manifest
# leaves them out too); `out` and `model` are the step's folder and the model, whose hash is kept.
SAMPLE_PLACEMENT = ("config", "out", "model", "accelerator", "devices", "strategy", "compile")
EVALUATE_PLACEMENT = ("samples", "out", "accelerator", "cache_dir", "overwrite")
PROBE_PLACEMENT = ("accelerator",)


def weights_digest(path: str | Path, ledger: Ledger) -> str | None:
    """sha256 of a model's weights: `<dir>/model.safetensors`, a weights file, or all of a folder's files."""
    path = Path(path)
    if path.is_dir() and (path / WEIGHTS_NAME).is_file():
        return ledger.file_hash(path / WEIGHTS_NAME)
    return ledger.file_hash(path) if path.is_file() else path_digest(path)


def train_settings(member: Member) -> dict[str, Any]:
    """The training config's path and content, the extra arguments and the seed."""
    run = member.run
    config = Path(run.config)
    if not config.is_file():
        raise FileNotFoundError(f"study run {run.name!r}: training config {config} does not exist")
    from tokenizers_vq.files import file_sha256

    return {"config": str(config), "config_sha256": file_sha256(config), "train_args": list(run.train_args),
            "seed": member.seed}


def sample_kwargs(args: list[str]) -> dict[str, Any]:
    """`sample.job.sample_images`'s arguments parsed from `args` exactly as `python -m sample` parses them (a
    sample YAML via `--config`, then overrides), without running anything."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    from sample.job import sample_images

    parser = ArgumentParser(prog="python -m sample")
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_function_arguments(sample_images, as_positional=False)
    parsed = parser.instantiate(parser.parse_args(args))
    return {key: value for key, value in vars(parsed).items() if key != "config"}


def _plain(value: Any) -> Any:
    return asdict(value) if is_dataclass(value) else value


def sample_settings(kwargs: dict[str, Any], ledger: Ledger, with_model: bool = True) -> dict[str, Any]:
    """What the samples depend on: every sampling argument but the placement ones, the tokenizer's weights
    hash and (`with_model`) the model's."""
    settings = {key: _plain(value) for key, value in kwargs.items() if key not in SAMPLE_PLACEMENT}
    settings["tokenizer_sha256"] = weights_digest(kwargs["tokenizer"], ledger)
    if with_model:
        settings["model_sha256"] = weights_digest(kwargs["model"], ledger)
    return settings


def reference_digest(reference: str, ledger: Ledger) -> str:
    """The reference data's hash as `metrics.evaluate` records it (an .npz: its sha256, once per process)."""
    from metrics.reference import data_hash, source_kind

    kind = source_kind(reference)
    return ledger.file_hash(Path(reference)) if kind.startswith("npz") else data_hash(reference, kind)


def evaluate_settings(step: EvaluateConfig, ledger: Ledger, inputs: dict[str, Any] | None = None,
                      reference_sha256: str | None = None) -> dict[str, Any]:
    """Every scoring setting but the placement ones, the reference data's and the extractor weights'
    hashes, and `inputs` (the digest of the step that made the samples). `reference_sha256` stands in for
    hashing the reference when another step made it (the reconstructions)."""
    settings = {key: value for key, value in asdict(step).items() if key not in EVALUATE_PLACEMENT}
    if reference_sha256 is not None:  # a file of this study: its identity is the step's digest, not its path
        settings["reference"] = None
    settings["reference_sha256"] = reference_sha256 or reference_digest(step.reference, ledger)
    settings["weights_sha256"] = None if step.weights is None else weights_digest(step.weights, ledger)
    return {**settings, **(inputs or {})}


def token_digest(spec: str | None) -> str | None:
    """sha256 of a token folder's meta.json (which lists its shards and counts); None for no folder."""
    return None if spec is None else path_digest(Path(spec) / "meta.json")


def probe_settings(step: Any, model: Path, ledger: Ledger, gate_sampling: dict[str, Any] | None) -> dict[str, Any]:
    """The probe section but its accelerator, the model's and token data's hashes, and (with gate samples)
    how they are sampled and scored."""
    settings = {key: value for key, value in asdict(step).items() if key not in PROBE_PLACEMENT}
    settings.update(model_sha256=weights_digest(model, ledger), tokens_sha256=token_digest(step.tokens),
                    pool_sha256=token_digest(step.pool), gate_sampling=gate_sampling)
    return settings


__all__ = ["evaluate_settings", "probe_settings", "sample_kwargs", "sample_settings", "train_settings",
           "weights_digest"]
