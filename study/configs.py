"""`python -m study configs` and `python -m study budget`: AR training configs and the memory-budget table
for any token data set.

`write_configs` takes a token data set (the codebook size, token grid and classes of its `meta.json`), a
baseline (a named size of `engram_vision.MODEL_SIZES`, or a baseline AR YAML to start from) and an Engram
layout, and writes into `--out`:

- `<name>_baseline.yaml`, the pure AR model (rho = 1);
- `<name>_engram_rho<r>.yaml` per rho, iso-parameter with the baseline (`engram_vision.budget.solve_budget`
  at the baseline's total parameter count);
- edits of one of them (`variant_rho`): `..._frozen` (tables frozen at N(0, 1)), `..._gate<g>` (the gate
  held at a constant in training) and `<name>_plus_memory<N>m.yaml` (iso-backbone: the baseline plus that
  variant's memory).

Every file differs from the baseline only in the model lines and the run directory. A preset (`digits`,
`digits64`, `imagenet256`) supplies the trainer and optimizer lines and the defaults of everything else; the tracked
configs/ar are exactly what

    python -m study configs --preset digits --out configs/ar
    python -m study configs --preset digits64 --out configs/ar
    python -m study configs --preset imagenet256 --out configs/ar

write (tests/study/test_configs.py checks it byte for byte). `budget` prints the solver's table. The solver
itself is `engram_vision/budget.py`, the meta.json format `train/data/tokens.py`, training `train/`; the
strategy files configs/ar/strategy/*.yaml (DDP, FSDP) combine with any config written here.
"""

from __future__ import annotations

import copy
import json
import math
import re
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal

import yaml

from engram_vision.budget import (
    STUDY_ENGRAM,
    STUDY_RHOS,
    WIDTH,
    Family,
    budget_table,
    count_parameters,
    solve_budget,
)
from engram_vision.config import MODEL_SIZES, EngramConfig, ModelConfig, model_config
from tokenizers_vq.files import atomic_write_text
from train.data.tokens import read_token_meta

RHO_TOLERANCE = 0.05
"""Largest |achieved - requested rho| of a generated variant. A small model's width steps are coarse (the
digits model lands at 0.511 for rho 0.5); the total stays within `budget.BUDGET_TOLERANCE` regardless."""


@dataclass(frozen=True)
class Preset:
    """A family of configs: its data, its baseline and Engram layout, and the lines its files share."""

    name: str
    """File-name prefix of its configs."""
    size: str
    """Named baseline (engram_vision.MODEL_SIZES); its vocabulary, classes and grid are the data's."""
    engram: EngramConfig
    """Engram layout of the variants (rows_per_head is what the solver sets)."""
    rhos: tuple[float, ...]
    """The iso-parameter variants' rhos."""
    header: str
    """Comment lines on top, formatted with {dir} (the output directory) and {name} (the file stem)."""
    trainer: str
    """`trainer:` lines (logger and callbacks are added)."""
    optim: str
    """Optimizer lines of the `model:` section."""
    train_tokens: str
    """Training token shards."""
    train_note: str
    """Comment after train_shards: how those shards are made."""
    val_tokens: str
    """Validation token shards."""
    batch_size: int
    """Batch size per device."""
    num_workers: int
    """DataLoader workers."""
    tokenizer: str
    """Tokenizer of the SampleGrid callback."""
    sample_every: int
    """SampleGrid interval in steps."""
    checkpoint: str = "{save_last: true, save_top_k: 0}"
    """init_args of the checkpoint callback."""
    checkpoint_class: str = "lightning.pytorch.callbacks.ModelCheckpoint"
    """Class path of the checkpoint callback (train.periodic_checkpoint.PeriodicCheckpoint for long runs)."""
    export_best: bool = False
    """Export the best val checkpoint instead of the last weights."""
    grid: tuple[int, int] | None = None
    """Token grid of the preset's own data where it differs from the named size's (used without --tokens)."""


