"""`PeriodicCheckpoint`: a checkpoint every N optimizer steps, with a retention policy, for long runs.

An epoch of ImageNet takes hours; a checkpoint written only at epoch end loses the epoch to a crash, and
a single `last.ckpt` gives no FID-against-steps curve. This is Lightning's ModelCheckpoint with the
settings such a run wants fixed: every `every_n_steps` steps (LlamaGen: 5000) it writes
`step_XXXXXXX.ckpt` and `last.ckpt`, and once training ends a final one, so a rerun resumes exactly where
training stopped. It keeps the newest `keep_last` step files plus every `keep_every_nth`-th one (step a
multiple of keep_every_nth x every_n_steps) for `python -m study curve`; the others are deleted once a newer
one is safely written. Writes are atomic (`train.checkpoints.AtomicCheckpointIO`); a checkpoint saved
mid-epoch resumes at the right batch when the data module restores its position (the token data module
does). Checkpoint contents and resuming are Lightning's.
"""

from __future__ import annotations

import re
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

STEP_FILE = re.compile(r"^step_(\d+)\.ckpt$")


def kept_steps(steps: list[int], every_n_steps: int, keep_last: int, keep_every_nth: int | None) -> set[int]:
    """The steps whose checkpoints the policy keeps: the newest `keep_last`, plus every step that is a
    multiple of `keep_every_nth` x `every_n_steps` (when keep_every_nth is set)."""
    ordered = sorted(set(steps))
    kept = set(ordered[-keep_last:]) if keep_last > 0 else set()
    if keep_every_nth:
        kept |= {step for step in ordered if step % (keep_every_nth * every_n_steps) == 0}
    return kept


class PeriodicCheckpoint(ModelCheckpoint):
    """Checkpoints every `every_n_steps` steps and at the end of training, pruned by a retention policy.

    Args:
        every_n_steps: optimizer steps between checkpoints (LlamaGen saves every 5000).
        keep_last: how many of the newest step checkpoints to keep (>= 1).
        keep_every_nth: also keep every n-th checkpoint for good (a curve of FID against steps); None: keep
            only the newest.
        dirpath: where to write; default `<run folder>/checkpoints`, as Lightning resolves it.
    """

    def __init__(self, every_n_steps: int = 5000, keep_last: int = 2, keep_every_nth: int | None = None,
                 dirpath: str | None = None):
        if every_n_steps < 1 or keep_last < 1 or (keep_every_nth is not None and keep_every_nth < 1):
            raise ValueError(f"PeriodicCheckpoint: need every_n_steps >= 1, keep_last >= 1 and keep_every_nth "
                             f"None or >= 1; got {every_n_steps}, {keep_last}, {keep_every_nth}")
        super().__init__(dirpath=dirpath, filename="step_{step:07d}", auto_insert_metric_name=False,
                         every_n_train_steps=every_n_steps, save_top_k=-1, save_last=True, monitor=None,
                         enable_version_counter=False)
        self.every_n_steps, self.keep_last, self.keep_every_nth = every_n_steps, keep_last, keep_every_nth

    @property
    def state_key(self) -> str:
        # Its own key in the checkpoint's callback states, apart from any other ModelCheckpoint of the run.
        return self._generate_state_key(every_n_steps=self.every_n_steps, kind="periodic")

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        if STEP_FILE.match(Path(filepath).name):
            self._prune(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The final state as a step file and last.ckpt, unless this step was just saved: a rerun of a finished
        # run then resumes at its end instead of training the steps since the last periodic save again.
        if trainer.global_step > self._last_global_step_saved and not trainer.sanity_checking:
            candidates = self._monitor_candidates(trainer)
            self._save_checkpoint(trainer, self.format_checkpoint_name(candidates))
            self._save_last_checkpoint(trainer, candidates)

    def step_files(self) -> dict[int, Path]:
        """step -> checkpoint path of the step files in `dirpath` (after setup)."""
        folder = Path(self.dirpath) if self.dirpath else None
        if folder is None or not folder.is_dir():
            return {}
        return {int(match.group(1)): path for path in folder.iterdir() if (match := STEP_FILE.match(path.name))}

    def _prune(self, trainer: L.Trainer) -> None:
        files = self.step_files()
        keep = kept_steps(list(files), self.every_n_steps, self.keep_last, self.keep_every_nth)
        for step, path in sorted(files.items()):
            if step not in keep:
                trainer.strategy.remove_checkpoint(path)  # rank zero only; a sharded checkpoint is a folder
