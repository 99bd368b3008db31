"""Whether a `fit` may start in its run folder: resume by default, never start over on top of an earlier run.

Rerunning a training command into a folder that already holds a run used to start again from step 0, write
`last-v1.ckpt` beside `last.ckpt` and overwrite the earlier run's metrics and export. `resume_plan` decides
before anything is written:

- no `--ckpt_path` and the folder holds `last.ckpt`: resume from it (what a rerun after a crash wants);
- no `--ckpt_path`, no `last.ckpt`, but files of an earlier run (checkpoints, `metrics.json`, an exported
  `model/`): refuse, naming the files and the ways out (a new folder, `--ckpt_path <file>`, or deleting
  the folder);
- an explicit `--ckpt_path`: the user chose; it is used as given (`last` with no last checkpoint: below);
- a start from step 0 (no checkpoint to resume) in a folder whose only trace of a run is `metrics.csv`
  (a run killed before its first checkpoint): the log is set aside as `metrics.unfinished-<n>.csv`, not
  appended to or overwritten.

Where checkpoints go is each ModelCheckpoint's `dirpath`, or `<save_dir>/<name>/<version>/checkpoints` of
the first logger as Lightning resolves it. `train/cli.py` applies the plan; how the CSV log survives the
resume is `train/csv_log.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

EARLIER_RUN_FILES = ("metrics.json", "model/config.json")
"""Files in a run folder that show an earlier run wrote there (besides its checkpoints)."""


def checkpoint_dirs(trainer: L.Trainer) -> list[Path]:
    """The folders the Trainer's ModelCheckpoint callbacks save into, resolved as Lightning does at setup."""
    dirs = []
    for callback in trainer.checkpoint_callbacks:
        if not isinstance(callback, ModelCheckpoint):
            continue
        if callback.dirpath is not None:
            dirs.append(Path(callback.dirpath))
        elif trainer.loggers:
            logger = trainer.loggers[0]
            save_dir = logger.save_dir or trainer.default_root_dir
            version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
            dirs.append(Path(save_dir, str(logger.name or ""), version, "checkpoints"))
        else:
            dirs.append(Path(trainer.default_root_dir, "checkpoints"))
    return list(dict.fromkeys(dirs))


@dataclass(frozen=True)
class ResumePlan:
    """What `fit` does in its run folder."""

    ckpt_path: str | None
    """The checkpoint to resume from (None: start at step 0 in an empty folder)."""
    message: str | None = None
    """What to tell the user (a resume they did not ask for by name)."""
    set_aside: Path | None = None
    """The log of a run killed before its first checkpoint, to be renamed before this run logs."""


class EarlierRunError(RuntimeError):
    """A fresh `fit` would overwrite an earlier run's files."""


def resume_plan(run_dir: Path, ckpt_dirs: list[Path], ckpt_path: str | None) -> ResumePlan:
    """The ResumePlan for a fit writing into `run_dir` (its log folder) and `ckpt_dirs`; see the module."""
    lasts = [folder / "last.ckpt" for folder in ckpt_dirs if (folder / "last.ckpt").is_file()]
    log = run_dir / "metrics.csv"
    if ckpt_path is not None and not (ckpt_path == "last" and not lasts):
        return ResumePlan(str(ckpt_path))
    if ckpt_path is None and lasts:
        return ResumePlan(str(lasts[0]), f"resuming from {lasts[0]} (this run folder holds an earlier run; "
                                         f"train into a new folder to start again from step 0)")
    # From here on there is no last.ckpt: `--ckpt_path last` (a study's first attempt, or one killed before
    # its first checkpoint) is a start from step 0, under the same rules as no --ckpt_path.
    earlier = [run_dir / name for name in EARLIER_RUN_FILES if (run_dir / name).is_file()]
    earlier += [path for folder in ckpt_dirs if folder.is_dir() for path in sorted(folder.glob("*.ckpt"))]
    if earlier:
        shown = ", ".join(str(path) for path in earlier[:4]) + (" ..." if len(earlier) > 4 else "")
        raise EarlierRunError(
            f"{run_dir} already holds an earlier run ({shown}) and no last.ckpt to resume from; a new run would "
            f"overwrite it. Train into a new folder (--trainer.logger.init_args.save_dir <new folder>), continue "
            f"from one of its checkpoints with --ckpt_path <file>, or delete {run_dir} to start it again")
    return ResumePlan(None, set_aside=log if log.is_file() else None)


def set_aside(path: Path, tag: str) -> Path:
    """Rename `path` to the first free `<stem>.<tag>-<n><suffix>` beside it (an earlier run's file kept, not
    overwritten); returns the new path."""
    n = 1
    while (target := path.with_name(f"{path.stem}.{tag}-{n}{path.suffix}")).exists():
        n += 1
    path.rename(target)
    return target