PRESETS: dict[str, Preset] = {
    "imagenet256": Preset(
        name="gpt_b_imagenet256",
        size="gpt-b",
        engram=STUDY_ENGRAM,
        rhos=STUDY_RHOS,
        header=("# GPT-B class-conditional on ImageNet-256 VQ-16 tokens (16x16), LlamaGen's recipe: AdamW 1e-4,\n"
                "# betas (0.9, 0.95), wd 0.05, constant LR, grad clip 1.0, global batch 256 (32 x 8 GPUs), 300 "
                "epochs,\n# bf16, dropout 0.1 (tokens, residual, FFN, class). LlamaGen reports FID 5.46 at CFG "
                "2.0 for the baseline.\n# python -m train ar fit --config {dir}/{name}.yaml "
                "[--config configs/ar/strategy/fsdp.yaml]\n"),
        trainer=("  accelerator: gpu\n  devices: 8\n  strategy: ddp\n  precision: bf16-mixed\n  max_epochs: 300\n"
                 "  gradient_clip_val: 1.0\n  log_every_n_steps: 100\n"),
        optim="  lr: 1.0e-4\n  betas: [0.9, 0.95]\n  weight_decay: 0.05\n  schedule: constant\n",
        train_tokens="/data/imagenet256_vq16_tokens/train",
        train_note="python -m train.prepare tokens --views ten_crop",
        val_tokens="/data/imagenet256_vq16_tokens/val",
        batch_size=32,
        num_workers=8,
        tokenizer="/data/llamagen/vq_ds16_c2i.pt",
        sample_every=5000,
        # every 5000 steps (LlamaGen's interval), resumable mid-epoch; every 10th kept for python -m study curve
        checkpoint="{every_n_steps: 5000, keep_last: 2, keep_every_nth: 10}",
        checkpoint_class="train.periodic_checkpoint.PeriodicCheckpoint",
    ),
    "digits": Preset(
        name="digits",
        size="gpt-small",
        engram=EngramConfig(layers=(1,), neighborhoods=(("L", "U"), ("L", "U", "UL", "UR")), heads_per_order=4,
                            head_dim=16),
        rhos=(0.5,),
        header=("# Digits tokens (4x4 grid, codebook 256, 10 classes) on CPU: the `make demo` models.\n"
                "# python -m train ar fit --config {dir}/{name}.yaml\n"),
        # A fixed step budget (not a time budget) so every variant sees the same number of batches; on 1500
        # images all models overfit, so the best val checkpoint (every 5 epochs = 120 steps) is kept and
        # exported.
        trainer=("  accelerator: cpu\n  devices: 1\n  precision: 32-true\n  max_steps: 720\n  max_epochs: -1\n"
                 "  gradient_clip_val: 1.0\n  log_every_n_steps: 20\n  check_val_every_n_epoch: 5\n"
                 "  enable_progress_bar: false\n"),
        optim=("  lr: 1.0e-3\n  betas: [0.9, 0.95]\n  weight_decay: 0.05\n  schedule: cosine\n  warmup_steps: 50\n"
               "  total_steps: 720\n"),
        train_tokens="runs/demo/tokens/train",
        train_note="python -m train.prepare tokens (make demo does it)",
        val_tokens="runs/demo/tokens/val",
        batch_size=64,
        num_workers=0,
        tokenizer="runs/demo/vq/tokenizer",
        sample_every=1000,
        checkpoint="{monitor: val/nll, mode: min, save_top_k: 1, save_last: true, filename: best}",
        export_best=True,
    ),
    "digits64": Preset(
        name="digits64",
        size="gpt-small",
        engram=EngramConfig(layers=(1,), neighborhoods=(("L", "U"), ("L", "U", "UL", "UR")), heads_per_order=4,
                            head_dim=16),
        rhos=(0.5,),
        header=("# Digits tokens at downsample 2 (8x8 grid = 64 tokens, codebook 256, 10 classes) on CPU: the\n"
                "# 64-token study's models (python -m study demo --setup digits64).\n"
                "# python -m train ar fit --config {dir}/{name}.yaml\n"),
        # Four times the tokens per image of the demo's models, so fewer, smaller batches keep the study of
        # eight models within half an hour on two cores; val every epoch (47 steps), the best one exported.
        trainer=("  accelerator: cpu\n  devices: 1\n  precision: 32-true\n  max_steps: 240\n  max_epochs: -1\n"
                 "  gradient_clip_val: 1.0\n  log_every_n_steps: 20\n  check_val_every_n_epoch: 1\n"
                 "  enable_progress_bar: false\n"),
        optim=("  lr: 1.0e-3\n  betas: [0.9, 0.95]\n  weight_decay: 0.05\n  schedule: cosine\n  warmup_steps: 20\n"
               "  total_steps: 240\n"),
        train_tokens="runs/digits64/tokens/train",
        train_note="python -m study demo --setup digits64 makes them",
        val_tokens="runs/digits64/tokens/val",
        batch_size=32,
        num_workers=0,
        tokenizer="runs/digits64/vq/tokenizer",
        sample_every=1000,
        checkpoint="{monitor: val/nll, mode: min, save_top_k: 1, save_last: true, filename: best}",
        export_best=True,
        grid=(8, 8),
    ),
}
"""The study's presets; `--preset <key>`."""


# ---------------------------------------------------------------------------------------------------------
# YAML text of a ModelConfig


_PLAIN = re.compile(r"^[A-Za-z_/~][A-Za-z0-9_./~+-]*$")
# Words YAML 1.1 (PyYAML, jsonargparse) reads as booleans or null: written quoted so they stay strings.
_YAML_WORDS = {"y", "n", "yes", "no", "on", "off", "true", "false", "null", "none", "~"}


def _yaml_value(value: Any) -> str:
    """One YAML flow value: lists as [a, b], strings plain when YAML reads them back as that string."""
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml_value(v) for v in value) + "]"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        text = repr(value)
        # PyYAML reads 1e-05 as a string: its floats need a dot in the mantissa.
        mantissa, _, exponent = text.partition("e")
        return f"{mantissa}.0e{exponent}" if exponent and "." not in mantissa else text
    if isinstance(value, int):
        return str(value)
    text = str(value)
    return text if _PLAIN.match(text) and text.lower() not in _YAML_WORDS else json.dumps(text)


_MODEL_ALWAYS = ("dim", "n_layer", "n_head", "multiple_of", "ffn_dim_multiplier", "vocab_size", "num_classes",
                 "block_size")
_ENGRAM_ALWAYS = ("layers", "neighborhoods", "heads_per_order", "head_dim", "rows_per_head", "gate", "table")


