"""`python -m study curve --run runs/ar/<x> ...`: held-out NLL, FID and the other sample metrics of an AR
run's training checkpoints against the training step, as `curve.json` and a two-panel `curve.png`.

For each Lightning checkpoint of `train.lit_ar.LitAR` (every `<run>/checkpoints/*.ckpt` by default, one per
global step: a `last.ckpt` holding the same weights as a step file is the same point), in step order:

    <out>/step_XXXXXXX/checkpoint.json   which checkpoint (path, sha256, global step) the folder belongs to
    <out>/step_XXXXXXX/model/            its weights exported for sampling (engram_vision.checkpoint.save_gpt)
    <out>/step_XXXXXXX/nll.json          held-out NLL in bits per token: mean over images, bootstrap interval,
                                         and the per-image values (paired comparisons between steps)
    <out>/step_XXXXXXX/samples/          `num_samples` images with a fixed seed (sample.job.sample_images) and
                                         their metrics.json (metrics.evaluate.evaluate)
    <out>/step_XXXXXXX/metrics.json      the step's entry of curve.json; its presence marks the step finished
    <out>/settings.json                  the settings every step was made with
    <out>/curve.json, <out>/curve.png    every finished step in <out>, in step order, and the figure

Everything is checked before the first export (the checkpoints, their model config, the tokenizer against
the model's vocabulary, the token shards against the model, the reference and extractor, earlier results in
`out`), and a rerun redoes nothing that is finished: an interrupted curve picks up inside the step it
stopped in (sampling resumes batch by batch), and a call with more checkpoints scores only the new ones.
A rerun with other settings, or a step folder of another checkpoint, is refused with the settings or files
named. Sampling is `sample/job.py`, scoring `metrics/evaluate.py`, the per-image NLL
`engram_vision.probes.score_probes`; the study's own runs are `study/runner.py`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from engram_vision.config import ModelConfig
from metrics.evaluate import EvaluateConfig
from sample.job import LabelScheme
from sample.sampling import SamplingConfig
from tokenizers_vq.files import TEMP_SUFFIX, atomic_write_text, file_sha256
from tokenizers_vq.model_dir import CONFIG_NAME, WEIGHTS_NAME

FORMAT = "engram-vision-curve"
STEP_FOLDER = "step_{:07d}"
# Fields that change training but not the model a checkpoint holds, nor what it computes in eval mode:
# checkpoints of one run may differ in them (e.g. a fine-tune with less dropout) and still form one curve.
# class_dropout_prob matters only as "is there a null label" (a row of the label table, and guidance).
TRAINING_ONLY = ("token_dropout_p", "attn_dropout_p", "resid_dropout_p", "ffn_dropout_p", "initializer_range")
ENGRAM_TRAINING_ONLY = ("table", "table_lr_multiplier", "table_weight_decay", "table_device")
# Where a job runs, not what it computes: these may change between calls without refusing the results.
WHERE_IT_RUNS = ("accelerator", "devices", "strategy", "compile", "cache_dir")
# Fields of EvaluateConfig that are no setting of the numbers: the curve sets samples and out per step,
# the extractor batch only groups images, and overwrite says what to do with an existing metrics.json.
EVALUATE_NOT_SETTINGS = ("samples", "out", "batch_size", "overwrite")


@dataclass(frozen=True)
class CurveSample:
    """How every checkpoint is sampled: the `python -m sample` settings other than the model, the tokenizer,
    `out` and `num_samples` (which the curve sets). The same seed for every step, so steps differ only in
    their weights."""

    labels: LabelScheme = "balanced"
    """`uniform` at random (LlamaGen's FID protocol) or `balanced` over classes (steadier with few
    samples)."""
    seed: int = 0
    """Seed of the labels and of every batch's generator (the same at every step)."""
    batch_size: int = 64
    """Images per batch; the images depend on it."""
    sampling: SamplingConfig = SamplingConfig()
    """CFG scale and schedule, temperature, top-k, top-p, greedy."""
    tokenizer_size: str | None = None
    """Named config of a LlamaGen VQ `.pt` tokenizer (e.g. vq-16)."""
    accelerator: str = "auto"
    """Lightning accelerator of sampling (cpu, gpu, auto, ...)."""
    devices: int | str = 1
    """Lightning devices of sampling. One by default: the curve is one process, and a multi-process
    strategy would run the whole curve in every process."""
    strategy: str = "auto"
    """Lightning strategy of sampling."""
    precision: str = "32-true"
    """Lightning precision of sampling (e.g. bf16-mixed); the images depend on it."""
    compile: bool = False
    """Compile the decode step (same images, faster after the first batch)."""


