"""A CSV logger that keeps an earlier run's `metrics.csv` when a run resumes.

Lightning's CSVLogger deletes `<log_dir>/metrics.csv` whenever the folder is not empty, so resuming a run
into its own folder (`--ckpt_path last`) loses the log of every step before the resume. `AppendingCSVLogger`
keeps the file and appends to it; `forget_after(step)` drops the rows at and after the step a resumed
checkpoint was saved at (those steps are trained again and logged anew), so the file reads like one
uninterrupted run. `train/cli.py` turns every plain Lightning CSVLogger of a Trainer into this class, so a
YAML that names `lightning.pytorch.loggers.CSVLogger` gets it too. Whether a folder may be resumed into at
all is `train/resume.py`'s decision, not the logger's.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from tokenizers_vq.files import atomic_write_text


def _read_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


def _rows_text(fieldnames: list[str], rows: list[dict[str, str]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fieldnames)
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


class AppendingExperimentWriter(ExperimentWriter):
    """Lightning's writer, except that an existing `metrics.csv` is kept and its columns carried on."""

    def _check_log_dir_exists(self) -> None:
        # Lightning's version removes metrics.csv here; the file's header seeds the known columns instead,
        # so the first save appends (or rewrites with a wider header) without dropping old columns.
        path = Path(self.metrics_file_path)
        if path.is_file() and path.stat().st_size:
            self.metrics_keys = sorted(_read_rows(path)[0])

    def forget_after(self, step: int) -> int:
        """Drop the saved rows whose `step` is >= `step`; returns how many were dropped."""
        self.save()
        path = Path(self.metrics_file_path)
        if not path.is_file() or not path.stat().st_size:
            return 0
        fieldnames, rows = _read_rows(path)
        kept = [row for row in rows if not row.get("step") or int(float(row["step"])) < step]
        if len(kept) != len(rows):
            atomic_write_text(path, _rows_text(fieldnames, kept))
        return len(rows) - len(kept)


class AppendingCSVLogger(CSVLogger):
    """Lightning's CSVLogger (same arguments) whose `metrics.csv` survives a resume (see the module)."""

    @property
    def experiment(self) -> AppendingExperimentWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = AppendingExperimentWriter(log_dir=self.log_dir)
        return self._experiment

    def forget_after(self, step: int) -> int:
        """Drop the logged rows of steps >= `step` (a resume from a checkpoint saved at `step`)."""
        return self.experiment.forget_after(step)


def keep_csv_logs(loggers: list) -> None:
    """Make every plain Lightning CSVLogger in `loggers` an AppendingCSVLogger (same state, same arguments),
    before it has opened its file."""
    for logger in loggers:
        if type(logger) is CSVLogger and logger._experiment is None:
            logger.__class__ = AppendingCSVLogger  # a subclass that adds no state: the swap is safe
