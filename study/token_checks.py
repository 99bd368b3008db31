"""The probes' held-out tokens must come from the tokenizer that made the run's training tokens.

Codes of another tokenizer of the same codebook size fit the model's vocabulary, so nothing downstream
notices: the probes would measure the memory on tokens the model never learnt. Before any step runs,
`check_probe_tokens` compares the meta.json of every trained run's training shards (its config's
`data.init_args.train_shards`, or a `--data.init_args.train_shards` override among its train_args) with the
probe shards' (and the donor pool's): the tokenizer weights' SHA-256, the codebook size and the grid. Runs
given as a finished `model`, or whose training shards are not there yet, are not checked. How the token
data module checks a model against its shards at training time is `train.lit_ar.check_token_data`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from study.members import StudyRun

COMPARED = ("weights_sha256", "codebook_size", "grid")
"""meta.json fields that must agree between training and probe tokens."""
_OVERRIDE = "--data.init_args.train_shards"


def train_shards(run: StudyRun) -> str | None:
    """The training token shards a run's config (with its train_args) names, or None."""
    for index, arg in enumerate(run.train_args):
        if arg.startswith(_OVERRIDE + "="):
            return arg.split("=", 1)[1]
        if arg == _OVERRIDE and index + 1 < len(run.train_args):
            return run.train_args[index + 1]
    if run.config is None or not Path(run.config).is_file():
        return None
    config = yaml.safe_load(Path(run.config).read_text()) or {}
    init_args = ((config.get("data") or {}).get("init_args") or {}) if isinstance(config, dict) else {}
    shards = init_args.get("train_shards")
    return str(shards) if shards else None


def _meta(spec: str) -> dict[str, Any] | None:
    from train.data.tokens import read_token_meta

    try:
        return read_token_meta(spec)
    except FileNotFoundError:
        return None


def check_probe_tokens(runs: list[StudyRun], probe_tokens: list[str]) -> None:
    """Raise ValueError naming every run whose training tokens and the probe tokens `probe_tokens` (the
    held-out set, the donor pool) were made by different tokenizers (see the module)."""
    probes = [(spec, meta) for spec in probe_tokens if (meta := _meta(spec)) is not None]
    problems = []
    for run in runs:
        spec = train_shards(run)
        train = _meta(spec) if spec else None
        if train is None:
            continue
        for probe_spec, probe in probes:
            differ = [f"{key}: {train.get(key)!r} vs {probe.get(key)!r}" for key in COMPARED
                      if train.get(key) is not None and probe.get(key) is not None and train[key] != probe[key]]
            if differ:
                problems.append(f"run {run.name!r}: its training tokens ({train['path']}) and the probe tokens "
                                f"{probe_spec} ({probe['path']}) come from different tokenizers ({'; '.join(differ)})")
    if problems:
        raise ValueError("the probes would score tokens of another tokenizer than the models learnt:\n  "
                         + "\n  ".join(problems) + "\nextract the probe tokens (python -m train.prepare tokens "
                         "--split val) with the tokenizer that made the training tokens")
