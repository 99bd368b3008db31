"""`python -m study run --config configs/study/<name>.yaml`: a whole study in one command.

For each run of the study (the baseline, a rho sweep, a frozen table, a constant gate, ...) it trains the
AR model (or takes a finished one), samples, evaluates the samples, runs the memory probes on held-out
tokens, and finally writes the report. Layout under the study directory `out`:

    ar/<run>/            the Lightning run (metrics.json, checkpoints/, model/)
    samples/<run>/       samples, their metrics.json (and metrics_vs_reconstructions.json)
    probes/<run>/        metrics.json of the probes (and gate_<g>/ samples when `gate_samples` > 0)
    reconstructions/     the tokenizer's reconstructions of the real images, the second FID reference
    study.json           what the report reads: each run's counts and result files, per seed
    replaced/<time>/     outputs of steps redone with `rerun_changed` after their settings changed

A run trained with several `seeds` has one folder per seed, `<run>/seed_<s>`, under ar/, samples/ and
probes/; the report takes the mean over seeds with an interval.
    report.md, figures/  the report (`study/report.py`)

Every step records the settings it ran with beside its output (`study_<step>.json`, `study/steps.py`),
and marks itself complete after its last file. A rerun skips the finished steps, runs the interrupted
ones again (training resumes from `last.ckpt` with `--ckpt_path last`, sampling samples the missing
batches), and refuses, before any work and naming every differing setting, when a finished step was made
with other settings than the study names now; `rerun_changed` redoes those steps instead, moving their
old outputs to `replaced/<time>/`. So a study that was killed, or extended with a new run, picks up
where it stopped, and a changed study never reports old numbers as new ones.

The probes themselves are `engram_vision/probes.py`, sampling `sample/`, metrics `metrics/evaluate.py`.
The runner is one process: train multi-GPU runs with `python -m train ar fit` (any strategy) and list
them here under `model:`; sampling and evaluation use the devices their configs name.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from engram_vision.budget import count_parameters
from engram_vision.probes import ProbeConfig, run_probes
from metrics.evaluate import EvaluateConfig
from study.members import Member, StudyRun, check_seeds, members
from study.reconstructions import ReconstructionStep, reconstruct_reference, reconstruction_settings
from study.step_settings import (
    evaluate_settings,
    probe_settings,
    sample_kwargs,
    sample_settings,
    train_settings,
)
from study.steps import Ledger, NotDone, StaleResultsError, settings_digest, stale_message
from study.token_checks import check_probe_tokens
from tokenizers_vq.files import atomic_write_text
from tokenizers_vq.model_dir import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    model_dir_complete,
    model_dir_problem,
    read_model_config,
)


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


def _skipped(ledger: Ledger, message: str) -> None:
    if not ledger.dry:  # the look before the work says nothing; the work says what it skips
        _log(message)


def _relative(path: Path, out: Path) -> str:
    try:
        return str(path.resolve().relative_to(out.resolve()))
    except ValueError:
        return str(path.resolve())


def train_run(member: Member, out: Path, ledger: Ledger) -> Path:
    """The member's model: trained with LightningCLI unless its training step finished with today's
    settings (an interrupted one resumes from last.ckpt)."""
    run = member.run
    if run.model is not None:
        if not Path(run.model).exists():
            raise FileNotFoundError(f"study run {run.name!r}: model {run.model} does not exist")
        return Path(run.model)
    run_dir = out / "ar" / member.folder
    model_dir = run_dir / "model"
    settings = train_settings(member)
    if ledger.done(run_dir, "train", settings, owned=(".",)):
        _skipped(ledger, f"{member.label}: trained model found at {model_dir}, skipping training")
        return model_dir
    from train.cli import run_stage

    ledger.start(run_dir, "train", settings)
    args = ["fit", "--config", run.config, "--trainer.logger.init_args.save_dir", str(run_dir), *run.train_args]
    if member.seed is not None:
        args.append(f"--seed_everything={member.seed}")
    last = run_dir / "checkpoints" / "last.ckpt"
    if last.is_file():
        # explicit, whatever the training command does by default with a folder that holds last.ckpt
        _log(f"{member.label}: resuming training from {last}")
        args += ["--ckpt_path", "last"]
    else:
        _log(f"{member.label}: training with {run.config}")
    run_stage("ar", args)
    if not model_dir_complete(model_dir):
        raise RuntimeError(f"study run {run.name!r}: training finished without exporting {model_dir} "
                           f"({model_dir_problem(model_dir)}); does {run.config} list the "
                           f"train.callbacks.ExportModel callback?")
    outputs: dict[str, str | None] = {f"model/{WEIGHTS_NAME}": ledger.file_hash(model_dir / WEIGHTS_NAME),
                                      f"model/{CONFIG_NAME}": None}
    if (run_dir / "metrics.json").is_file():
        outputs["metrics.json"] = None
    ledger.finish(run_dir, "train", settings, outputs)
    return model_dir


def sample_job(kwargs: dict[str, Any]) -> dict[str, Any]:
    """`sample.job.sample_images(**kwargs)` (the arguments `sample_kwargs` parsed)."""
    from sample.job import sample_images

    return sample_images(**kwargs)


SAMPLE_OUTPUTS = ("images", "samples.npz", "manifest.json")


def sample_once(model: Path, label: str, samples_dir: Path, sample: SampleStep, ledger: Ledger,
                extra_args: tuple[str, ...] = (), model_size: str | None = None) -> str:
    """Samples in samples_dir unless that step finished with today's settings; returns its settings digest
    (what the evaluation of these samples records as its input)."""
    args = ["--config", sample.config, "--model", str(model), "--out", str(samples_dir), *sample.args, *extra_args]
    if model_size:
        args += ["--model_size", model_size]
    kwargs = sample_kwargs(args)
    settings = sample_settings(kwargs, ledger)
    if ledger.done(samples_dir, "sample", settings, owned=SAMPLE_OUTPUTS):
        _skipped(ledger, f"{label}: samples in {samples_dir} are complete, skipping sampling")
    else:
        ledger.start(samples_dir, "sample", settings)
        _log(f"{label}: sampling into {samples_dir}")
        sample_job(kwargs)  # resumes an interrupted run by itself
        ledger.finish(samples_dir, "sample", settings, {"samples.npz": None, "manifest.json": None})
    return settings_digest(settings)


def evaluate_once(step: EvaluateConfig, samples: Path, name: str, label: str, ledger: Ledger,
                  inputs: dict[str, Any], reference_sha256: str | None = None) -> Path:
    """`samples/<name>` (a metrics.json) for `samples` scored with `step`, unless that step finished with
    today's settings; `inputs` names the samples (the digest of the step that made them)."""
    out = samples / name
    step_name = name.removesuffix(".json").replace("metrics", "evaluate")
    settings = evaluate_settings(step, ledger, inputs, reference_sha256)
    if ledger.done(samples, step_name, settings, owned=(name,)):
        _skipped(ledger, f"{label}: {out} is up to date, skipping evaluation")
        return out
    from metrics.evaluate import evaluate

    ledger.start(samples, step_name, settings)
    _log(f"{label}: evaluating {samples} against {step.reference}")
    evaluate(replace(step, samples=str(samples), out=str(out)))
    ledger.finish(samples, step_name, settings, {name: None})
    return out