def _plain(value: Any) -> Any:
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def model_fields(config: ModelConfig, keep: tuple[str, ...] = ()) -> dict[str, Any]:
    """The `model.gpt` mapping of a ModelConfig: the fields that define the architecture, every other field
    that differs from its default (or is named in `keep`), and the Engram block (None for the baseline)."""
    default_model, default_engram = ModelConfig(), EngramConfig()
    out: dict[str, Any] = {}
    for f in fields(ModelConfig):
        value = getattr(config, f.name)
        if f.name == "engram":
            continue
        if f.name in _MODEL_ALWAYS:
            if f.name != "ffn_dim_multiplier" or value is not None:
                out[f.name] = _plain(value)
        elif f.name in keep or value != getattr(default_model, f.name):
            out[f.name] = _plain(value)
    e = config.engram
    if e is None:
        out["engram"] = None
        return out
    engram = {name: _plain(getattr(e, name)) for name in _ENGRAM_ALWAYS}
    for f in fields(EngramConfig):
        if f.name not in engram and getattr(e, f.name) != getattr(default_engram, f.name):
            engram[f.name] = _plain(getattr(e, f.name))
    out["engram"] = engram
    return out


def model_block(config: ModelConfig) -> str:
    """The `model.gpt` YAML lines of a ModelConfig (the mapping `model_fields` gives)."""
    lines = []
    for key, value in model_fields(config).items():
        if isinstance(value, dict):
            lines.append(f"    {key}:")
            lines += [f"      {k}: {_yaml_value(v)}" for k, v in value.items()]
        else:
            lines.append(f"    {key}: {_yaml_value(value)}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------
# Inputs: the token data set's shapes, the baseline, the Engram layout


@dataclass(frozen=True)
class TokenShapes:
    """What the AR model's shapes must match in a token data set (read from its meta.json)."""

    vocab_size: int
    """meta.json `codebook_size`."""
    grid: tuple[int, int]
    """meta.json `grid`: (rows, columns) of tokens per image."""
    num_classes: int
    """meta.json `num_classes`."""
    source: str
    """The meta.json path (for error messages)."""
    tokenizer: str | None = None
    """meta.json `tokenizer`: the tokenizer the shards were encoded with (SampleGrid decodes with it)."""


def token_shapes(tokens: str) -> TokenShapes:
    """Vocabulary, grid and classes of the token shards `tokens` (a folder or brace pattern)."""
    meta = read_token_meta(tokens)
    grid, vocab, classes = meta["grid"], meta["codebook_size"], meta["num_classes"]
    ok = (isinstance(grid, list) and len(grid) == 2 and all(isinstance(g, int) and g >= 1 for g in grid)
          and isinstance(vocab, int) and vocab >= 1 and isinstance(classes, int) and classes >= 1)
    if not ok:
        raise ValueError(f"{meta['path']}: expected grid [rows, cols] and codebook_size, num_classes >= 1, got "
                         f"grid={grid!r}, codebook_size={vocab!r}, num_classes={classes!r}; rerun "
                         f"`python -m train.prepare tokens` to rewrite it")
    tokenizer = meta.get("tokenizer")
    return TokenShapes(vocab, (grid[0], grid[1]), classes, meta["path"],
                       tokenizer if isinstance(tokenizer, str) else None)


def with_shapes(config: ModelConfig, shapes: TokenShapes) -> ModelConfig:
    """`config` with the data's vocabulary, classes and token grid (grid None when square)."""
    rows, cols = shapes.grid
    return replace(config, vocab_size=shapes.vocab_size, num_classes=shapes.num_classes, block_size=rows * cols,
                   grid=None if rows == cols else (rows, cols))


def _check_yaml_shapes(gpt: dict[str, Any], shapes: TokenShapes, yaml_path: str) -> dict[str, Any]:
    """The YAML's model.gpt with the data's shapes filled in where absent; a ValueError names the first key
    that disagrees with meta.json."""
    rows, cols = shapes.grid
    wanted = {"vocab_size": (shapes.vocab_size, f"codebook_size {shapes.vocab_size}"),
              "num_classes": (shapes.num_classes, f"num_classes {shapes.num_classes}"),
              "block_size": (rows * cols, f"grid {[rows, cols]} ({rows * cols} tokens)"),
              "grid": ([rows, cols], f"grid {[rows, cols]}")}
    out = dict(gpt)
    for key, (value, meta_text) in wanted.items():
        if gpt.get(key) is None:  # not set: the data's (a square grid stays implicit, as ModelConfig has it)
            if key != "grid" or rows != cols:
                out[key] = value
            continue
        given = list(gpt[key]) if isinstance(gpt[key], (list, tuple)) else gpt[key]
        if given != value:
            raise ValueError(f"{yaml_path}: model.gpt.{key} is {gpt[key]!r} but {shapes.source} has {meta_text}; "
                             f"fix model.gpt.{key} in the YAML, or pass --tokens with the shards it was made "
                             f"for")
    return out


def _engram_layout(default: EngramConfig, layers: list[int] | None, neighborhoods: list[list[int | str]] | None,
                   heads_per_order: int | None, head_dim: int | None,
                   options: dict[str, Any] | None) -> EngramConfig:
    """`default` with the layout arguments that are set (rows_per_head stays the solver's)."""
    changes = {key: value for key, value in (("layers", layers), ("neighborhoods", neighborhoods),
                                             ("heads_per_order", heads_per_order), ("head_dim", head_dim))
               if value is not None}
    options = dict(options or {})
    known = {f.name for f in fields(EngramConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"--engram_options: {unknown} are not EngramConfig fields (known: {sorted(known)})")
    if "rows_per_head" in options:
        raise ValueError("--engram_options: rows_per_head is what the budget solver sets; drop it")
    both = sorted(set(options) & set(changes))
    if both:
        raise ValueError(f"--engram_options sets {both}, which have their own flags: use --{both[0]} only")
    try:
        return replace(default, **options, **changes)
    except (TypeError, ValueError) as error:
        raise ValueError(f"Engram layout: {error}") from None


def _check_depth(base: ModelConfig, engram: EngramConfig, family: Family, label: str) -> None:
    # Width solutions and the iso-backbone variant keep the baseline's depth, so every Engram layer must exist.
    if family.vary == "width" and max(engram.layers) >= base.n_layer:
        raise ValueError(f"Engram layers {list(engram.layers)} need a model of at least {max(engram.layers) + 1} "
                         f"blocks, but {label} has n_layer={base.n_layer}: pass --layers (e.g. '[1]')")


def _check_rhos(rhos: tuple[float, ...]) -> None:
    if not rhos:
        raise ValueError("--rhos is empty: give at least one rho in (0, 1)")
    bad = [rho for rho in rhos if not 0.0 < rho < 1.0]
    if bad:
        raise ValueError(f"--rhos {bad} must lie in (0, 1): rho = 1 is the baseline, which is always written")
    if len(set(rhos)) != len(rhos):
        raise ValueError(f"--rhos {list(rhos)} names a rho twice")


# ---------------------------------------------------------------------------------------------------------
# The variants and their files


def variants(base: ModelConfig, engram: EngramConfig, rhos: tuple[float, ...], name: str,
             variant_rho: float | None = None, frozen: bool = True, gate: float | None = 0.1,
             plus_memory: bool = True, family: Family = WIDTH,
             rho_tolerance: float = RHO_TOLERANCE) -> dict[str, tuple[ModelConfig, str]]:
    """file stem -> (model config, one-line description), baseline first.

    Args:
        base: The baseline (no Engram); its total parameter count is every iso-parameter variant's budget.
        engram: Engram layout of the variants (rows_per_head is set by the solver).
        rhos: Backbone shares of the iso-parameter variants, each in (0, 1).
        name: File-name prefix.
        variant_rho: Which rho variant the frozen, constant-gate and plus-memory files edit (one of rhos).
        frozen: Write the frozen-table variant.
        gate: Constant gate of the constant-gate variant; None: no such variant.
        plus_memory: Write the iso-backbone variant (the baseline plus the variant_rho model's memory).
        family: How the solver shapes the backbone.
        rho_tolerance: Largest |achieved - requested rho| accepted from the solver.
    """
    total = count_parameters(base).total
    out = {f"{name}_baseline": (base, f"pure AR baseline, {total:,} parameters (rho = 1)")}
    solved = {}
    for rho in rhos:
        solution = solve_budget(total, rho, base, engram, family=family, rho_tolerance=rho_tolerance)
        solved[rho] = solution.config
        out[f"{name}_engram_rho{rho}"] = (solution.config, f"Engram iso-parameter with the baseline at rho {rho} "
                                          f"(achieved {solution.counts.rho:.3f}, total {solution.counts.total:,})")
    if not (frozen or gate is not None or plus_memory):
        return out
    mid = solved[variant_rho]
    if frozen:
        out[f"{name}_engram_rho{variant_rho}_frozen"] = (
            replace(mid, engram=replace(mid.engram, table="frozen")),
            f"rho {variant_rho} Engram with tables frozen at N(0,1)")
    if gate is not None:
        out[f"{name}_engram_rho{variant_rho}_gate{gate}"] = (
            replace(mid, engram=replace(mid.engram, gate=gate)),
            f"rho {variant_rho} Engram with the gate clamped to {gate} in training")
    if plus_memory:
        memory = count_parameters(mid).memory
        plus = replace(base, engram=replace(engram, rows_per_head=mid.engram.rows_per_head))
        millions = round(memory / 1e6, 2)
        # Under 10k parameters two decimals of a million would read 0.0: count in thousands instead.
        size = f"{millions}m" if millions > 0 else f"{round(memory / 1e3, 1)}k"
        out[f"{name}_plus_memory{size}"] = (
            plus, f"iso-backbone: the baseline plus the rho {variant_rho} variant's memory "
                  f"({count_parameters(plus).memory:,})")
    return out


def _header(template: str, directory: str, name: str) -> str:
    # str.replace, not str.format: a header may quote user paths, which may hold braces.
    return template.replace("{dir}", directory).replace("{name}", name)


@dataclass(frozen=True)
class _PresetRecipe:
    """Renders a preset's files (text templates, so the tracked files keep their comments)."""

    preset: Preset
    header: str
    train_tokens: str
    train_note: str
    val_tokens: str
    tokenizer: str

    def render(self, name: str, config: ModelConfig, note: str, directory: str) -> str:
        p = self.preset
        sample_grid = (f"{{tokenizer: {_yaml_value(self.tokenizer)}, every_n_steps: {p.sample_every}, "
                       f"per_class: 8, sampling: {{cfg_scale: 2.0}}}}")
        callbacks = (f"  callbacks:\n    - class_path: {p.checkpoint_class}\n"
                     f"      init_args: {p.checkpoint}\n"
                     "    - class_path: train.callbacks.MetricsJson\n"
                     "    - class_path: train.throughput.TokenThroughput   # tokens/s, FLOP/s, MFU (GPUs)\n"
                     "    - class_path: train.callbacks.ExportModel\n"
                     f"      init_args: {{dirname: model, use_best: {str(p.export_best).lower()}}}\n"
                     f"    - class_path: train.callbacks.SampleGrid\n      init_args: {sample_grid}\n")
        logger = ("  logger:\n    class_path: lightning.pytorch.loggers.CSVLogger\n"
                  f"    init_args: {{save_dir: runs/ar/{name}, name: \"\", version: \"\"}}   # the run directory\n")
        note_text = f"   # {self.train_note}" if self.train_note else ""
        data = ("data:\n  class_path: train.data.tokens.TokenShardsDataModule\n  init_args:\n"
                f"    train_shards: {_yaml_value(self.train_tokens)}{note_text}\n"
                f"    val_shards: {_yaml_value(self.val_tokens)}\n    batch_size: {p.batch_size}\n"
                f"    num_workers: {p.num_workers}\n")
        return (_header(self.header, directory, name) + f"# variant: {note}\n" + "seed_everything: 0\n"
                + "trainer:\n" + p.trainer + logger + callbacks + "model:\n  gpt:\n" + model_block(config)
                + p.optim + data)


@dataclass(frozen=True)
class _YamlRecipe:
    """Renders files from a baseline YAML: its sections as they are, but the model, run directory and data."""

    doc: dict[str, Any]
    header: str
    gpt_keys: tuple[str, ...]
    train_tokens: str
    val_tokens: str
    tokenizer: str | None

    def render(self, name: str, config: ModelConfig, note: str, directory: str) -> str:
        doc = copy.deepcopy(self.doc)
        doc["model"]["gpt"] = model_fields(config, self.gpt_keys)
        data = doc["data"].setdefault("init_args", {})
        data["train_shards"], data["val_shards"] = self.train_tokens, self.val_tokens
        trainer = doc.setdefault("trainer", {})
        loggers = trainer.get("logger")
        if not isinstance(loggers, (dict, list)):  # absent, true: the CSV logger the presets use
            loggers = trainer["logger"] = {"class_path": "lightning.pytorch.loggers.CSVLogger",
                                           "init_args": {"name": "", "version": ""}}
        for logger in loggers if isinstance(loggers, list) else [loggers]:
            if isinstance(logger, dict):
                args = logger.setdefault("init_args", {})
                parent = Path(str(args.get("save_dir") or "runs/ar/x")).parent.as_posix()
                args["save_dir"] = f"{parent}/{name}"
        for callback in trainer.get("callbacks") or []:
            if (self.tokenizer is not None and isinstance(callback, dict)
                    and str(callback.get("class_path", "")).endswith("SampleGrid")):
                callback.setdefault("init_args", {})["tokenizer"] = self.tokenizer
        body = yaml.safe_dump(doc, sort_keys=False, default_flow_style=None, width=120)
        return _header(self.header, directory, name) + f"# variant: {note}\n" + body


def _load_baseline_yaml(path: str) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--baseline {path!r} is neither a file nor a named size ({sorted(MODEL_SIZES)})")
    try:
        doc = yaml.safe_load(file.read_text())
    except yaml.YAMLError as error:
        raise ValueError(f"--baseline {path}: not valid YAML ({error})") from None
    gpt = doc.get("model", {}).get("gpt") if isinstance(doc, dict) and isinstance(doc.get("model"), dict) else None
    if not isinstance(gpt, dict):
        raise ValueError(f"--baseline {path}: no model.gpt mapping; expected an AR training config like "
                         f"configs/ar/digits_baseline.yaml")
    if gpt.get("engram") is not None:
        raise ValueError(f"--baseline {path}: model.gpt.engram is set, but the baseline is the pure AR model; "
                         f"set `engram: null` (the Engram layout comes from --layers, --heads_per_order, ...)")
    if not isinstance(doc.get("data"), dict) or not isinstance(doc["data"].get("init_args", {}), dict):
        raise ValueError(f"--baseline {path}: no data mapping with init_args (train_shards, val_shards)")
    return doc


def _generate(directory: str, preset: str | None, tokens: str | None, baseline: str | None,
              rhos: list[float] | None, layers: list[int] | None, neighborhoods: list[list[int | str]] | None,
              heads_per_order: int | None, head_dim: int | None, engram_options: dict[str, Any] | None,
              family: Literal["width", "depth"], trim_ffn: bool, variant_rho: float | None, frozen: bool,
              gate: float | None, plus_memory: bool, train_tokens: str | None, val_tokens: str | None,
              name: str | None, rho_tolerance: float) -> tuple[str, dict[str, str]]:
    """(name, file stem -> YAML text) of one family of configs, whose headers name `directory`; every
    check runs before any solving."""
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"unknown --preset {preset!r}; known presets: {sorted(PRESETS)}")
    p = PRESETS.get(preset) if preset is not None else None
    baseline = baseline if baseline is not None else (p.size if p is not None else None)
    if baseline is None:
        raise ValueError("no baseline: pass --baseline (a named size such as gpt-b, or a baseline AR YAML) or "
                         f"--preset ({', '.join(sorted(PRESETS))})")
    is_yaml = baseline not in MODEL_SIZES
    doc = _load_baseline_yaml(baseline) if is_yaml else None
    if not is_yaml and p is None:
        raise ValueError(f"--baseline {baseline} is a named size, which has no trainer and optimizer settings: "
                         f"pass --preset ({', '.join(sorted(PRESETS))}) for them, or --baseline a YAML")
    yaml_data = doc["data"].get("init_args", {}) if doc is not None else {}

    # The data set: meta.json of --tokens (default: --train_tokens, or the YAML's train_shards), else the preset's.
    source = tokens if tokens is not None else train_tokens if train_tokens is not None else (
        yaml_data.get("train_shards") if doc is not None else None)
    if doc is not None and source is None:
        raise ValueError(f"--baseline {baseline} has no data.init_args.train_shards: pass --tokens (a token "
                         f"folder with meta.json)")
    try:
        shapes = token_shapes(str(source)) if source is not None else None
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{error}; pass --tokens a local token folder (with meta.json) of the data "
                                f"these configs train on") from None
    train = train_tokens if train_tokens is not None else tokens if tokens is not None else (
        yaml_data.get("train_shards") if doc is not None else p.train_tokens)
    if val_tokens is not None:
        val = val_tokens
    elif tokens is not None or train_tokens is not None:
        given = Path(str(train))
        if given.name != "train":
            raise ValueError(f"cannot guess the validation shards of {train!r} (its folder is not named train): "
                             f"pass --val_tokens")
        val = str(given.with_name("val"))
    else:
        val = yaml_data.get("val_shards") if doc is not None else p.val_tokens
        if val is None:
            raise ValueError(f"--baseline {baseline} has no data.init_args.val_shards: pass --val_tokens")
    if shapes is not None and Path(str(val)).is_dir() and (Path(str(val)) / "meta.json").is_file():
        val_shapes = token_shapes(str(val))
        if (val_shapes.vocab_size, val_shapes.grid, val_shapes.num_classes) != (
                shapes.vocab_size, shapes.grid, shapes.num_classes):
            raise ValueError(f"{val_shapes.source} (codebook {val_shapes.vocab_size}, grid {list(val_shapes.grid)}, "
                             f"{val_shapes.num_classes} classes) disagrees with {shapes.source} (codebook "
                             f"{shapes.vocab_size}, grid {list(shapes.grid)}, {shapes.num_classes} classes): "
                             f"pass --val_tokens the validation shards of the same data set")

    # The baseline model, with the data's shapes.
    if doc is not None:
        gpt = _check_yaml_shapes(doc["model"]["gpt"], shapes, baseline)
        try:
            base = ModelConfig(**{**gpt, "engram": None})
        except (TypeError, ValueError) as error:
            raise ValueError(f"--baseline {baseline}: model.gpt is not a valid ModelConfig: {error}") from None
    else:
        base = model_config(baseline)
        if shapes is not None:
            base = with_shapes(base, shapes)
        elif baseline != p.size:  # no meta.json: the preset's data, so the preset's shapes
            preset_base = model_config(p.size)
            base = replace(base, vocab_size=preset_base.vocab_size, num_classes=preset_base.num_classes,
                           block_size=preset_base.block_size, grid=preset_base.grid)
        if shapes is None and p.grid is not None:  # the preset's own data has its own grid
            rows, cols = p.grid
            base = replace(base, block_size=rows * cols, grid=None if rows == cols else p.grid)
    engram = _engram_layout(p.engram if p is not None else STUDY_ENGRAM, layers, neighborhoods, heads_per_order,
                            head_dim, engram_options)
    solver_family = Family(vary=family, trim_ffn=trim_ffn)
    _check_depth(base, engram, solver_family, baseline)
    rho_list = tuple(float(r) for r in rhos) if rhos is not None else (p.rhos if p is not None else STUDY_RHOS)
    _check_rhos(rho_list)
    if variant_rho is None:
        variant_rho = min(rho_list, key=lambda r: abs(r - 0.5))  # the middle of the sweep, 0.5 when swept
    elif variant_rho not in rho_list:
        raise ValueError(f"--variant_rho {variant_rho} is not one of --rhos {list(rho_list)}")
    if gate is not None and not 0.0 <= gate <= 1.0:
        raise ValueError(f"--gate {gate} must lie in [0, 1] (or null: no constant-gate variant)")
    # The preset's own files: its data and its model (its header describes exactly those).
    own = doc is None and shapes is None and baseline == p.size
    if name is None:
        name = p.name if own else (
            Path(baseline).stem.removesuffix("_baseline") if is_yaml else baseline.replace("-", "_"))
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ValueError(f"--name {name!r} must be letters, digits, '_', '.' or '-' (it starts every file name)")

    # How the files look: the preset's own header only for the preset's own data and model.
    grid = base.token_grid
    what = (f"{grid[0]}x{grid[1]} grid, codebook {base.vocab_size}, {base.num_classes} classes")
    if doc is not None:
        header = (f"# Generated by `python -m study configs` from {baseline} for the tokens {train} ({what}).\n"
                  "# python -m train ar fit --config {dir}/{name}.yaml\n")
        recipe: _PresetRecipe | _YamlRecipe = _YamlRecipe(doc, header, tuple(gpt), str(train), str(val),
                                                          shapes.tokenizer if tokens is not None else None)
    else:
        header = p.header if own else (
            f"# {baseline} on the tokens {train} ({what}), the {preset} preset's trainer and optimizer.\n"
            "# python -m train ar fit --config {dir}/{name}.yaml\n")
        tokenizer = shapes.tokenizer if shapes is not None and shapes.tokenizer else p.tokenizer
        recipe = _PresetRecipe(p, header, str(train), p.train_note if train == p.train_tokens else "", str(val),
                               tokenizer)
    planned = variants(base, engram, rho_list, name, variant_rho, frozen, gate, plus_memory, solver_family,
                       rho_tolerance)
    return name, {stem: recipe.render(stem, config, note, directory) for stem, (config, note) in planned.items()}


