"""`python -m study run --config configs/study/<name>.yaml`: a whole study in one command.

For each run of the study (the baseline, a rho sweep, a frozen table, a constant gate, ...) it trains the
AR model (or takes a finished one), samples, evaluates the samples, runs the memory probes on held-out
tokens, and finally writes the report. Every step whose output already exists is skipped, so a study
that was interrupted (or extended with a new run) picks up where it stopped; an interrupted training
resumes from its `last.ckpt`. Layout under the study directory `out`:

    ar/<run>/            the Lightning run (metrics.json, checkpoints/, model/)
    samples/<run>/       samples and their metrics.json
    probes/<run>/        metrics.json of the probes (and gate_<g>/ samples when `gate_samples` > 0)
    study.json           what the report reads: each run's counts and result files
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
from tokenizers_vq.files import CONFIG_NAME, WEIGHTS_NAME, atomic_write_text, file_sha256


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

    def __post_init__(self) -> None:
        if (self.config is None) == (self.model is None):
            raise ValueError(f"study run {self.name!r}: set exactly one of `config` (train it) and `model` "
                             f"(a finished model)")
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


def train_run(run: StudyRun, out: Path) -> Path:
    """The run's model: trained with LightningCLI unless its export exists (resuming from last.ckpt)."""
    if run.model is not None:
        if not Path(run.model).exists():
            raise FileNotFoundError(f"study run {run.name!r}: model {run.model} does not exist")
        return Path(run.model)
    run_dir = out / "ar" / run.name
    model_dir = run_dir / "model"
    if (model_dir / WEIGHTS_NAME).is_file():
        _log(f"{run.name}: trained model found at {model_dir}, skipping training")
        return model_dir
    from train.cli import run_stage

    args = ["fit", "--config", run.config, "--trainer.logger.init_args.save_dir", str(run_dir), *run.train_args]
    if (run_dir / "checkpoints" / "last.ckpt").is_file():
        _log(f"{run.name}: resuming training from {run_dir / 'checkpoints' / 'last.ckpt'}")
        args += ["--ckpt_path", "last"]
    else:
        _log(f"{run.name}: training with {run.config}")
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
    if metrics_path.is_file():
        _log(f"{label}: {metrics_path} exists, skipping evaluation")
        return metrics_path
    from metrics.evaluate import evaluate

    _log(f"{label}: evaluating {samples_dir}")
    evaluate(replace(evaluate_step, samples=str(samples_dir), out=str(metrics_path)))
    return metrics_path


def _load_model(model: Path, size: str | None, device: str) -> Any:
    from engram_vision.checkpoint import load_any_gpt

    return load_any_gpt(model, size).to(device)


def _gate_samples(gpt: Any, run: StudyRun, probe_dir: Path, out: Path, step: ProbeStep, sample: SampleStep,
                  evaluate_step: EvaluateConfig | None) -> list[dict[str, Any]]:
    """Samples of the model with each clamped gate (a saved copy per gate), evaluated like the runs."""
    from engram_vision.checkpoint import save_gpt
    from engram_vision.interventions import with_gate

    entries = []
    for gate in step.settings.gates:
        gate_dir = probe_dir / f"gate_{float(gate):g}"
        if not (gate_dir / "model" / WEIGHTS_NAME).is_file():
            save_gpt(with_gate(gpt, float(gate)).cpu(), gate_dir / "model")
        metrics = sample_and_evaluate(gate_dir / "model", f"{run.name} (gate {float(gate):g})",
                                      gate_dir / "samples", sample, evaluate_step,
                                      (f"--num_samples={step.gate_samples}",))
        entries.append({"gate": float(gate), "metrics": None if metrics is None else _relative(metrics, out),
                        "samples": _relative(gate_dir / "samples" / "samples.npz", out)})
    return entries