@dataclass(frozen=True)
class CurveNll:
    """How the held-out NLL of every checkpoint is measured on the validation token shards."""

    images_per_class: int | None = None
    """Class-balanced subset: the first k held-out images of each class (None: every image of the shards)."""
    batch_size: int = 32
    """Images per forward pass."""
    bootstrap: int = 2000
    """Bootstrap resamples of the images for the interval of the mean NLL."""
    level: float = 0.95
    """Confidence level of the interval."""
    seed: int = 0
    """Seeds the bootstrap resampling."""
    accelerator: str = "auto"
    """Where the NLL is computed (one device): auto (a GPU when there is one), cpu, gpu/cuda or mps."""

    def __post_init__(self) -> None:
        for name in ("batch_size", "bootstrap"):
            if getattr(self, name) < 1:
                raise ValueError(f"CurveNll.{name} must be >= 1, got {getattr(self, name)}")
        if self.images_per_class is not None and self.images_per_class < 1:
            raise ValueError(f"CurveNll.images_per_class must be None or >= 1, got {self.images_per_class}")
        if not 0 < self.level < 1:
            raise ValueError(f"CurveNll.level must lie in (0, 1), got {self.level}")
        if self.seed < 0:
            raise ValueError(f"CurveNll.seed must be >= 0, got {self.seed}")


@dataclass(frozen=True)
class Checkpoint:
    """One point of the curve: a validated LitAR checkpoint."""

    path: Path
    step: int
    sha256: str
    gpt: dict[str, Any] = field(repr=False)
    """Its hyper-parameter `gpt` (the ModelConfig it was trained with)."""
    epoch: int | None = None

    @property
    def folder(self) -> str:
        return STEP_FOLDER.format(self.step)


def _log(message: str) -> None:
    print(f"[curve] {message}", flush=True)


# ------------------------------------------------------------------------------------------ checkpoints


def family(gpt: dict[str, Any]) -> dict[str, Any]:
    """The part of a model config that must agree between checkpoints of one curve (see TRAINING_ONLY)."""
    config = {k: v for k, v in ModelConfig(**gpt).to_dict().items() if k not in TRAINING_ONLY}
    has_null = float(config["class_dropout_prob"]) > 0
    config["class_dropout_prob"] = "null label" if has_null else "no null label"
    if config["engram"] is not None:
        config["engram"] = {k: v for k, v in config["engram"].items() if k not in ENGRAM_TRAINING_ONLY}
    return json.loads(json.dumps(config))  # tuples as lists, as settings.json reads them back


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flat(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def _differences(first: dict[str, Any], second: dict[str, Any],
                 names: tuple[str, str] = ("then", "now")) -> list[str]:
    """'key: <first> then, <second> now' (or the given names) for every dotted key that differs."""
    a, b = _flat(first), _flat(second)
    return [f"{key}: {a.get(key)!r} {names[0]}, {b.get(key)!r} {names[1]}"
            for key in sorted({*a, *b}) if a.get(key) != b.get(key)]


def _load_lit_ar(path: Path) -> dict[str, Any]:
    """The checkpoint dict, refused unless it is a Lightning checkpoint of LitAR."""
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist: pass existing .ckpt files of an AR run "
                                f"(`python -m train ar fit` writes them under <run>/checkpoints)")
    # Tensors and plain containers only: a checkpoint whose pickle would run code is refused here.
    payload = torch.load(path, map_location="cpu", weights_only=True)
    hparams = payload.get("hyper_parameters") if isinstance(payload, dict) else None
    state = payload.get("state_dict") if isinstance(payload, dict) else None
    lit_ar = isinstance(hparams, dict) and isinstance(hparams.get("gpt"), dict) and isinstance(state, dict) \
        and "global_step" in payload and any(str(k).startswith("model.") for k in state)
    if not lit_ar:
        raise ValueError(f"{path} is not a Lightning checkpoint of LitAR (it needs `state_dict` with model.* "
                         f"keys, `hyper_parameters.gpt` and `global_step`): pass the checkpoints of an AR "
                         f"training run (`python -m train ar fit`), not a tokenizer's or an exported model")
    return payload


