"""The models a study trains or takes: `StudyRun` (one entry of the study YAML's `runs:`), its seeds, and
`Member` (one trained model: the run itself or one of its seeds) with the folder its results go to.

What is done with each member (train, sample, evaluate, probe) is `study/runner.py`'s business.
"""

from __future__ import annotations

from dataclasses import dataclass, field


def check_seeds(seeds: list[int] | None, where: str) -> None:
    """Seeds name folders and must each train another model: distinct, non-negative, at least one."""
    if seeds is not None and (not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0):
        raise ValueError(f"{where}: seeds must be a non-empty list of distinct non-negative integers, got {seeds}")


@dataclass(frozen=True)
class StudyRun:
    """One model of the study: trained from `config`, or a finished `model`."""

    name: str
    """Folder name under ar/, samples/ and probes/, and the label in the report."""
    config: str | None = None
    """AR training YAML (`python -m train ar fit --config ...`); trained into <out>/ar/<name>."""
    model: str | None = None
    """A finished model instead: our exported directory or a LlamaGen c2i `.pt`."""
    model_size: str | None = None
    """Named config of a LlamaGen `.pt` (e.g. gpt-b)."""
    train_args: list[str] = field(default_factory=list)
    """Extra LightningCLI arguments for training (e.g. ["--trainer.max_steps=1000"])."""
    seeds: list[int] | None = None
    """Training seeds: each seed trains (`--seed_everything`), samples (`--seed`) and is probed in its own
    folder `<run>/seed_<s>`, and the report gives the mean over seeds with an interval. None: the study's
    `seeds`, or a single run with the seeds its configs name."""

    def __post_init__(self) -> None:
        if (self.config is None) == (self.model is None):
            raise ValueError(f"study run {self.name!r}: set exactly one of `config` (train it) and `model` "
                             f"(a finished model)")
        if self.seeds is not None and self.model is not None:
            raise ValueError(f"study run {self.name!r}: `seeds` retrain a run, but `model` names a finished "
                             f"one; drop `seeds` or train from a `config`")
        check_seeds(self.seeds, f"study run {self.name!r}")
        if not self.name or "/" in self.name:
            raise ValueError(f"study run name {self.name!r} must be a non-empty folder name")


@dataclass(frozen=True)
class Member:
    """One trained model of a run: the run itself, or one of its seeds."""

    run: StudyRun
    """The study run this model belongs to."""
    seed: int | None
    """The training seed (None: the seed the run's configs name)."""

    @property
    def folder(self) -> str:
        """Folder under ar/, samples/ and probes/: `<run>` or `<run>/seed_<s>`."""
        return self.run.name if self.seed is None else f"{self.run.name}/seed_{self.seed}"

    @property
    def label(self) -> str:
        return self.folder


def members(run: StudyRun, study_seeds: list[int] | None) -> list[Member]:
    """The models a run stands for: one per seed (its own `seeds`, else the study's for trained runs)."""
    seeds = run.seeds if run.seeds is not None else (study_seeds if run.model is None else None)
    return [Member(run, None)] if seeds is None else [Member(run, seed) for seed in seeds]


__all__ = ["Member", "StudyRun", "check_seeds", "members"]