def sample_and_evaluate(model: Path, label: str, samples_dir: Path, sample: SampleStep,
                        evaluate_step: EvaluateConfig | None, ledger: Ledger, extra_args: tuple[str, ...] = (),
                        model_size: str | None = None) -> tuple[str, Path | None]:
    """Samples in samples_dir, then their metrics.json (None without an evaluate step); each step is
    skipped when it finished with today's settings. Returns (the samples' digest, the metrics path)."""
    digest = sample_once(model, label, samples_dir, sample, ledger, extra_args, model_size)
    if evaluate_step is None:
        return digest, None
    return digest, evaluate_once(evaluate_step, samples_dir, "metrics.json", label, ledger, {"samples": digest})


def _load_model(model: Path, size: str | None, device: str) -> Any:
    from engram_vision.checkpoint import load_any_gpt

    return load_any_gpt(model, size).to(device)


def _gate_samples(gpt: Any, member: Member, probe_dir: Path, out: Path, step: ProbeStep, sample: SampleStep,
                  evaluate_step: EvaluateConfig | None, ledger: Ledger) -> list[dict[str, Any]]:
    """Samples of the model with each clamped gate (a saved copy per gate), evaluated like the runs."""
    from engram_vision.checkpoint import save_gpt
    from engram_vision.interventions import with_gate

    entries = []
    for gate in step.settings.gates:
        gate_dir = probe_dir / f"gate_{float(gate):g}"
        # complete means every part, config.json last: a kill between them leaves weights without their config
        if not model_dir_complete(gate_dir / "model"):
            save_gpt(with_gate(gpt, float(gate)).cpu(), gate_dir / "model")
        _, metrics = sample_and_evaluate(gate_dir / "model", f"{member.label} (gate {float(gate):g})",
                                         gate_dir / "samples", sample, evaluate_step, ledger,
                                         (f"--num_samples={step.gate_samples}",))
        entries.append({"gate": float(gate), "metrics": None if metrics is None else _relative(metrics, out),
                        "samples": _relative(gate_dir / "samples" / "samples.npz", out)})
    return entries


