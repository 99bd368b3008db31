"""`LitAR`: Lightning training of the AR prior (`engram_vision.EngramGPT`) on token batches.

Cross-entropy over all image tokens; AdamW over `engram_vision.param_groups` (Engram tables apart, lr x 5,
no weight decay, absent when frozen); constant or warmup + cosine schedule; logs loss, bits per token
and, per Engram layer, the mean and spread of the gate; `flops_per_batch` is what the configs' callback
`train.throughput.TokenThroughput` turns into tokens/s, FLOP/s and MFU. Gradient clipping and precision are
Trainer settings; EMA is Lightning's `EMAWeightAveraging` callback (its weights are what checkpoints hold
and what `train.callbacks.ExportModel` writes for sampling). Token data is `train/data/tokens.py`.
A non-finite loss stops training with an error naming the step and batch before any checkpoint is written
from the broken weights (`train.checkpoints`). At setup, before any step on every path (fit, validate, ...),
`check_token_data` compares the model with the token data's meta.json: tokens per image and grid, codebook
size and classes; each mismatch names the YAML key to change (`model.gpt.*`), both values and the file.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from engram_vision.budget import flops_per_token
from engram_vision.config import ModelConfig
from engram_vision.model import EngramGPT
from engram_vision.param_groups import adamw
from train.checkpoints import GuardedCheckpoints, LossGuard


def warmup_cosine(step: int, warmup_steps: int, total_steps: int | None, min_ratio: float) -> float:
    """LR factor: linear warmup to 1, then cosine to `min_ratio` at `total_steps` (None: stay at 1)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if total_steps is None or total_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def check_token_data(config: ModelConfig, data: object) -> None:
    """Raise one ValueError listing every way token data `data` does not fit model `config`.

    `data` is read for `vocab_size`, `num_classes` and `grid` (a `TokenShardsDataModule` reads them from
    its meta.json, whose path the message names); an attribute it lacks is not checked. Each mismatch names
    the YAML key to change (`model.gpt.block_size`, `model.gpt.grid`, `model.gpt.vocab_size`,
    `model.gpt.num_classes`), the model's value and the data's.
    """
    theirs = {name: getattr(data, name, None) for name in ("vocab_size", "num_classes", "grid")}
    meta = getattr(data, "meta", None)
    source = meta["path"] if isinstance(meta, dict) and "path" in meta else f"{type(data).__name__}"
    problems = []
    if theirs["vocab_size"] is not None and int(theirs["vocab_size"]) != config.vocab_size:
        vocab = int(theirs["vocab_size"])
        problems.append(f"model.gpt.vocab_size={config.vocab_size} does not match the token data's "
                        f"vocab_size={vocab} (codebook_size in {source}): set model.gpt.vocab_size: {vocab}, "
                        f"or use token shards made with a tokenizer of {config.vocab_size} codes")
    if theirs["num_classes"] is not None and int(theirs["num_classes"]) != config.num_classes:
        classes = int(theirs["num_classes"])
        problems.append(f"model.gpt.num_classes={config.num_classes} does not match the token data's "
                        f"num_classes={classes} (num_classes in {source}): set model.gpt.num_classes: {classes}")
    if theirs["grid"] is not None:
        rows, cols = (int(g) for g in theirs["grid"])
        ours = config.token_grid
        grid_hint = f" and model.gpt.grid: [{rows}, {cols}]" if rows != cols else ""
        if rows * cols != config.block_size:
            problems.append(f"model.gpt.block_size={config.block_size} does not match the token data's "
                            f"{rows * cols} tokens per image (grid {rows}x{cols} in {source}): set "
                            f"model.gpt.block_size: {rows * cols}{grid_hint}")
        elif ours != (rows, cols):
            # Same length, other shape: 2D RoPE and the Engram 2D neighbours would read the wrong cells.
            problems.append(f"model.gpt.grid={list(config.grid) if config.grid else None} (a {ours[0]}x"
                            f"{ours[1]} token grid) does not match the token data's grid {rows}x{cols} (grid "
                            f"in {source}): set model.gpt.grid: [{rows}, {cols}]")
    if problems:
        raise ValueError("the AR model does not fit its token data:\n  " + "\n  ".join(problems))