def _write(out: Path, texts: dict[str, str], overwrite: bool) -> list[Path]:
    """Write the files (those already holding the same text are left alone); refuses, before writing any,
    to replace a file holding other text unless `overwrite`."""
    paths = {out / f"{stem}.yaml": text for stem, text in texts.items()}
    not_files = [path for path in paths if path.exists() and not path.is_file()]
    if not_files:
        raise FileExistsError(f"{not_files[0]} exists and is not a file: remove it or choose another --out")
    clashes = [path for path, text in paths.items() if path.is_file() and path.read_text() != text]
    if clashes and not overwrite:
        raise FileExistsError(f"{len(clashes)} file(s) in {out} exist with other content, e.g. {clashes[0]}: "
                              f"pass --overwrite true to replace them, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    for path, text in paths.items():
        if not path.is_file() or path.read_text() != text:
            atomic_write_text(path, text)
    return list(paths)


def write_configs(
    out: str | None = None,
    preset: Literal["digits", "digits64", "imagenet256"] | None = None,
    tokens: str | None = None,
    baseline: str | None = None,
    rhos: list[float] | None = None,
    layers: list[int] | None = None,
    neighborhoods: list[list[int | str]] | None = None,
    heads_per_order: int | None = None,
    head_dim: int | None = None,
    engram_options: dict[str, Any] | None = None,
    family: Literal["width", "depth"] = "width",
    trim_ffn: bool = True,
    variant_rho: float | None = None,
    frozen: bool = True,
    gate: float | None = 0.1,
    plus_memory: bool = True,
    train_tokens: str | None = None,
    val_tokens: str | None = None,
    name: str | None = None,
    overwrite: bool = False,
    rho_tolerance: float = RHO_TOLERANCE,
) -> list[Path]:
    """Write one study's AR configs into `out` and return their paths.

    The files: the baseline, iso-parameter Engram variants at each rho, and the frozen-table, constant-gate
    and iso-backbone variants of one of them. Files that already hold the same text are left alone; one
    holding other text is an error (before anything is written) unless `overwrite`.

    Args:
        out: Output directory (default runs/configs/<name>). Nothing is written into configs/ unless this
            says so; `--out configs/ar` with a preset regenerates the tracked files.
        preset: The study preset whose trainer, optimizer, data paths and SampleGrid tokenizer the files use,
            and whose baseline, Engram layout and rhos are the defaults (digits: gpt-small on the demo's
            4x4 digit tokens, CPU; imagenet256: GPT-B on ImageNet-256 VQ-16 tokens, LlamaGen's recipe).
            Needed with a named baseline; with a baseline YAML that YAML's settings are used instead.
        tokens: Token folder (or brace pattern) whose meta.json sets the vocabulary (codebook_size), the
            token grid (block_size = rows x cols) and the number of classes, e.g. runs/demo/tokens/train.
            Default: --train_tokens, or the baseline YAML's train_shards; with neither, the preset's own data.
        baseline: The pure AR model: a named size (gpt-b, gpt-small, ...; its shapes are replaced by the
            data's) or a baseline AR YAML to start from (its shapes must match meta.json; its other sections
            are kept). Default: the preset's.
        rhos: Backbone shares in (0, 1) of the iso-parameter Engram variants. Default: the preset's
            (imagenet256: 0.17, 0.3, 0.5, 0.7, 0.9; digits, digits64: 0.5), or the study's without a preset.
        layers: 0-indexed blocks that get an Engram module. Default: the preset's (the study's without one).
        neighborhoods: One neighbourhood per n-gram order, e.g. [[L, U], [L, U, UL, UR]]. Default: the
            preset's.
        heads_per_order: Hash heads per n-gram order. Default: the preset's.
        head_dim: Width of one table row. Default: the preset's.
        engram_options: Other EngramConfig fields of the variants, e.g. {use_conv: false, hash_label: true}
            (not rows_per_head, which the solver sets).
        family: How the solver shapes each variant's backbone: `width` keeps the baseline's depth and
            attention head size, `depth` its width.
        trim_ffn: Let the solver trim the SwiGLU width to land on rho (finer than one width or depth step).
        variant_rho: The rho whose variant the frozen, constant-gate and iso-backbone files edit; one of
            rhos. Default: the one nearest 0.5.
        frozen: Write the frozen-table variant (tables fixed at their N(0, 1) init).
        gate: Constant gate of the constant-gate variant, in [0, 1]; null: no such variant.
        plus_memory: Write the iso-backbone variant: the baseline plus the variant_rho model's memory.
        train_tokens: train_shards written into the configs. Default: --tokens, the YAML's, or the preset's.
        val_tokens: val_shards written into the configs. Default: the `val` folder beside a train_shards
            folder named `train`, the YAML's, or the preset's.
        name: File-name prefix. Default: the preset's, the YAML's stem without _baseline, or the size.
        overwrite: Replace files in `out` that hold other content (otherwise an error, before any write).
        rho_tolerance: Largest |achieved - requested rho| accepted from the solver.
    """
    # Headers name the output folder, which by default depends on the resolved name: render with a marker
    # that no generated text holds, then put the folder in.
    marker = "\0dir\0"
    resolved, texts = _generate(marker, preset, tokens, baseline, rhos, layers, neighborhoods, heads_per_order,
                                head_dim, engram_options, family, trim_ffn, variant_rho, frozen, gate, plus_memory,
                                train_tokens, val_tokens, name, rho_tolerance)
    directory = Path(out if out is not None else f"runs/configs/{resolved}")
    texts = {stem: text.replace(marker, directory.as_posix()) for stem, text in texts.items()}
    return _write(directory, texts, overwrite)


def budget(
    size: str = "gpt-b",
    params: float | None = None,
    tokens: str | None = None,
    rhos: list[float] | None = None,
    layers: list[int] | None = None,
    neighborhoods: list[list[int | str]] | None = None,
    heads_per_order: int | None = None,
    head_dim: int | None = None,
    engram_options: dict[str, Any] | None = None,
    family: Literal["width", "depth"] = "width",
    trim_ffn: bool = True,
    rho_tolerance: float = RHO_TOLERANCE,
) -> list[dict]:
    """Print the memory-budget table (markdown), then its rows as JSON lines.

    One row per rho: the solved backbone shape, rows per head, parameter counts, achieved rho, FLOPs per
    token and the relative error to the budget (engram_vision.budget.budget_table).

    Args:
        size: Named model config (engram_vision.MODEL_SIZES): the shape the solver varies, and without
            --params the budget (its parameter count).
        params: Total parameter budget instead of the size's own count, e.g. 3e8.
        tokens: Token folder whose meta.json sets the vocabulary, grid and classes (default: the size's).
        rhos: Backbone shares in (0, 1]; 1 is the baseline row. Default: the study's 0.17, 0.3, 0.5, 0.7,
            0.9 and 1.
        layers: 0-indexed blocks that get an Engram module. Default: the study's [1, 6].
        neighborhoods: One neighbourhood per n-gram order. Default: the study's [[L, U], [L, U, UL, UR]].
        heads_per_order: Hash heads per n-gram order. Default: the study's 8.
        head_dim: Width of one table row. Default: the study's 32.
        engram_options: Other EngramConfig fields, e.g. {use_conv: false} (not rows_per_head, which the
            solver sets).
        family: How the solver shapes the backbone: `width` keeps the size's depth and attention head size,
            `depth` its width.
        trim_ffn: Let the solver trim the SwiGLU width to land on rho.
        rho_tolerance: Largest |achieved - requested rho| accepted from the solver.
    """
    if size not in MODEL_SIZES:
        raise ValueError(f"unknown --size {size!r}; known sizes: {sorted(MODEL_SIZES)}")
    base = model_config(size)
    shapes = token_shapes(tokens) if tokens is not None else None
    if shapes is not None:
        base = with_shapes(base, shapes)
    engram = _engram_layout(STUDY_ENGRAM, layers, neighborhoods, heads_per_order, head_dim, engram_options)
    solver_family = Family(vary=family, trim_ffn=trim_ffn)
    _check_depth(base, engram, solver_family, f"--size {size}")
    rho_list = tuple(float(r) for r in rhos) if rhos is not None else (*STUDY_RHOS, 1.0)
    bad = [rho for rho in rho_list if not 0.0 < rho <= 1.0]
    if not rho_list or bad:
        raise ValueError(f"--rhos {list(rho_list)} must be non-empty and lie in (0, 1] (1 is the baseline)")
    if params is not None and not (math.isfinite(params) and params >= 1):
        raise ValueError(f"--params must be a parameter count >= 1, got {params}")
    total = count_parameters(base).total if params is None else int(round(params))
    rows = budget_table(total, rho_list, base, engram, solver_family, rho_tolerance=rho_tolerance)
    orders = ", ".join("[" + ", ".join(str(n) for n in order) + "]" for order in engram.neighborhoods)
    data = f" on {shapes.source}" if shapes is not None else ""
    print(f"{size} budget: {total:,} parameters{data}; Engram layers {engram.layers}, {engram.num_heads} heads "
          f"x {engram.head_dim} per layer, orders [{orders}], {solver_family.vary} family\n")
    print("| " + " | ".join(rows[0]) + " |")
    print("|" + "---|" * len(rows[0]))
    for row in rows:
        cells = [f"{v:,.0f}" if k == "flops_per_token" else f"{v:,}" if isinstance(v, int) else str(v)
                 for k, v in row.items()]
        print("| " + " | ".join(cells) + " |")
    print()
    for row in rows:
        print(json.dumps(row))
    return rows