def model_state(payload: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The EngramGPT state dict inside a LitAR checkpoint (`model.` prefix removed)."""
    return {k.removeprefix("model."): v for k, v in payload["state_dict"].items() if k.startswith("model.")}


def _same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)


def _preference(path: Path) -> tuple[int, str]:
    # Of two files at one step, keep the one named after it (step_*.ckpt) over last.ckpt / best.ckpt.
    return (0 if path.name.startswith("step_") else 1 if path.stem not in ("last", "best") else 2, path.name)


def find_checkpoints(run: str | None, checkpoints: list[str] | None) -> list[Path]:
    """The .ckpt files to score: `checkpoints` if given, else every `<run>/checkpoints/*.ckpt`."""
    if checkpoints is not None:
        if not checkpoints:
            raise ValueError("--checkpoints is an empty list: name at least one .ckpt, or pass --run alone")
        return sorted({Path(c).resolve() for c in checkpoints})
    if run is None:
        raise ValueError("pass --run (an AR run directory with checkpoints/) or --checkpoints (a list of "
                         ".ckpt files)")
    folder = Path(run) / "checkpoints"
    if not folder.is_dir():
        raise FileNotFoundError(f"--run {run} has no checkpoints/ folder: pass the run directory of "
                                f"`python -m train ar fit` (its trainer.logger save_dir) or --checkpoints")
    found = sorted(p.resolve() for p in folder.glob("*.ckpt"))
    if not found:
        raise FileNotFoundError(f"{folder} holds no .ckpt files: the run saved no checkpoint yet (its "
                                f"ModelCheckpoint callback writes them), or pass --checkpoints")
    return found


def read_checkpoints(paths: list[Path]) -> list[Checkpoint]:
    """Validated checkpoints, one per global step, in step order.

    Raises when a file is missing or not a LitAR checkpoint, when two model configs differ in more than
    training-only fields, when a state dict does not fit its config, and when two files at one step hold
    different weights. Files at one step with equal weights (last.ckpt beside step_*.ckpt) count once.
    """
    from engram_vision.model import EngramGPT
    from tokenizers_vq.files import state_dict_mismatch

    by_step: dict[int, list[Checkpoint]] = {}
    first: Checkpoint | None = None
    models: dict[str, torch.nn.Module] = {}  # config JSON -> the model on the meta device
    for path in paths:
        payload = _load_lit_ar(path)
        state = model_state(payload)
        point = Checkpoint(path, int(payload["global_step"]), file_sha256(path),
                           dict(payload["hyper_parameters"]["gpt"]), payload.get("epoch"))
        if first is None:
            first = point
        elif diff := _differences(family(first.gpt), family(point.gpt), (f"in {first.path}", f"in {path}")):
            raise ValueError(f"{path} was trained with another model than {first.path} (model.gpt."
                             + "; model.gpt.".join(diff[:6])
                             + "): one curve is one run; pass the checkpoints of a single run")
        key = json.dumps(point.gpt, sort_keys=True)
        if key not in models:
            with torch.device("meta"):  # shapes only: no memory, no initialisation
                models[key] = EngramGPT(ModelConfig(**point.gpt))
        if (report := state_dict_mismatch(models[key], state, str(path))) is not None:
            raise ValueError(f"{report}\n  the checkpoint's weights do not fit its own hyper_parameters.gpt: "
                             f"it is damaged or was edited; pass another checkpoint")
        by_step.setdefault(point.step, []).append(point)
        del payload, state
    chosen = []
    for step in sorted(by_step):
        group = sorted(by_step[step], key=lambda p: _preference(p.path))
        keep = group[0]
        if len(group) > 1:
            kept_state = model_state(torch.load(keep.path, map_location="cpu", weights_only=True))
            for other in group[1:]:
                same_file = other.sha256 == keep.sha256
                if not same_file and not _same_weights(
                        kept_state, model_state(torch.load(other.path, map_location="cpu", weights_only=True))):
                    raise ValueError(f"{keep.path} and {other.path} are both at global step {step} but hold "
                                     f"different weights (two runs, or a resumed run that branched): pass "
                                     f"--checkpoints with the files of one run")
                _log(f"step {step}: {other.path.name} holds the weights of {keep.path.name}, scored once")
        chosen.append(keep)
    return chosen


# ------------------------------------------------------------------------------------------ the other inputs


def _weights_file(path: Path) -> Path | None:
    """The file whose hash names a tokenizer: a `.pt` itself, or a folder's model.safetensors (else None)."""
    if path.is_file():
        return path
    return path / WEIGHTS_NAME if (path / WEIGHTS_NAME).is_file() else None


def check_tokenizer(tokenizer: str, size: str | None, config: ModelConfig) -> str | None:
    """Load the tokenizer and check its codebook against the model's vocabulary; returns its weights hash."""
    from sample.job import check_tokenizer_fits
    from tokenizers_vq.checkpoint import load_tokenizer

    path = Path(tokenizer)
    if not path.exists():
        raise FileNotFoundError(f"--tokenizer {tokenizer} does not exist: pass the tokenizer whose codes the "
                                f"run was trained on (the token shards' meta.json names it)")
    vq = load_tokenizer(path, size)
    check_tokenizer_fits(config, vq, model="the checkpoints (model.gpt.vocab_size)",
                         tokenizer_name=f"--tokenizer {tokenizer}",
                         fix="pass the tokenizer whose codes the run was trained on (the token shards' "
                             "meta.json names it); a LlamaGen .pt is read with the config named by "
                             "--sample.tokenizer_size")
    weights = _weights_file(path)
    return None if weights is None else file_sha256(weights)


def read_val_tokens(val_shards: str, config: ModelConfig, nll: CurveNll) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [N,T], labels [N]) of the held-out shards, checked against the model like training checks."""
    from train.data.tokens import read_token_meta, read_token_set
    from train.lit_ar import check_token_data

    meta = read_token_meta(val_shards)  # FileNotFoundError naming meta.json when the shards are not there
    # The same checks (and messages) as training's setup, on the shards' meta.json.
    data = SimpleNamespace(vocab_size=meta["codebook_size"], num_classes=meta["num_classes"],
                           grid=meta["grid"], meta=meta)
    check_token_data(config, data)
    return read_token_set(val_shards, nll.images_per_class)


def check_evaluate(evaluate: EvaluateConfig) -> None:
    """The reference and the extractor (and its weights) exist; samples and out are left to the curve."""
    from metrics.features import available_extractors, resolve_inception_weights
    from metrics.reference import source_kind

    if evaluate.samples is not None or evaluate.out is not None:
        raise ValueError(f"--evaluate.samples / --evaluate.out are set ({evaluate.samples}, {evaluate.out}): "
                         f"the curve scores each step's own samples into its own folder; leave them unset")
    if "{" not in evaluate.reference:  # a brace pattern of shards is expanded by the reader
        source_kind(evaluate.reference)  # FileNotFoundError / KeyError naming the reference
    if evaluate.extractor not in available_extractors():
        raise ValueError(f"--evaluate.extractor {evaluate.extractor!r} is not registered; choose from "
                         f"{available_extractors()}")
    if evaluate.extractor == "inception-v3-compat":
        resolve_inception_weights(evaluate.weights)  # FileNotFoundError with where to put the file
    elif evaluate.weights is not None and not Path(evaluate.weights).is_file():
        raise FileNotFoundError(f"--evaluate.weights {evaluate.weights} does not exist: pass the extractor's "
                                f"weights file")


def _where_it_runs_removed(section: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in section.items() if k not in WHERE_IT_RUNS}


def curve_settings(config_family: dict[str, Any], tokenizer: str, tokenizer_sha256: str | None,
                   val_shards: str, images_sha256: str, num_samples: int, sample: CurveSample, nll: CurveNll,
                   evaluate: EvaluateConfig) -> dict[str, Any]:
    """What every step's numbers depend on; a call with other values is refused (settings.json)."""
    settings = {
        "format": FORMAT, "model": config_family,
        "tokenizer": str(Path(tokenizer).resolve()), "tokenizer_sha256": tokenizer_sha256,
        "val_shards": val_shards if "{" in val_shards else str(Path(val_shards).resolve()),
        "val_images_sha256": images_sha256, "num_samples": num_samples,
        "sample": _where_it_runs_removed(asdict(sample)),
        "nll": _where_it_runs_removed({k: v for k, v in asdict(nll).items() if k != "batch_size"}),
        "evaluate": _where_it_runs_removed({k: v for k, v in asdict(evaluate).items()
                                            if k not in EVALUATE_NOT_SETTINGS}),
    }
    reference = settings["evaluate"]["reference"]
    if "{" not in reference:
        settings["evaluate"]["reference"] = str(Path(reference).resolve())
    return json.loads(json.dumps(settings))