def _gate_sampling(step: ProbeStep, sample: SampleStep | None, evaluate_step: EvaluateConfig | None,
                   ledger: Ledger) -> dict[str, Any] | None:
    """How the gate samples are made and scored (part of the probe step's settings), or None without them."""
    if step.gate_samples <= 0 or sample is None:
        return None
    kwargs = sample_kwargs(["--config", sample.config, "--model", "-", "--out", "-", *sample.args,
                            f"--num_samples={step.gate_samples}"])
    return {"sample": sample_settings(kwargs, ledger, with_model=False),
            "evaluate": None if evaluate_step is None else evaluate_settings(evaluate_step, ledger)}


def probe_run(model: Path, member: Member, out: Path, step: ProbeStep, sample: SampleStep | None,
              evaluate_step: EvaluateConfig | None, ledger: Ledger) -> Path:
    """probes/<member>/metrics.json, unless the probe step finished with today's settings."""
    from train.data.tokens import read_token_set

    run = member.run
    probe_dir = out / "probes" / member.folder
    metrics_path = probe_dir / "metrics.json"
    settings = probe_settings(step, model, ledger, _gate_sampling(step, sample, evaluate_step, ledger))
    if ledger.done(probe_dir, "probe", settings, owned=(".",)):
        _skipped(ledger, f"{member.label}: {metrics_path} is up to date, skipping the probes")
        return metrics_path
    from metrics.features import accelerator_device

    ledger.start(probe_dir, "probe", settings)
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
        result["gate_samples"] = _gate_samples(gpt, member, probe_dir, out, step, sample, evaluate_step, ledger)
    atomic_write_text(metrics_path, json.dumps(result, indent=2, allow_nan=False) + "\n")
    ledger.finish(probe_dir, "probe", settings, {"metrics.json": None})
    return metrics_path


def _model_config(model: Path, size: str | None) -> Any:
    from engram_vision.config import ModelConfig, model_config

    if model.is_dir():
        from engram_vision.checkpoint import KIND

        return read_model_config(model, KIND, ModelConfig)
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


@dataclass(frozen=True)
class Reconstructions:
    """The reconstruction reference as the runs' evaluation uses it."""

    samples: Path | None
    """reconstructions/samples.npz (None in a dry pass while the step is still to run)."""
    digest: str | None
    """The reconstruct step's settings digest: the reference's identity in the runs' evaluate records."""


def _looking(ledger: Ledger, step: Callable[[], Any]) -> Any:
    """`step()`; in a dry pass None when it (or a step it needs) is still to run, so that the steps beside it
    (the probes beside the samples, one score beside another) are still looked at."""
    try:
        return step()
    except NotDone:
        if not ledger.dry:
            raise
        return None