def probe_run(model: Path, run: StudyRun, out: Path, step: ProbeStep, sample: SampleStep | None,
              evaluate_step: EvaluateConfig | None) -> Path:
    """probes/<run>/metrics.json, recomputed only when missing or made with other settings."""
    from train.data.tokens import read_token_set

    probe_dir = out / "probes" / run.name
    metrics_path = probe_dir / "metrics.json"
    weights = model / WEIGHTS_NAME if model.is_dir() else model
    # as JSON reads it back (tuples become lists), so the comparison with a finished run is like for like
    settings = json.loads(json.dumps({**asdict(step), "model": str(model), "model_sha256": file_sha256(weights)}))
    if metrics_path.is_file() and json.loads(metrics_path.read_text()).get("study_settings") == settings:
        _log(f"{run.name}: {metrics_path} exists, skipping the probes")
        return metrics_path
    from metrics.features import accelerator_device

    gpt = _load_model(model, run.model_size, accelerator_device(step.accelerator))
    tokens, labels = read_token_set(step.tokens, step.images_per_class)
    pool_tokens = pool_labels = None
    if step.pool is not None:
        pool_tokens, pool_labels = read_token_set(step.pool, step.pool_per_class)
    _log(f"{run.name}: probing on {len(labels)} held-out images from {step.tokens}")
    started = time.perf_counter()
    result = run_probes(gpt, tokens, labels, step.settings, pool_tokens, pool_labels)
    result.update(run=run.name, data={"tokens": step.tokens, "num_images": int(len(labels)),
                                      "positions_per_image": int(tokens.shape[1])},
                  model={"path": str(model), "sha256": settings["model_sha256"]}, study_settings=settings,
                  seconds=round(time.perf_counter() - started, 2))
    if step.gate_samples > 0 and gpt.config.engram is not None and sample is not None:
        result["gate_samples"] = _gate_samples(gpt, run, probe_dir, out, step, sample, evaluate_step)
    atomic_write_text(metrics_path, json.dumps(result, indent=2, allow_nan=False) + "\n")
    return metrics_path


def _model_config(model: Path, size: str | None) -> Any:
    from engram_vision.config import ModelConfig, model_config

    if model.is_dir():
        return ModelConfig(**json.loads((model / CONFIG_NAME).read_text())["config"])
    return model_config(size or "gpt-b")


def run_entry(run: StudyRun, model: Path | None, out: Path, results: dict[str, Path | None]) -> dict[str, Any]:
    """The run's line in study.json: counts, Engram settings and result files relative to `out`."""
    entry: dict[str, Any] = {"name": run.name, "rho": None, "params": None, "engram": None}
    if model is not None:
        config = _model_config(model, run.model_size)
        counts = count_parameters(config)
        entry.update(rho=counts.rho, params={"backbone": counts.backbone, "memory": counts.memory,
                                             "total": counts.total},
                     engram=None if config.engram is None else {"gate": config.engram.gate,
                                                                 "table": config.engram.table},
                     model=str(model))
    for key, path in results.items():
        entry[key] = None if path is None else _relative(path, out)
    return entry


def study(name: str, runs: list[StudyRun], out: str | None = None, baseline: str = "baseline",
          sample: SampleStep | None = None, evaluate: EvaluateConfig | None = None,
          probes: ProbeStep | None = None, report: bool = True, only: list[str] | None = None,
          command: str | None = None) -> Path:
    """Train, sample, evaluate and probe every run (skipping finished steps); write study.json and report.md.

    Args:
        name: The study's name; its directory is `out` (default runs/<name>).
        runs: The models, e.g. the baseline, a rho sweep, a frozen table and a constant gate.
        out: Study directory.
        baseline: The run the report draws as the reference line.
        sample: How each run is sampled (None: no sampling).
        evaluate: How samples are scored (None: not scored).
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
    study_dir = Path(out or f"runs/{name}")
    study_dir.mkdir(parents=True, exist_ok=True)
    index_path = study_dir / "study.json"
    previous = json.loads(index_path.read_text()) if index_path.is_file() else {}
    entries = {entry["name"]: entry for entry in previous.get("runs", [])}
    for run in runs:
        if only and run.name not in only:
            continue
        model = train_run(run, study_dir)
        train_metrics = study_dir / "ar" / run.name / "metrics.json"
        results: dict[str, Path | None] = {"train_metrics": train_metrics if train_metrics.is_file() else None,
                                           "sample_metrics": None, "samples": None, "probe_metrics": None}
        if sample is not None:
            samples_dir = study_dir / "samples" / run.name
            results["sample_metrics"] = sample_and_evaluate(model, run.name, samples_dir, sample, evaluate,
                                                            model_size=run.model_size)
            results["samples"] = samples_dir / "samples.npz"
        if probes is not None:
            results["probe_metrics"] = probe_run(model, run, study_dir, probes, sample, evaluate)
        entries[run.name] = run_entry(run, model, study_dir, results)
        # Written after every run, so an interrupted study still reports what it finished.
        index = {"name": name, "command": command or "study.runner.study(...)",
                 "baseline": baseline, "runs": [entries[n] for n in names if n in entries]}
        atomic_write_text(index_path, json.dumps(index, indent=2) + "\n")
    if not report:
        return index_path
    from study.report import build_report

    path = build_report(study_dir)
    _log(f"report: {path}")
    return path


__all__ = ["ProbeStep", "SampleStep", "StudyRun", "study"]