def check_out(out: Path, settings: dict[str, Any], points: list[Checkpoint]) -> None:
    """Refuse an `out` made with other settings, or whose step folder belongs to another checkpoint."""
    settings_path = out / "settings.json"
    steps = sorted(out.glob("step_*")) if out.is_dir() else []
    if settings_path.is_file():
        previous = json.loads(settings_path.read_text())
        if (diff := _differences(previous, settings)):
            raise ValueError(f"{out} holds a curve made with other settings ({'; '.join(diff[:8])}"
                             f"{' ...' if len(diff) > 8 else ''}): use a new --out folder, or the same "
                             f"settings to extend this curve")
    elif steps:
        raise ValueError(f"{out} holds step folders ({steps[0].name}, ...) but no settings.json: it is not a "
                         f"curve folder of this command; use a new --out folder")
    for point in points:
        record = out / point.folder / "checkpoint.json"
        if record.is_file():
            theirs = json.loads(record.read_text())
            if theirs.get("sha256") != point.sha256:
                raise ValueError(f"{out / point.folder} belongs to another checkpoint at step {point.step} "
                                 f"({theirs.get('path')}, sha256 {str(theirs.get('sha256'))[:12]}...) than "
                                 f"{point.path} (sha256 {point.sha256[:12]}...): the run was retrained or "
                                 f"branched; use a new --out folder")


