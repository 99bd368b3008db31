"""Writes configs/ar/*.yaml: per data set one baseline and its variants, which differ from the baseline
only in the lines that define the variant (the model block and the run directory).

    python -m study configs            # rewrite configs/ar (tests check the files are current)
    python -m study budget             # the budget table of GPT-B across the study's rhos

Iso-parameter Engram variants come from `engram_vision.budget.solve_budget` at the baseline's total
parameter count; the rest are edits of one variant. Strategy files (DDP, FSDP) are separate and combine
with any of these: `--config configs/ar/<name>.yaml --config configs/ar/strategy/fsdp.yaml`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from engram_vision.budget import STUDY_ENGRAM, STUDY_RHOS, budget_table, count_parameters, solve_budget
from engram_vision.config import EngramConfig, ModelConfig, model_config
from tokenizers_vq.files import atomic_write_text

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "ar"


@dataclass(frozen=True)
class DataSet:
    """What a family of configs shares: the baseline model, the trainer and the data lines."""

    name: str
    base: ModelConfig
    engram: EngramConfig
    header: str
    trainer: str
    optim: str
    data: str
    rhos: tuple[float, ...]
    sample_grid: str
    """init_args of train.callbacks.SampleGrid (tokenizer path and interval)."""
    checkpoint: str = "{save_last: true, save_top_k: 0}"
    """init_args of ModelCheckpoint."""
    export_best: bool = False
    """Export the best val checkpoint instead of the last weights."""


IMAGENET = DataSet(
    name="gpt_b_imagenet256",
    base=model_config("gpt-b"),
    engram=EngramConfig(layers=(1, 6), neighborhoods=(("L", "U"), ("L", "U", "UL", "UR")), heads_per_order=8,
                        head_dim=32),
    header=("# GPT-B class-conditional on ImageNet-256 VQ-16 tokens (16x16), LlamaGen's recipe: AdamW 1e-4,\n"
            "# betas (0.9, 0.95), wd 0.05, constant LR, grad clip 1.0, global batch 256 (32 x 8 GPUs), 300 epochs,\n"
            "# bf16, dropout 0.1 (tokens, residual, FFN, class). LlamaGen reports FID 5.46 at CFG 2.0 for the baseline.\n"
            "# python -m train ar fit --config configs/ar/{name}.yaml [--config configs/ar/strategy/fsdp.yaml]\n"),
    trainer=("  accelerator: gpu\n  devices: 8\n  strategy: ddp\n  precision: bf16-mixed\n  max_epochs: 300\n"
             "  gradient_clip_val: 1.0\n  log_every_n_steps: 100\n"),
    optim="  lr: 1.0e-4\n  betas: [0.9, 0.95]\n  weight_decay: 0.05\n  schedule: constant\n",
    data=("data:\n  class_path: train.data.tokens.TokenShardsDataModule\n  init_args:\n"
          "    train_shards: /data/imagenet256_vq16_tokens/train   # python -m train.prepare tokens --views ten_crop\n"
          "    val_shards: /data/imagenet256_vq16_tokens/val\n    batch_size: 32\n    num_workers: 8\n"),
    rhos=(0.17, 0.3, 0.5, 0.7, 0.9),
    sample_grid="{tokenizer: /data/llamagen/vq_ds16_c2i.pt, every_n_steps: 5000, per_class: 8, sampling: {cfg_scale: 2.0}}",
)

DIGITS = DataSet(
    name="digits",
    base=ModelConfig(dim=128, n_layer=4, n_head=4, multiple_of=32, vocab_size=256, num_classes=10, block_size=16),
    engram=EngramConfig(layers=(1,), neighborhoods=(("L", "U"), ("L", "U", "UL", "UR")), heads_per_order=4,
                        head_dim=16),
    header=("# Digits tokens (4x4 grid, codebook 256, 10 classes) on CPU: the `make demo` models.\n"
            "# python -m train ar fit --config configs/ar/{name}.yaml\n"),
    # A fixed step budget (not a time budget) so every variant sees the same number of batches; on 1500
    # images all models overfit, so the best val checkpoint (every 5 epochs = 120 steps) is kept and exported.
    trainer=("  accelerator: cpu\n  devices: 1\n  precision: 32-true\n  max_steps: 720\n  max_epochs: -1\n"
             "  gradient_clip_val: 1.0\n  log_every_n_steps: 20\n  check_val_every_n_epoch: 5\n"
             "  enable_progress_bar: false\n"),
    checkpoint="{monitor: val/nll, mode: min, save_top_k: 1, save_last: true, filename: best}",
    export_best=True,
    optim=("  lr: 1.0e-3\n  betas: [0.9, 0.95]\n  weight_decay: 0.05\n  schedule: cosine\n  warmup_steps: 50\n"
           "  total_steps: 720\n"),
    data=("data:\n  class_path: train.data.tokens.TokenShardsDataModule\n  init_args:\n"
          "    train_shards: runs/demo/tokens/train   # python -m train.prepare tokens (make demo does it)\n"
          "    val_shards: runs/demo/tokens/val\n    batch_size: 64\n    num_workers: 0\n"),
    rhos=(0.5,),
    sample_grid="{tokenizer: runs/demo/vq/tokenizer, every_n_steps: 1000, per_class: 8, sampling: {cfg_scale: 2.0}}",
)


def model_block(config: ModelConfig) -> str:
    """The `model.model` YAML lines for a ModelConfig (only fields that define the architecture)."""
    lines = [f"    dim: {config.dim}", f"    n_layer: {config.n_layer}", f"    n_head: {config.n_head}",
             f"    multiple_of: {config.multiple_of}"]
    if config.ffn_dim_multiplier is not None:
        lines.append(f"    ffn_dim_multiplier: {config.ffn_dim_multiplier!r}")
    lines += [f"    vocab_size: {config.vocab_size}", f"    num_classes: {config.num_classes}",
              f"    block_size: {config.block_size}"]
    e = config.engram
    if e is None:
        lines.append("    engram: null")
    else:
        orders = ", ".join("[" + ", ".join(str(n) for n in order) + "]" for order in e.neighborhoods)
        lines += ["    engram:", f"      layers: {list(e.layers)}", f"      neighborhoods: [{orders}]",
                  f"      heads_per_order: {e.heads_per_order}", f"      head_dim: {e.head_dim}",
                  f"      rows_per_head: {e.rows_per_head}", f"      gate: {e.gate}", f"      table: {e.table}"]
    return "\n".join(lines) + "\n"


def render(data: DataSet, name: str, config: ModelConfig, note: str) -> str:
    """The whole YAML file of one variant."""
    callbacks = ("  callbacks:\n    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
                 f"      init_args: {data.checkpoint}\n"
                 "    - class_path: train.callbacks.MetricsJson\n"
                 "    - class_path: train.throughput.TokenThroughput   # tokens/s, FLOP/s, MFU (GPUs)\n"
                 "    - class_path: train.callbacks.ExportModel\n"
                 f"      init_args: {{dirname: model, use_best: {str(data.export_best).lower()}}}\n"
                 f"    - class_path: train.callbacks.SampleGrid\n      init_args: {data.sample_grid}\n")
    logger = ("  logger:\n    class_path: lightning.pytorch.loggers.CSVLogger\n"
              f"    init_args: {{save_dir: runs/ar/{name}, name: \"\", version: \"\"}}   # the run directory\n")
    return (data.header.format(name=name) + f"# variant: {note}\n" + "seed_everything: 0\ntrainer:\n" + data.trainer
            + logger + callbacks + "model:\n  gpt:\n" + model_block(config) + data.optim + data.data)


def variants(data: DataSet) -> dict[str, tuple[ModelConfig, str]]:
    """file stem -> (model config, one-line description)."""
    total = count_parameters(data.base).total
    out = {f"{data.name}_baseline": (data.base, f"pure AR baseline, {total:,} parameters (rho = 1)")}
    solved = {}
    for rho in data.rhos:
        solution = solve_budget(total, rho, data.base, data.engram, rho_tolerance=0.05)
        solved[rho] = solution.config
        out[f"{data.name}_engram_rho{rho}"] = (solution.config, f"Engram iso-parameter with the baseline at "
                                               f"rho {rho} (achieved {solution.counts.rho:.3f}, total "
                                               f"{solution.counts.total:,})")
    mid = solved[0.5]
    out[f"{data.name}_engram_rho0.5_frozen"] = (replace(mid, engram=replace(mid.engram, table="frozen")),
                                                "rho 0.5 Engram with tables frozen at N(0,1)")
    out[f"{data.name}_engram_rho0.5_gate0.1"] = (replace(mid, engram=replace(mid.engram, gate=0.1)),
                                                 "rho 0.5 Engram with the gate clamped to 0.1 in training")
    memory = count_parameters(mid).memory
    plus = replace(data.base, engram=replace(data.engram, rows_per_head=mid.engram.rows_per_head))
    out[f"{data.name}_plus_memory{round(memory / 1e6, 2)}m"] = (
        plus, f"iso-backbone: the baseline plus the rho 0.5 variant's memory ({count_parameters(plus).memory:,})")
    return out


def write_all(directory: Path = CONFIG_DIR) -> list[Path]:
    """Write every AR config (each data set's baseline and its Engram variants); returns the paths.

    Args:
        directory: Where the YAML files go (default: the repository's configs/ar, which tests compare
            with this generator's output).
    """
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for data in (IMAGENET, DIGITS):
        for stem, (config, note) in variants(data).items():
            path = directory / f"{stem}.yaml"
            atomic_write_text(path, render(data, stem, config, note))
            written.append(path)
    return written


def budget(size: str = "gpt-b") -> list[dict]:
    """Print the budget table of a named model across the study's rhos (markdown), then the rows as JSON lines.

    Args:
        size: Named model config (engram_vision.MODEL_SIZES) whose parameter count is the budget.
    """
    base = model_config(size)
    total = count_parameters(base).total
    rows = budget_table(total, (*STUDY_RHOS, 1.0), base, STUDY_ENGRAM)
    print(f"{size} budget: {total:,} parameters; Engram layers {STUDY_ENGRAM.layers}, "
          f"{STUDY_ENGRAM.num_heads} heads x {STUDY_ENGRAM.head_dim} per layer\n")
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