class LitAR(GuardedCheckpoints, L.LightningModule):
    """Trains `EngramGPT(gpt)` (the module's `model`) to predict image tokens given the class.

    Args:
        gpt: the Transformer (and Engram) configuration; YAML `model.gpt.*`.
        lr: AdamW learning rate of the backbone (tables get lr x table_lr_multiplier).
        betas: AdamW betas (LlamaGen: 0.9, 0.95).
        weight_decay: on matrices and embeddings (LlamaGen: 0.05); norms and tables get their own.
        schedule: `constant` (LlamaGen) or `cosine` (after warmup, down to min_lr_ratio at total_steps).
        warmup_steps: linear warmup steps (both schedules).
        total_steps: length of the cosine schedule; None: the Trainer's estimated total steps.
        min_lr_ratio: final LR of the cosine schedule as a fraction of lr.
        compile: torch.compile the model's forward (nn.Module.compile keeps state-dict names).
        code_map_tokenizer: tokenizer whose codebook the Engram code map is fitted to (k-means), when
            EngramConfig.code_map is set.
    """

    config_name = "gpt"  # the hyper-parameter holding the model configuration

    def __init__(self, gpt: ModelConfig = ModelConfig(), lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.95),
                 weight_decay: float = 0.05, schedule: Literal["constant", "cosine"] = "constant",
                 warmup_steps: int = 0, total_steps: int | None = None, min_lr_ratio: float = 0.0,
                 compile: bool = False, code_map_tokenizer: str | None = None):
        super().__init__()
        # Checkpoints are read with weights_only=True: hyper-parameters are stored as plain data.
        gpt = ModelConfig(**gpt) if isinstance(gpt, Mapping) else gpt
        if lr <= 0 or weight_decay < 0 or warmup_steps < 0 or not 0 <= min_lr_ratio <= 1:
            raise ValueError("LitAR: need lr > 0, weight_decay >= 0, warmup_steps >= 0, min_lr_ratio in [0, 1]")
        self.save_hyperparameters({"gpt": gpt.to_dict(), "lr": lr, "betas": tuple(betas),
                                   "weight_decay": weight_decay, "schedule": schedule, "warmup_steps": warmup_steps,
                                   "total_steps": total_steps, "min_lr_ratio": min_lr_ratio, "compile": compile,
                                   "code_map_tokenizer": code_map_tokenizer})
        self.model = EngramGPT(gpt)
        if compile:
            if gpt.engram is not None and gpt.engram.table_device == "host":
                raise ValueError("LitAR: compile=True cannot trace host tables (EngramConfig.table_device='host' "
                                 "reads rows through the host); set table_device='device' or compile=False")
            self.model.compile()
        self._gate_values: dict[int, Tensor] = {}
        for memory in self.model.engram_layers():
            memory.gate_probe.register_forward_hook(self._record_gate(memory.layer_id))
        self._last_batch_tokens = 0
        self._loss_guard = LossGuard()

    @property
    def flops_per_batch(self) -> float:
        """Model FLOPs of the last training batch: forward and backward (3 x forward), attention included."""
        return 3.0 * flops_per_token(self.model.config) * self._last_batch_tokens

    def _record_gate(self, layer: int):
        def hook(module, inputs, output: Tensor) -> None:
            self._gate_values[layer] = output.detach()
        return hook

    def setup(self, stage: str) -> None:
        config = self.model.config
        # Lightning calls setup before any step, checkpoint restore or code-map fit, on every stage.
        data = getattr(self.trainer, "datamodule", None)
        if data is not None:
            check_token_data(config, data)
        hp = self.hparams
        if stage == "fit" and hp.code_map_tokenizer and config.engram is not None and config.engram.code_map:
            from engram_vision.code_map import fit_code_map
            from tokenizers_vq.checkpoint import load_tokenizer

            codebook = load_tokenizer(hp.code_map_tokenizer).quantize.codebook().detach().cpu()
            self.model.set_code_map(fit_code_map(codebook, config.engram.code_map))  # a resume reloads it

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = adamw(self.model, hp.lr, tuple(hp.betas), hp.weight_decay)
        if hp.schedule == "constant" and hp.warmup_steps == 0:
            return optimizer
        total = hp.total_steps
        if hp.schedule == "cosine" and total is None:
            total = int(self.trainer.estimated_stepping_batches)
        cosine_total = total if hp.schedule == "cosine" else None
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, hp.warmup_steps, cosine_total, hp.min_lr_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _nll(self, tokens: Tensor, labels: Tensor) -> Tensor:
        logits = self.model(tokens[:, :-1], labels)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        # The previous step's loss, read where the model's input check waits for the device anyway.
        self._loss_guard.check()
        tokens, labels = batch
        loss = self._nll(tokens, labels)
        self._loss_guard.record({"global step": self.global_step, "batch": batch_idx, "epoch": self.current_epoch},
                                loss=loss)
        self._last_batch_tokens = tokens.numel()
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/bits_per_token", loss.detach() / math.log(2))
        for layer, gate in self._gate_values.items():
            self.log(f"gate/layer{layer}_mean", gate.float().mean())
            self.log(f"gate/layer{layer}_std", gate.float().std())
        self._gate_values.clear()
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        tokens, labels = batch
        nll = self._nll(tokens, labels)
        self.log("val/nll", nll, prog_bar=True, sync_dist=True, batch_size=tokens.shape[0])
        self.log("val/bits_per_token", nll / math.log(2), sync_dist=True, batch_size=tokens.shape[0])
        self._gate_values.clear()