# ------------------------------------------------------------------------------------------ one step


def _model_complete(model_dir: Path) -> bool:
    return (model_dir / WEIGHTS_NAME).is_file() and (model_dir / CONFIG_NAME).is_file()


def export_step(point: Checkpoint, step_dir: Path) -> Path:
    """`<step>/model/` (safetensors + config.json) from the checkpoint, unless complete.

    Written into a temporary folder beside it and renamed, so `model/` is whole or absent; temporary
    folders of a killed export are removed first (one curve process writes a step folder)."""
    from engram_vision.checkpoint import save_gpt
    from engram_vision.model import EngramGPT
    from tokenizers_vq.files import load_state_dict_checked

    model_dir = step_dir / "model"
    if _model_complete(model_dir):
        return model_dir
    for stale in step_dir.glob(f".model.*{TEMP_SUFFIX}"):
        shutil.rmtree(stale, ignore_errors=True)
    if model_dir.exists():  # not ours: the rename never leaves half a folder
        raise ValueError(f"{model_dir} exists but lacks {WEIGHTS_NAME} or {CONFIG_NAME}: delete it and rerun "
                         f"to export the checkpoint again")
    _log(f"step {point.step}: exporting {point.path} to {model_dir}")
    payload = torch.load(point.path, map_location="cpu", weights_only=True)
    model = EngramGPT(ModelConfig(**point.gpt))
    load_state_dict_checked(model, model_state(payload), str(point.path), optional_keys=())
    del payload
    step_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=step_dir, prefix=".model.", suffix=TEMP_SUFFIX))
    try:
        save_gpt(model.eval(), tmp)
        os.replace(tmp, model_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return model_dir


def nll_step(model_dir: Path, tokens: torch.Tensor, labels: torch.Tensor, nll: CurveNll, step_dir: Path,
             label: str) -> dict[str, Any]:
    """`<step>/nll.json`: held-out bits per token of the exported model, unless it exists."""
    from engram_vision.checkpoint import load_gpt
    from engram_vision.probes import images_sha256, score_probes
    from engram_vision.stats import bootstrap_mean
    from metrics.features import accelerator_device

    path = step_dir / "nll.json"
    if path.is_file():
        return json.loads(path.read_text())
    _log(f"{label}: held-out NLL on {len(labels)} images")
    model = load_gpt(model_dir).to(accelerator_device(nll.accelerator))
    per_image, _ = score_probes(model, tokens, labels, {}, nll.batch_size)  # nats per token, per image
    bits = (per_image / math.log(2)).numpy()
    interval = bootstrap_mean(bits, np.random.default_rng(nll.seed), nll.bootstrap, nll.level)
    result = {"nll_bits": {**interval, "level": nll.level, "resamples": nll.bootstrap},
              "nll_bits_per_image": bits.tolist(), "num_images": int(len(labels)),
              "positions_per_image": int(tokens.shape[1]), "images_sha256": images_sha256(tokens, labels),
              "model_sha256": file_sha256(model_dir / WEIGHTS_NAME)}
    atomic_write_text(path, json.dumps(result, indent=2, allow_nan=False) + "\n")
    return result


def _samples_complete(samples_dir: Path) -> bool:
    manifest = samples_dir / "manifest.json"
    return (samples_dir / "samples.npz").is_file() and manifest.is_file() and \
        bool(json.loads(manifest.read_text()).get("complete"))


def sample_step(model_dir: Path, tokenizer: str, num_samples: int, sample: CurveSample, step_dir: Path,
                label: str) -> Path:
    """`<step>/samples/` from the exported model (resumed batch by batch), unless complete."""
    from sample.job import sample_images

    samples_dir = step_dir / "samples"
    if not _samples_complete(samples_dir):
        _log(f"{label}: sampling {num_samples} images into {samples_dir}")
        sample_images(str(model_dir), tokenizer, str(samples_dir), num_samples=num_samples,
                      labels=sample.labels, seed=sample.seed, batch_size=sample.batch_size,
                      sampling=sample.sampling, tokenizer_size=sample.tokenizer_size,
                      accelerator=sample.accelerator, devices=sample.devices, strategy=sample.strategy,
                      precision=sample.precision, compile=sample.compile)
    return samples_dir


def evaluate_step(samples_dir: Path, evaluate: EvaluateConfig, label: str) -> dict[str, Any]:
    """`<step>/samples/metrics.json`, unless it exists."""
    from metrics.evaluate import evaluate as run_evaluate

    path = samples_dir / "metrics.json"
    if path.is_file():
        return json.loads(path.read_text())
    _log(f"{label}: evaluating {samples_dir} against {evaluate.reference}")
    return run_evaluate(replace(evaluate, samples=str(samples_dir), out=str(path)))


def step_entry(point: Checkpoint, nll_result: dict[str, Any], report: dict[str, Any]) -> dict[str, Any]:
    """The step's line of curve.json: checkpoint, NLL with its interval, and every metric evaluate gave."""
    entry: dict[str, Any] = {
        "step": point.step, "epoch": point.epoch, "checkpoint": str(point.path),
        "checkpoint_sha256": point.sha256,
        "model": f"{point.folder}/model", "model_sha256": nll_result["model_sha256"],
        "nll_bits": {k: nll_result["nll_bits"][k] for k in ("mean", "low", "high", "level")},
        "nll_num_images": nll_result["num_images"],
    }
    metrics = report.get("metrics", {})
    clash = sorted(set(metrics) & set(entry))
    if clash:  # evaluate's metric names sit beside ours; a new one of the same name must not hide either
        raise RuntimeError(f"metrics {clash} of evaluate clash with curve.json's own keys; rename them")
    entry.update(metrics)
    entry.update(intervals=report.get("intervals", {}), skipped=report.get("skipped", {}),
                 samples=f"{point.folder}/samples/samples.npz",
                 sample_metrics=f"{point.folder}/samples/metrics.json",
                 num_samples=(report.get("samples") or {}).get("num_samples"),
                 reference_sha256=(report.get("reference") or {}).get("sha256"))
    return entry


def run_step(point: Checkpoint, out: Path, tokenizer: str, tokens: torch.Tensor, labels: torch.Tensor,
             num_samples: int, sample: CurveSample, nll: CurveNll,
             evaluate: EvaluateConfig) -> dict[str, Any]:
    """Every part of one step that is not finished yet; returns (and writes) its metrics.json entry."""
    step_dir = out / point.folder
    metrics_path = step_dir / "metrics.json"
    if metrics_path.is_file():
        return json.loads(metrics_path.read_text())
    label = f"step {point.step}"
    record = step_dir / "checkpoint.json"
    if not record.is_file():  # first, so a later call can tell which checkpoint the folder belongs to
        atomic_write_text(record, json.dumps({"path": str(point.path), "sha256": point.sha256,
                                              "global_step": point.step}, indent=2) + "\n")
    model_dir = export_step(point, step_dir)
    nll_result = nll_step(model_dir, tokens, labels, nll, step_dir, label)
    samples_dir = sample_step(model_dir, tokenizer, num_samples, sample, step_dir, label)
    report = evaluate_step(samples_dir, evaluate, label)
    entry = step_entry(point, nll_result, report)
    atomic_write_text(metrics_path, json.dumps(entry, indent=2, allow_nan=False) + "\n")
    return entry


# ------------------------------------------------------------------------------- curve.json, curve.png


def _interval_of(entry: dict[str, Any], key: str) -> dict[str, Any] | None:
    value = entry.get(key)
    if not isinstance(value, (int, float)):
        return None
    interval = (entry.get("intervals") or {}).get(key) or {}
    return {"mean": float(value), "low": interval.get("low"), "high": interval.get("high")}


def curve_figure(entries: list[dict[str, Any]], path: Path) -> None:
    """Two panels against the training step: FID (its bootstrap interval when evaluated with one) and the
    held-out NLL in bits per token with its interval."""
    from study.figures import _pyplot, _save_figure, _yerr

    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    panels = [(axes[0], [(e["step"], _interval_of(e, "fid")) for e in entries], "FID (lower is better)"),
              (axes[1], [(e["step"], e.get("nll_bits")) for e in entries], "held-out NLL (bits/token)")]
    for ax, points, ylabel in panels:
        points = [(step, s) for step, s in points
                  if s is not None and isinstance(s.get("mean"), (int, float))]
        if points:
            means, err = _yerr([s for _, s in points])
            ax.errorbar([step for step, _ in points], means, yerr=err, marker="o", capsize=3)
        else:
            ax.text(0.5, 0.5, "not computed", ha="center", va="center", transform=ax.transAxes)
        ax.set(xlabel="training step", ylabel=ylabel)
    _save_figure(fig, path)


def write_curve(out: Path, settings: dict[str, Any]) -> Path:
    """curve.json from every finished step folder in `out` (earlier calls' too), and curve.png; each is
    rewritten only when its content would change (or the figure is older than the JSON)."""
    entries = sorted((json.loads(p.read_text()) for p in out.glob("step_*/metrics.json")),
                     key=lambda e: e["step"])
    index = {"format": FORMAT, "settings": settings, "steps": entries}
    text = json.dumps(index, indent=2, allow_nan=False) + "\n"
    curve_path, figure = out / "curve.json", out / "curve.png"
    changed = not curve_path.is_file() or curve_path.read_text() != text
    if changed:
        atomic_write_text(curve_path, text)
    # Older than the JSON: a call killed between the two files drew the previous curve.
    if changed or not figure.is_file() or figure.stat().st_mtime < curve_path.stat().st_mtime:
        curve_figure(entries, figure)
    return curve_path


# ------------------------------------------------------------------------------------------ the command


def curve(tokenizer: str, val_shards: str, num_samples: int, evaluate: EvaluateConfig, run: str | None = None,
          checkpoints: list[str] | None = None, out: str | None = None, sample: CurveSample = CurveSample(),
          nll: CurveNll = CurveNll()) -> Path:
    """Score an AR run's checkpoints (held-out NLL, FID and the other metrics) against the training step.

    Args:
        tokenizer: The tokenizer whose codes the run was trained on (decodes the samples).
        val_shards: Held-out token shards (python -m train.prepare tokens --split val) for the NLL.
        num_samples: Images sampled per checkpoint (the same seed at every step).
        evaluate: How samples are scored: reference, extractor, metrics, bootstrap, ... (`samples` and
            `out` are set per step).
        run: The AR run directory; its checkpoints/*.ckpt are scored unless `checkpoints` is given.
        checkpoints: The LitAR .ckpt files to score (default: all of <run>/checkpoints, one per step).
        out: Curve directory (default <run>/curve); a rerun continues it, other settings are refused.
        sample: How each checkpoint is sampled (labels, seed, batch size, CFG, devices, precision).
        nll: How the held-out NLL is measured (subset, batch size, bootstrap, device).
    Returns the path of curve.json (curve.png beside it).
    """
    if num_samples < 1 or sample.batch_size < 1:
        raise ValueError(f"--num_samples and --sample.batch_size must be >= 1, got {num_samples} and "
                         f"{sample.batch_size}")
    if out is None and run is None:
        raise ValueError("pass --out (the curve directory) when the checkpoints are given without --run")
    out_dir = Path(out) if out is not None else Path(run) / "curve"
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir} is a file: pass a folder (new, or of an earlier curve)")
    # Absolute paths: the sample manifests record them, so a rerun from another directory resumes too.
    out_dir, tokenizer = out_dir.resolve(), str(Path(tokenizer).resolve())
    # Every input is checked here, before the first export: the cheap checks first.
    check_evaluate(evaluate)
    points = read_checkpoints(find_checkpoints(run, checkpoints))
    config = ModelConfig(**points[-1].gpt)
    if sample.sampling.uses_cfg and config.class_dropout_prob == 0:
        raise ValueError(f"--sample.sampling.cfg_scale={sample.sampling.cfg_scale} needs the model's null "
                         f"label, but the run was trained without one (model.gpt.class_dropout_prob = 0): "
                         f"set --sample.sampling.cfg_scale 1")
    tokenizer_sha256 = check_tokenizer(tokenizer, sample.tokenizer_size, config)
    tokens, labels = read_val_tokens(val_shards, config, nll)
    from engram_vision.probes import images_sha256

    settings = curve_settings(family(points[-1].gpt), tokenizer, tokenizer_sha256, val_shards,
                              images_sha256(tokens, labels), num_samples, sample, nll, evaluate)
    check_out(out_dir, settings, points)
    settings_path = out_dir / "settings.json"
    if not settings_path.is_file():
        atomic_write_text(settings_path, json.dumps(settings, indent=2) + "\n")
    todo = [p for p in points if not (out_dir / p.folder / "metrics.json").is_file()]
    _log(f"{len(points)} checkpoint(s) at steps {[p.step for p in points]}; {len(points) - len(todo)} "
         f"already scored in {out_dir}")
    for point in todo:
        run_step(point, out_dir, tokenizer, tokens, labels, num_samples, sample, nll, evaluate)
        write_curve(out_dir, settings)  # after every step: an interrupted curve still shows what it finished
    path = write_curve(out_dir, settings)
    earlier = sorted({json.loads(p.read_text())["step"] for p in out_dir.glob("step_*/metrics.json")}
                     - {p.step for p in points})
    if earlier:
        _log(f"curve.json keeps steps {earlier} scored by earlier calls (not among this call's checkpoints)")
    _log(f"curve: {path} and {out_dir / 'curve.png'}")
    return path


__all__ = ["Checkpoint", "CurveNll", "CurveSample", "curve", "family", "find_checkpoints", "read_checkpoints"]