def run_member(member: Member, study_dir: Path, sample: SampleStep | None, evaluate: EvaluateConfig | None,
               probes: ProbeStep | None, reconstructions: Reconstructions | None,
               ledger: Ledger) -> tuple[Path, dict[str, Any]]:
    """Train, sample, evaluate and probe one model; (its model path, its per-seed entry of study.json)."""
    run = member.run
    model = train_run(member, study_dir, ledger)  # every later step needs the model
    train_metrics = study_dir / "ar" / member.folder / "metrics.json"
    results: dict[str, Path | None] = {key: None for key in RESULT_KEYS}
    results["train_metrics"] = train_metrics if train_metrics.is_file() else None
    if sample is not None:
        samples_dir = study_dir / "samples" / member.folder
        seed_args = () if member.seed is None else (f"--seed={member.seed}",)
        digest = _looking(ledger, lambda: sample_once(model, member.label, samples_dir, sample, ledger, seed_args,
                                                      run.model_size))
        results["samples"] = samples_dir / "samples.npz"
        if evaluate is not None and digest is not None:
            results["sample_metrics"] = _looking(ledger, lambda: evaluate_once(
                evaluate, samples_dir, "metrics.json", member.label, ledger, {"samples": digest}))
        if evaluate is not None and digest is not None and reconstructions is not None:
            def against_reconstructions() -> Path:
                if reconstructions.samples is None:  # a dry pass: that reference is still to be made
                    raise NotDone
                return evaluate_once(
                    replace(evaluate, reference=str(reconstructions.samples)), samples_dir,
                    "metrics_vs_reconstructions.json", f"{member.label} (vs reconstructions)", ledger,
                    {"samples": digest, "reference": reconstructions.digest}, reference_sha256=reconstructions.digest)

            results["reconstruction_metrics"] = _looking(ledger, against_reconstructions)
    if probes is not None:
        results["probe_metrics"] = probe_run(model, member, study_dir, probes, sample, evaluate, ledger)
    paths = {key: None if path is None else _relative(path, study_dir) for key, path in results.items()}
    return model, {"seed": member.seed, "model": str(model), **paths}


RECONSTRUCTION_OUTPUTS = ("samples.npz", "manifest.json")


def reconstruction_reference(step: ReconstructionStep, evaluate: EvaluateConfig | None, study_dir: Path,
                             ledger: Ledger) -> tuple[Reconstructions, Path | None]:
    """(the reconstructions, their metrics.json against the real reference or None), each step skipped
    when it finished with today's settings."""
    if step.images is None and evaluate is None:
        raise ValueError("study reconstructions: set `reconstructions.images`, or an `evaluate.reference` "
                         "holding images, to say which real images the tokenizer rebuilds")
    images = step.images or evaluate.reference
    folder = study_dir / "reconstructions"
    settings = reconstruction_settings(step, images)
    if ledger.done(folder, "reconstruct", settings, owned=RECONSTRUCTION_OUTPUTS):
        _skipped(ledger, f"reconstructions: {folder} is up to date, skipping")
    else:
        ledger.start(folder, "reconstruct", settings)
        _log(f"reconstructions: {images} through {step.tokenizer} into {folder}")
        reconstruct_reference(step, images, folder, settings)
        ledger.finish(folder, "reconstruct", settings, {name: None for name in RECONSTRUCTION_OUTPUTS})
    recon = Reconstructions(folder / RECONSTRUCTION_OUTPUTS[0], settings_digest(settings))
    if evaluate is None:
        return recon, None
    # the tokenizer's floor: reconstructions scored like samples, against the real images
    return recon, _looking(ledger, lambda: evaluate_once(replace(evaluate, metrics=_without_acc(evaluate.metrics)),
                                                         folder, "metrics.json", "reconstructions", ledger,
                                                         {"samples": recon.digest}))


def _without_acc(metrics: str) -> str:
    # reconstructions carry no labels, so class accuracy is not theirs to report
    return ",".join(m.strip() for m in metrics.split(",") if m.strip() and m.strip() != "acc")


def _check(name: str, names: list[str], baseline: str, only: list[str] | None, seeds: list[int] | None) -> None:
    if len(set(names)) != len(names):
        raise ValueError(f"study {name!r}: run names must be unique, got {names}")
    if baseline not in names:
        raise ValueError(f"study {name!r}: baseline {baseline!r} is not one of the runs {names}")
    unknown = sorted(set(only or []) - set(names))
    if unknown:
        raise ValueError(f"study {name!r}: --only names unknown runs {unknown}; runs are {names}")
    check_seeds(seeds, f"study {name!r}")


