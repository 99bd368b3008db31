"""LightningCLI entry points, one per trainable stage: `python -m train <stage> <fit|validate|...> ...`.

Stages map to a LightningModule; the data module is chosen in YAML by `class_path` (subclass mode), so a
new data source is a new class, not a new flag. Every run saves its resolved config beside its logs.
A checkpoint restored with `--ckpt_path` is read with `weights_only=True` unless the command line or a
config says `--weights_only false` (Lightning otherwise defers to torch, whose default was False before 2.6).
Checkpoints and the saved `config.yaml` are written atomically (`train.checkpoints`): a job killed or out
of disk space mid-save leaves the previous `last.ckpt` intact for `--ckpt_path last`.
"""

from __future__ import annotations

import inspect
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import lightning as L
from jsonargparse import set_parsing_settings
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from tokenizers_vq.files import atomic_write_text
from train.checkpoints import use_atomic_checkpoints
from train.config_trust import check_class_paths, split_allow_flags
from train.csv_log import keep_csv_logs
from train.resume import EarlierRunError, checkpoint_dirs, resume_plan, set_aside


def _tokenizer_module() -> type[L.LightningModule]:
    from train.lit_vq import LitVQ

    return LitVQ


def _ar_module() -> type[L.LightningModule]:
    from train.lit_ar import LitAR

    return LitAR


# stage name -> factory of its LightningModule class (imported lazily so `--help` stays fast)
STAGES: dict[str, Callable[[], type[L.LightningModule]]] = {"tokenizer": _tokenizer_module, "ar": _ar_module}


def with_safe_loading(args: list[str]) -> list[str]:
    """`args` with `--weights_only=true` right after the subcommand (when this Lightning takes it), so any
    `--ckpt_path` is unpickled without running code; a later `--weights_only` or config value still wins."""
    subcommand = args[0] if args else None
    if subcommand not in LightningCLI.subcommands():
        return list(args)
    if "weights_only" not in inspect.signature(getattr(L.Trainer, subcommand)).parameters:
        return list(args)
    return [subcommand, "--weights_only=true", *args[1:]]


class AtomicSaveConfig(SaveConfigCallback):
    """Lightning's SaveConfigCallback, but `<log_dir>/config.yaml` goes through `atomic_write_text`, and a
    resumed run whose config differs keeps the earlier one as `config.earlier-<n>.yaml` (the config.yaml is
    always the one the latest run used)."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.already_saved:
            return
        log_dir = trainer.log_dir  # a broadcast: every rank must ask
        if self.save_to_log_dir and log_dir is not None and trainer.is_global_zero:
            text = self.parser.dump(self.config, skip_none=False)
            path = Path(log_dir) / self.config_filename
            if path.is_file() and path.read_text() != text:
                set_aside(path, "earlier")
            atomic_write_text(path, text)
        if trainer.is_global_zero:
            self.save_config(trainer, pl_module, stage)
        self.already_saved = trainer.strategy.broadcast(True)


class _CLI(LightningCLI):
    """LightningCLI whose Trainer writes checkpoints atomically, keeps CSV logs across a resume and
    resumes a run folder that holds `last.ckpt` instead of starting over on top of it (`train.resume`)."""

    def instantiate_trainer(self, **kwargs) -> L.Trainer:
        trainer = use_atomic_checkpoints(super().instantiate_trainer(**kwargs))
        keep_csv_logs(trainer.loggers)
        return trainer

    def before_fit(self) -> None:
        config = self.config_init[self.subcommand]
        run_dir = Path(self.trainer.log_dir or self.trainer.default_root_dir)
        try:
            plan = resume_plan(run_dir, checkpoint_dirs(self.trainer), config.get("ckpt_path"))
        except EarlierRunError as error:
            raise SystemExit(f"python -m train: {error}") from None
        if self.trainer.is_global_zero:
            if plan.message:
                print(f"python -m train: {plan.message}", flush=True)
            if plan.set_aside is not None:
                print(f"python -m train: {plan.set_aside} (a run stopped before its first checkpoint) kept as "
                      f"{set_aside(plan.set_aside, 'unfinished')}", flush=True)
        config["ckpt_path"] = plan.ckpt_path


def run_stage(stage: str, args: list[str]) -> LightningCLI:
    """Run LightningCLI for `stage` with command-line `args` (e.g. `["fit", "--config", "x.yaml"]`)."""
    if stage not in STAGES:
        raise SystemExit(f"unknown stage {stage!r}; choose one of {sorted(STAGES)}")
    set_parsing_settings(docstring_parse_attribute_docstrings=True)  # --help shows each config field's docstring
    with warnings.catch_warnings():
        # `args` is the command line (minus the stage), or what a study or the demo passes; Lightning warns
        # whenever sys.argv also holds arguments, which is always the case here.
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        args, allowed = split_allow_flags(list(args))
        check_class_paths(args, allowed)  # before jsonargparse imports anything the config names
        # auto_configure_optimizers=False: no --optimizer / --lr_scheduler, which would replace the modules'
        # own parameter groups (tables apart) and schedules; those are the modules' typed fields.
        return _CLI(STAGES[stage](), L.LightningDataModule, subclass_mode_data=True, args=with_safe_loading(args),
                    save_config_callback=AtomicSaveConfig, save_config_kwargs={"overwrite": True},
                    auto_configure_optimizers=False,
                    parser_kwargs={"prog": f"python -m train {stage}"})


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in {"-h", "--help"}:
        print("usage: python -m train <stage> <fit|validate|test|predict> --config <yaml> [overrides]\n"
              f"stages: {', '.join(sorted(STAGES))}; `python -m train <stage> --help` lists every option")
        return
    run_stage(argv[0], argv[1:])
