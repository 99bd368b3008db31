"""`python -m study run --config configs/study/<name>.yaml`: a whole study in one command.

For each run of the study (the baseline, a rho sweep, a frozen table, a constant gate, ...) it trains the
AR model (or takes a finished one), samples, evaluates the samples, runs the memory probes on held-out
tokens, and finally writes the report. Every step whose output already exists is skipped, so a study
that was interrupted (or extended with a new run) picks up where it stopped; an interrupted training
resumes from its `last.ckpt`. Layout under the study directory `out`:

    ar/<run>/            the Lightning run (metrics.json, checkpoints/, model/)
    samples/<run>/       samples, their metrics.json (and metrics_vs_reconstructions.json)
    probes/<run>/        metrics.json of the probes (and gate_<g>/ samples when `gate_samples` > 0)
    reconstructions/     the tokenizer's reconstructions of the real images, the second FID reference
    study.json           what the report reads: each run's counts and result files, per seed

A run trained with several `seeds` has one folder per seed, `<run>/seed_<s>`, under ar/, samples/ and
probes/; the report takes the mean over seeds with an interval.
    report.md, figures/  the report (`study/report.py`)

The probes themselves are `engram_vision/probes.py`, sampling `sample/`, metrics `metrics/evaluate.py`.
The runner is one process: train multi-GPU runs with `python -m train ar fit` (any strategy) and list
them here under `model:`; sampling and evaluation use the devices their configs name.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from engram_vision.budget import count_parameters
from engram_vision.probes import ProbeConfig, run_probes
from metrics.evaluate import EvaluateConfig
from study.reconstructions import ReconstructionStep, reconstruct_reference
from tokenizers_vq.files import CONFIG_NAME, WEIGHTS_NAME, atomic_write_text, file_sha256


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
class SampleStep:
    """How each run is sampled: a `python -m sample` YAML plus overrides (model and out are set here)."""

    config: str
    """configs/sample/*.yaml (tokenizer, sample count, CFG, devices)."""
    args: list[str] = field(default_factory=list)
    """Extra `python -m sample` arguments, e.g. ["--num_samples=1000"]."""


@dataclass(frozen=True)
class ProbeStep:
    """The memory probes on held-out token shards: which data, where they run, and the `ProbeConfig` that
    `engram_vision.probes.run_probes` takes (nested as `settings`)."""

    tokens: str
    """Held-out token shards (python -m train.prepare tokens --split val)."""
    images_per_class: int | None = 20
    """Class-balanced subset: the first k held-out images of each class (None: all)."""
    pool: str | None = None
    """Token shards donors are drawn from (None: the held-out images themselves)."""
    pool_per_class: int | None = None
    """Class-balanced subset of the donor pool (None: all of it)."""
    accelerator: str = "auto"
    """Where the probes run (one device): auto (a GPU when there is one), cpu, gpu/cuda or mps."""
    gate_samples: int = 0
    """When > 0: also sample this many images at each clamped gate and evaluate them (FID per gate)."""
    settings: ProbeConfig = ProbeConfig()
    """Gates, donor kinds, interventions, batch size, resampling and seed of the probes."""


def _log(message: str) -> None:
    print(f"[study] {message}", flush=True)


def _relative(path: Path, out: Path) -> str:
    try:
        return str(path.resolve().relative_to(out.resolve()))
    except ValueError:
        return str(path.resolve())


@dataclass(frozen=True)
class Member:
    """One trained model of a run: the run itself, or one of its seeds."""

    run: StudyRun
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


def train_run(member: Member, out: Path) -> Path:
    """The member's model: trained with LightningCLI unless its export exists (resuming from last.ckpt)."""
    run = member.run
    if run.model is not None:
        if not Path(run.model).exists():
            raise FileNotFoundError(f"study run {run.name!r}: model {run.model} does not exist")
        return Path(run.model)
    run_dir = out / "ar" / member.folder
    model_dir = run_dir / "model"
    if (model_dir / WEIGHTS_NAME).is_file():
        _log(f"{member.label}: trained model found at {model_dir}, skipping training")
        return model_dir
    from train.cli import run_stage

    args = ["fit", "--config", run.config, "--trainer.logger.init_args.save_dir", str(run_dir), *run.train_args]
    if member.seed is not None:
        args.append(f"--seed_everything={member.seed}")
    if (run_dir / "checkpoints" / "last.ckpt").is_file():
        _log(f"{member.label}: resuming training from {run_dir / 'checkpoints' / 'last.ckpt'}")
        args += ["--ckpt_path", "last"]
    else:
        _log(f"{member.label}: training with {run.config}")
    run_stage("ar", args)
    if not (model_dir / WEIGHTS_NAME).is_file():
        raise RuntimeError(f"study run {run.name!r}: training finished without exporting {model_dir}; does "
                           f"{run.config} list the train.callbacks.ExportModel callback?")
    return model_dir


def sample_job(args: list[str]) -> dict[str, Any]:
    """`sample.job.sample_images` with `args` parsed exactly as `python -m sample` parses them (a sample
    YAML via `--config`, then overrides), so a study samples with the very files the sampling command takes."""
    from jsonargparse import auto_cli

    from sample.job import sample_images

    return auto_cli(sample_images, args=args, as_positional=False)


def _samples_complete(samples_dir: Path) -> bool:
    manifest = samples_dir / "manifest.json"
    return (samples_dir / "samples.npz").is_file() and manifest.is_file() and \
        bool(json.loads(manifest.read_text()).get("complete"))


def evaluate_once(step: EvaluateConfig, samples: Path, out: Path, label: str) -> Path:
    """`out` (a metrics.json) for `samples` scored with `step`, unless it exists."""
    if out.is_file():
        _log(f"{label}: {out} exists, skipping evaluation")
        return out
    from metrics.evaluate import evaluate

    _log(f"{label}: evaluating {samples} against {step.reference}")
    evaluate(replace(step, samples=str(samples), out=str(out)))
    return out


def sample_and_evaluate(model: Path, label: str, samples_dir: Path, sample: SampleStep,
                        evaluate_step: EvaluateConfig | None, extra_args: tuple[str, ...] = (),
                        model_size: str | None = None) -> Path | None:
    """Samples in samples_dir, then their metrics.json (None without an evaluate step); each step is
    skipped when its output exists."""
    metrics_path = samples_dir / "metrics.json"
    if _samples_complete(samples_dir):
        _log(f"{label}: samples in {samples_dir} are complete, skipping sampling")
    else:
        args = ["--config", sample.config, "--model", str(model), "--out", str(samples_dir), *sample.args,
                *extra_args]
        if model_size:
            args += ["--model_size", model_size]
        _log(f"{label}: sampling into {samples_dir}")
        sample_job(args)  # resumes an interrupted run by itself
    if evaluate_step is None:
        return None
    return evaluate_once(evaluate_step, samples_dir, metrics_path, label)


def _load_model(model: Path, size: str | None, device: str) -> Any:
    from engram_vision.checkpoint import load_any_gpt

    return load_any_gpt(model, size).to(device)


def _gate_samples(gpt: Any, member: Member, probe_dir: Path, out: Path, step: ProbeStep, sample: SampleStep,
                  evaluate_step: EvaluateConfig | None) -> list[dict[str, Any]]:
    """Samples of the model with each clamped gate (a saved copy per gate), evaluated like the runs."""
    from engram_vision.checkpoint import save_gpt
    from engram_vision.interventions import with_gate

    entries = []
    for gate in step.settings.gates:
        gate_dir = probe_dir / f"gate_{float(gate):g}"
        if not (gate_dir / "model" / WEIGHTS_NAME).is_file():
            save_gpt(with_gate(gpt, float(gate)).cpu(), gate_dir / "model")
        metrics = sample_and_evaluate(gate_dir / "model", f"{member.label} (gate {float(gate):g})",
                                      gate_dir / "samples", sample, evaluate_step,
                                      (f"--num_samples={step.gate_samples}",))
        entries.append({"gate": float(gate), "metrics": None if metrics is None else _relative(metrics, out),
                        "samples": _relative(gate_dir / "samples" / "samples.npz", out)})
    return entries


def probe_run(model: Path, member: Member, out: Path, step: ProbeStep, sample: SampleStep | None,
              evaluate_step: EvaluateConfig | None) -> Path:
    """probes/<member>/metrics.json, recomputed only when missing or made with other settings."""
    from train.data.tokens import read_token_set

    run = member.run
    probe_dir = out / "probes" / member.folder
    metrics_path = probe_dir / "metrics.json"
    weights = model / WEIGHTS_NAME if model.is_dir() else model
    # as JSON reads it back (tuples become lists), so the comparison with a finished run is like for like
    settings = json.loads(json.dumps({**asdict(step), "model": str(model), "model_sha256": file_sha256(weights)}))
    if metrics_path.is_file() and json.loads(metrics_path.read_text()).get("study_settings") == settings:
        _log(f"{member.label}: {metrics_path} exists, skipping the probes")
        return metrics_path
    from metrics.features import accelerator_device

    gpt = _load_model(model, run.model_size, accelerator_device(step.accelerator))
    tokens, labels = read_token_set(step.tokens, step.images_per_class)
    pool_tokens = pool_labels = None
    if step.pool is not None:
        pool_tokens, pool_labels = read_token_set(step.pool, step.pool_per_class)
    _log(f"{member.label}: probing on {len(labels)} held-out images from {step.tokens}")
    started = time.perf_counter()
    result = run_probes(gpt, tokens, labels, step.settings, pool_tokens, pool_labels)
    result.update(run=run.name, seed=member.seed, data={"tokens": step.tokens, "num_images": int(len(labels)),
                                      "positions_per_image": int(tokens.shape[1])},
                  model={"path": str(model), "sha256": settings["model_sha256"]}, study_settings=settings,
                  seconds=round(time.perf_counter() - started, 2))
    if step.gate_samples > 0 and gpt.config.engram is not None and sample is not None:
        result["gate_samples"] = _gate_samples(gpt, member, probe_dir, out, step, sample, evaluate_step)
    atomic_write_text(metrics_path, json.dumps(result, indent=2, allow_nan=False) + "\n")
    return metrics_path


def _model_config(model: Path, size: str | None) -> Any:
    from engram_vision.config import ModelConfig, model_config

    if model.is_dir():
        return ModelConfig(**json.loads((model / CONFIG_NAME).read_text())["config"])
    return model_config(size or "gpt-b")


RESULT_KEYS = ("train_metrics", "sample_metrics", "reconstruction_metrics", "samples", "probe_metrics")


def run_entry(run: StudyRun, model: Path | None, out: Path, seeds: list[dict[str, Any]]) -> dict[str, Any]:
    """The run's line in study.json: counts, Engram settings, and per seed the result files relative to
    `out`; the first seed's files are repeated at the top level for readers of a single-seed study."""
    entry: dict[str, Any] = {"name": run.name, "rho": None, "params": None, "engram": None}
    if model is not None:
        config = _model_config(model, run.model_size)
        counts = count_parameters(config)
        entry.update(rho=counts.rho, params={"backbone": counts.backbone, "memory": counts.memory,
                                             "total": counts.total},
                     engram=None if config.engram is None else {"gate": config.engram.gate,
                                                                 "table": config.engram.table},
                     model=str(model))
    entry.update({key: seeds[0].get(key) for key in RESULT_KEYS})
    entry["seeds"] = seeds
    return entry


def run_member(member: Member, study_dir: Path, sample: SampleStep | None, evaluate: EvaluateConfig | None,
               probes: ProbeStep | None, reconstructions: Path | None) -> tuple[Path, dict[str, Any]]:
    """Train, sample, evaluate and probe one model; (its model path, its per-seed entry of study.json)."""
    run = member.run
    model = train_run(member, study_dir)
    train_metrics = study_dir / "ar" / member.folder / "metrics.json"
    results: dict[str, Path | None] = {key: None for key in RESULT_KEYS}
    results["train_metrics"] = train_metrics if train_metrics.is_file() else None
    if sample is not None:
        samples_dir = study_dir / "samples" / member.folder
        seed_args = () if member.seed is None else (f"--seed={member.seed}",)
        results["sample_metrics"] = sample_and_evaluate(model, member.label, samples_dir, sample, evaluate,
                                                        seed_args, model_size=run.model_size)
        results["samples"] = samples_dir / "samples.npz"
        if evaluate is not None and reconstructions is not None:
            results["reconstruction_metrics"] = evaluate_once(
                replace(evaluate, reference=str(reconstructions)), samples_dir,
                samples_dir / "metrics_vs_reconstructions.json", f"{member.label} (vs reconstructions)")
    if probes is not None:
        results["probe_metrics"] = probe_run(model, member, study_dir, probes, sample, evaluate)
    paths = {key: None if path is None else _relative(path, study_dir) for key, path in results.items()}
    return model, {"seed": member.seed, "model": str(model), **paths}


def reconstruction_reference(step: ReconstructionStep, evaluate: EvaluateConfig | None,
                             study_dir: Path) -> tuple[Path, Path | None]:
    """(the reconstructions' samples.npz, their metrics.json against the real reference or None)."""
    if step.images is None and evaluate is None:
        raise ValueError("study reconstructions: set `reconstructions.images`, or an `evaluate.reference` "
                         "holding images, to say which real images the tokenizer rebuilds")
    images = step.images or evaluate.reference
    folder = study_dir / "reconstructions"
    _log(f"reconstructions: {images} through {step.tokenizer} into {folder}")
    samples = reconstruct_reference(step, images, folder)
    if evaluate is None:
        return samples, None
    # the tokenizer's floor: reconstructions scored like samples, against the real images
    return samples, evaluate_once(replace(evaluate, metrics=_without_acc(evaluate.metrics)), folder,
                                  folder / "metrics.json", "reconstructions")


def _without_acc(metrics: str) -> str:
    # reconstructions carry no labels, so class accuracy is not theirs to report
    return ",".join(m.strip() for m in metrics.split(",") if m.strip() and m.strip() != "acc")


def study(name: str, runs: list[StudyRun], out: str | None = None, baseline: str = "baseline",
          seeds: list[int] | None = None, sample: SampleStep | None = None, evaluate: EvaluateConfig | None = None,
          reconstructions: ReconstructionStep | None = None, probes: ProbeStep | None = None,
          report: bool = True, only: list[str] | None = None, command: str | None = None) -> Path:
    """Train, sample, evaluate and probe every run (skipping finished steps); write study.json and report.md.

    Args:
        name: The study's name; its directory is `out` (default runs/<name>).
        runs: The models, e.g. the baseline, a rho sweep, a frozen table and a constant gate.
        out: Study directory.
        baseline: The run the report compares every other run with.
        seeds: Training seeds of every trained run without its own `seeds` (None: one model per run).
        sample: How each run is sampled (None: no sampling).
        evaluate: How samples are scored (None: not scored).
        reconstructions: The tokenizer's reconstructions of the real images as a second reference: scored
            against the real images and used to score every run's samples again (None: real images only).
        probes: The memory probes on held-out tokens (None: no probes).
        report: Write report.md and figures at the end.
        only: Run names to process this time (others keep their existing results in study.json).
        command: How the study was run, shown in the report (the command line fills it in).
    Returns the path of report.md (or study.json when `report` is off).
    """
    names = [run.name for run in runs]
    if len(set(names)) != len(names):
        raise ValueError(f"study {name!r}: run names must be unique, got {names}")
    if baseline not in names:
        raise ValueError(f"study {name!r}: baseline {baseline!r} is not one of the runs {names}")
    unknown = sorted(set(only or []) - set(names))
    if unknown:
        raise ValueError(f"study {name!r}: --only names unknown runs {unknown}; runs are {names}")
    check_seeds(seeds, f"study {name!r}")
    study_dir = Path(out or f"runs/{name}")
    study_dir.mkdir(parents=True, exist_ok=True)
    index_path = study_dir / "study.json"
    previous = json.loads(index_path.read_text()) if index_path.is_file() else {}
    entries = {entry["name"]: entry for entry in previous.get("runs", [])}
    index: dict[str, Any] = {"name": name, "command": command or "study.runner.study(...)", "baseline": baseline,
                             "reconstructions": previous.get("reconstructions")}
    recon_samples = None
    if reconstructions is not None:
        recon_samples, recon_metrics = reconstruction_reference(reconstructions, evaluate, study_dir)
        index["reconstructions"] = {"samples": _relative(recon_samples, study_dir),
                                    "metrics": None if recon_metrics is None else _relative(recon_metrics, study_dir)}
    for run in runs:
        if only and run.name not in only:
            continue
        done = [run_member(member, study_dir, sample, evaluate, probes, recon_samples)
                for member in members(run, seeds)]
        entries[run.name] = run_entry(run, done[0][0], study_dir, [entry for _, entry in done])
        # Written after every run, so an interrupted study still reports what it finished.
        index["runs"] = [entries[n] for n in names if n in entries]
        atomic_write_text(index_path, json.dumps(index, indent=2) + "\n")
    if not report:
        return index_path
    from study.report import build_report

    path = build_report(study_dir)
    _log(f"report: {path}")
    return path


__all__ = ["Member", "ProbeStep", "SampleStep", "StudyRun", "study"]