def _steps(ledger: Ledger, study_dir: Path, index: dict[str, Any], runs: list[StudyRun], seeds: list[int] | None,
           sample: SampleStep | None, evaluate: EvaluateConfig | None, reconstructions: ReconstructionStep | None,
           probes: ProbeStep | None, only: list[str] | None, entries: dict[str, Any]) -> None:
    """Every step of the study through `ledger`: run (writing study.json after each run), or in a dry pass
    only look, each member's chain up to its first step still to run."""
    recon = None
    if reconstructions is not None:
        recon = Reconstructions(None, None)
        try:
            recon, recon_metrics = reconstruction_reference(reconstructions, evaluate, study_dir, ledger)
            index["reconstructions"] = {"samples": _relative(recon.samples, study_dir),
                                        "metrics": None if recon_metrics is None else _relative(recon_metrics,
                                                                                                 study_dir)}
        except NotDone:  # dry pass only
            pass
    names = [run.name for run in runs]
    for run in runs:
        if only and run.name not in only:
            continue
        done = []
        for member in members(run, seeds):
            try:
                done.append(run_member(member, study_dir, sample, evaluate, probes, recon, ledger))
            except NotDone:  # dry pass only: what follows depends on a step still to run
                continue
        if ledger.dry:
            continue
        entries[run.name] = run_entry(run, done[0][0], study_dir, [entry for _, entry in done])
        # Written after every run, so an interrupted study still reports what it finished.
        index["runs"] = [entries[n] for n in names if n in entries]
        atomic_write_text(study_dir / "study.json", json.dumps(index, indent=2) + "\n")


def study(name: str, runs: list[StudyRun], out: str | None = None, baseline: str = "baseline",
          seeds: list[int] | None = None, sample: SampleStep | None = None, evaluate: EvaluateConfig | None = None,
          reconstructions: ReconstructionStep | None = None, probes: ProbeStep | None = None,
          report: bool = True, only: list[str] | None = None, rerun_changed: bool = False,
          command: str | None = None) -> Path:
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
        rerun_changed: Redo the finished steps whose settings differ from the study's now (and the steps
            depending on them), moving their old outputs to `<out>/replaced/<time>/`. Off: such steps stop
            the study before any work, with every differing setting named.
        command: How the study was run, shown in the report (the command line fills it in).
    Returns the path of report.md (or study.json when `report` is off).
    """
    names = [run.name for run in runs]
    _check(name, names, baseline, only, seeds)
    if probes is not None:
        check_probe_tokens(runs, [probes.tokens] + ([probes.pool] if probes.pool else []))
    study_dir = Path(out or f"runs/{name}")
    study_dir.mkdir(parents=True, exist_ok=True)
    index_path = study_dir / "study.json"
    previous = json.loads(index_path.read_text()) if index_path.is_file() else {}
    entries = {entry["name"]: entry for entry in previous.get("runs", [])}
    index: dict[str, Any] = {"name": name, "command": command or "study.runner.study(...)", "baseline": baseline,
                             "reconstructions": previous.get("reconstructions")}
    plan = dict(runs=runs, seeds=seeds, sample=sample, evaluate=evaluate, reconstructions=reconstructions,
                probes=probes, only=only)
    # First only look, so every changed step is named at once, before anything is trained or sampled.
    look = Ledger(study_dir, rerun_changed, dry=True)
    _steps(look, study_dir, dict(index), entries=dict(entries), **plan)
    if look.changes and not rerun_changed:
        raise StaleResultsError(stale_message(look.changes, study_dir))
    for change in look.changes:
        _log(f"--rerun_changed: redoing{change.describe(study_dir)}")
    _steps(Ledger(study_dir, rerun_changed), study_dir, index, entries=entries, **plan)
    if not report:
        return index_path
    from study.report import build_report

    path = build_report(study_dir)
    _log(f"report: {path}")
    return path


__all__ = ["Member", "ProbeStep", "SampleStep", "StaleResultsError", "StudyRun", "study"]
