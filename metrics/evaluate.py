"""Score a sample directory against a reference and write metrics.json with provenance.

FID is our float64 `frechet_distance` on the chosen extractor's features; IS, KID and precision/recall
are torch-fidelity's implementations (`*_featuresdict_to_metric`) fed the same features, so images go
through the extractor once and reference features come from the `metrics.reference` cache instead of
torch-fidelity's own registry and cache. Every input is checked before any feature is extracted
(`metrics.inputs`): paths, formats, the reference's feature size, the labels against the classifier's
classes. metrics.json records the settings and samples it was made from (`settings`); a rerun into an
existing metrics.json recomputes it when they are the same and otherwise refuses, naming what differs,
unless `overwrite` is set. Producing samples (`sample/`) and domain extractors (`metrics.domain`) are left
to others. CLI: `python -m metrics evaluate --samples DIR --reference REF`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch_fidelity.metric_isc import isc_featuresdict_to_metric
from torch_fidelity.metric_kid import kid_featuresdict_to_metric
from torch_fidelity.metric_prc import prc_featuresdict_to_metric

from engram_vision.stats import bootstrap_statistic
from metrics.checks import check_labels, require_finite
from metrics.features import accelerator_device, build_extractor
from metrics.fid import FeatureStats
from metrics.inputs import (
    check_extractor_name,
    check_previous,
    check_source,
    check_stats_dim,
    probe_extractor,
)
from metrics.reference import data_hash, extract, iter_image_batches, load_reference, source_kind
from tokenizers_vq.files import atomic_write_text

ALL_METRICS = ("fid", "is", "kid", "prc", "acc")
# torch-fidelity names its results after Inception whatever the extractor; metrics.json uses neutral names
# so a domain-classifier FID is not reported as an "inception" number.
NEUTRAL_KEYS = {"inception_score_mean": "is_mean", "inception_score_std": "is_std",
                "kernel_inception_distance_mean": "kid_mean", "kernel_inception_distance_std": "kid_std"}


def samples_source(samples: str | Path) -> tuple[Path, str]:
    """(path, kind) of the images in a sample directory: `samples.npz` first, else `images/`, else itself."""
    path = Path(samples)
    if not path.exists() and "{" not in str(path):
        raise FileNotFoundError(f"--samples {path} does not exist: pass the --out folder of `python -m sample` "
                                f"(samples.npz or images/), an ADM .npz with arr_0 or an image folder")
    if path.is_dir() and (path / "samples.npz").is_file():
        return path / "samples.npz", "npz-images"
    if path.is_dir() and (path / "images").is_dir():
        manifest = _read_manifest(path)
        if manifest is not None and manifest.get("complete") is False:
            raise ValueError(f"--samples {path}: sampling has not finished (manifest.json: complete false, no "
                             f"samples.npz); rerun the same `python -m sample` command to finish it first")
        return path / "images", "folder"
    kind = source_kind(path, "--samples")
    if kind not in ("npz-images", "folder", "shards"):
        raise ValueError(f"--samples {path} hold no images but {kind} (mu/sigma statistics): pass the samples")
    return path, kind


def _read_manifest(samples: str | Path) -> dict[str, Any] | None:
    path = Path(samples)
    manifest = (path if path.is_dir() else path.parent) / "manifest.json"
    if not manifest.is_file():
        return None
    try:
        return json.loads(manifest.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{manifest} is not valid JSON ({error}): rerun `python -m sample` into an empty folder, "
                         f"or delete the file to score the images without their provenance") from error


def _finite(value: float) -> float | None:
    # JSON has no NaN/inf; null is the honest value for an undefined metric.
    return float(value) if math.isfinite(value) else None


def _sample_labels(path: Path, kind: str) -> np.ndarray | None:
    """The `labels` [N] of an ADM-layout samples.npz, or None."""
    if not str(path).endswith(".npz"):
        return None
    with np.load(path, allow_pickle=False) as data:
        return data["labels"] if "labels" in data.files else None  # checked against the images by the caller


def _metric_names(metrics: str) -> list[str]:
    """"fid, is" -> ["fid", "is"]. A function, not a property of EvaluateConfig: the command line would
    offer a public method or property of the config as a subcommand."""
    return [m.strip() for m in metrics.split(",") if m.strip()]


@dataclass(frozen=True)
class EvaluateConfig:
    """Score samples against a reference: FID, IS, KID, precision/recall, class accuracy -> metrics.json.

    These fields are the flags of `python -m metrics evaluate` and a study's `evaluate:` section (the study
    fills in `samples` and `out` for each run).
    """

    reference: str
    """ADM `.npz` (`mu`/`sigma`: FID and IS only; or `arr_0` images), image folder, or image shards."""
    samples: str | None = None
    """Sample directory (`samples.npz` with `arr_0`, or `images/`), or an `.npz`/image folder."""
    extractor: str = "inception-v3-compat"
    """Registered feature extractor name (see `metrics.features.available_extractors`)."""
    weights: str | None = None
    """Extractor weights file; default torch's hub cache (Inception). Never downloaded."""
    metrics: str = "fid,is,kid,prc"
    """Comma-separated subset of fid,is,kid,prc,acc (acc: class accuracy of labelled samples under the
    extractor's classifier, for a domain classifier such as domain-classifier)."""
    out: str | None = None
    """Output JSON path; default `<samples dir>/metrics.json`."""
    accelerator: str = "auto"
    """Where the extractor runs (one device): auto (a GPU when there is one), cpu, gpu/cuda or mps."""
    batch_size: int = 64
    """Extractor batch size."""
    cache_dir: str | None = None
    """Reference statistics cache; default ~/.cache/engram-vision/reference-stats."""
    image_size: int | None = None
    """Resize-and-centre-crop reference folder/shard images to this size (None: as stored)."""
    kid_subset_size: int = 1000
    """KID subset size, capped at the smaller sample count."""
    isc_splits: int = 10
    """Number of IS splits."""
    bootstrap: int = 0
    """Bootstrap resamples of the samples for intervals of FID, IS and class accuracy (0: no intervals).
    Resampling with replacement repeats images, which raises FID, so FID's interval sits above its value."""
    level: float = 0.95
    """Confidence level of the bootstrap intervals."""
    seed: int = 0
    """Seeds the bootstrap resampling."""
    overwrite: bool = False
    """Replace an existing metrics.json at `out` made with other settings or other samples (default: refuse,
    naming what differs; one made with the same settings is always recomputed)."""

    def __post_init__(self) -> None:
        unknown = sorted(set(_metric_names(self.metrics)) - set(ALL_METRICS))
        if unknown:
            raise ValueError(f"EvaluateConfig.metrics: unknown metrics {unknown}; choose from {list(ALL_METRICS)}")
        for name in ("batch_size", "kid_subset_size", "isc_splits"):
            if getattr(self, name) < 1:
                raise ValueError(f"EvaluateConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.bootstrap < 0 or not 0 < self.level < 1:
            raise ValueError(f"EvaluateConfig: bootstrap must be >= 0 and level in (0, 1), got {self.bootstrap} "
                             f"and {self.level}")


def _bootstrap_intervals(config: EvaluateConfig, values: dict[str, float | None], feats: np.ndarray,
                         logits: np.ndarray, labels: np.ndarray | None, reference: FeatureStats,
                         tf_kwargs: dict[str, Any]) -> dict[str, Any]:
    """{metric: {low, high, resamples}} for FID, IS and class accuracy over `config.bootstrap` resamples of
    the samples (the reference stays fixed), or {} when bootstrapping is off."""
    if config.bootstrap == 0:
        return {}
    rng = np.random.default_rng(config.seed)
    statistics = {
        "fid": lambda index: FeatureStats.from_features(feats[index]).fid(reference),
        "is_mean": lambda index: isc_featuresdict_to_metric(
            {"logits": torch.from_numpy(logits[index])}, "logits", **tf_kwargs)["inception_score_mean"],
        "class_accuracy": lambda index: float((logits[index].argmax(axis=1) == labels[index]).mean()),
    }
    return {name: {**bootstrap_statistic(statistic, len(feats), rng, config.bootstrap, config.level),
                   "level": config.level}
            for name, statistic in statistics.items() if is_finite_number(values.get(name))}


def is_finite_number(value: Any) -> bool:
    return isinstance(value, float) and math.isfinite(value)


def _out_path(config: EvaluateConfig, sample_path: Path) -> Path:
    if config.out:
        return Path(config.out)
    samples = Path(str(config.samples))
    return (samples if samples.is_dir() else sample_path.parent) / "metrics.json"


def evaluate(config: EvaluateConfig) -> dict[str, Any]:
    """Compute `config.metrics` of `config.samples` vs `config.reference`; write and return the
    metrics.json content. Every input is checked first (see the module docstring)."""
    if config.samples is None:
        raise ValueError("EvaluateConfig.samples is not set: name the sample directory to score")
    samples, reference, weights = config.samples, config.reference, config.weights
    wanted = _metric_names(config.metrics)
    # Cheap checks first: names, paths and file headers; nothing is decoded yet.
    check_extractor_name(config.extractor)
    sample_path, sample_kind = samples_source(samples)
    sample_info = check_source(sample_path, sample_kind, "--samples")
    if sample_info.count is not None and sample_info.count < 2:
        raise ValueError(f"--samples {sample_path} holds {sample_info.count} image(s); the metrics need at least 2")
    ref_kind = source_kind(reference, "--reference")
    ref_info = check_source(reference, ref_kind, "--reference")
    out_path = _out_path(config, sample_path)
    # Then the extractor, and what it gives against the reference and the labels.
    fx = build_extractor(config.extractor, weights=weights, device=accelerator_device(config.accelerator),
                         batch_size=config.batch_size)
    feature_dim, num_classes = probe_extractor(fx, sample_info.image_shape)
    check_stats_dim(ref_info, reference, feature_dim, config.extractor)
    labels = _sample_labels(sample_path, sample_kind) if "acc" in wanted else None
    if labels is not None:
        labels = check_labels(labels, sample_info.count or 0, num_classes, f"--samples {sample_path} (labels)")
    # Then whether a previous result would be replaced.
    sample_digest, ref_digest = data_hash(sample_path, sample_kind), data_hash(reference, ref_kind)
    settings = {"samples": str(sample_path.resolve()), "samples_sha256": sample_digest,
                "reference": str(Path(reference).resolve()) if "{" not in reference else reference,
                "reference_sha256": ref_digest, "extractor": fx.name, "extractor_weights_sha256": fx.weights_sha256,
                "metrics": sorted(wanted), "image_size": config.image_size,
                "kid_subset_size": config.kid_subset_size, "isc_splits": config.isc_splits,
                "bootstrap": config.bootstrap, "level": config.level, "seed": config.seed}
    note = check_previous(out_path, settings, config.overwrite)
    if note:
        print(note)

    ref = load_reference(reference, fx, cache_dir=config.cache_dir, image_size=config.image_size, digest=ref_digest)
    sample_feats, sample_logits = extract(fx, iter_image_batches(sample_path, sample_kind))
    what = f"the {config.extractor} features of --samples {sample_path}"
    require_finite(sample_feats, what, "check the extractor's weights and the images")
    require_finite(sample_logits, f"the {config.extractor} logits of --samples {sample_path}",
                   "check the extractor's weights and the images")
    sample_stats = FeatureStats.from_features(sample_feats, f"--samples {sample_path}")

    values: dict[str, float | None] = {}
    skipped: dict[str, str] = {}
    # torch-fidelity reads unset kwargs from its DEFAULTS; verbose off keeps stdout for our summary.
    tf_kwargs: dict[str, Any] = {"verbose": False, "isc_splits": config.isc_splits}
    if "fid" in wanted:
        values["fid"] = _finite(sample_stats.fid(ref.stats))
    if "is" in wanted:
        isc = isc_featuresdict_to_metric({"logits": torch.from_numpy(sample_logits)}, "logits", **tf_kwargs)
        values.update({NEUTRAL_KEYS.get(k, k): _finite(v) for k, v in isc.items()})
    for name in ("kid", "prc"):
        if name not in wanted:
            continue
        if ref.features is None:
            skipped[name] = "reference holds only mu/sigma (ADM stats), so only FID (and IS) can be computed"
            continue
        f1 = {"f": torch.from_numpy(sample_feats)}
        f2 = {"f": torch.from_numpy(np.asarray(ref.features, np.float32))}
        if name == "kid":
            size = min(config.kid_subset_size, len(sample_feats), len(ref.features))
            res = kid_featuresdict_to_metric(f1, f2, "f", kid_subset_size=size, **tf_kwargs)
        else:  # torch-fidelity's convention: input 1 generated, input 2 real
            res = prc_featuresdict_to_metric(f1, f2, "f", **tf_kwargs)
        values.update({NEUTRAL_KEYS.get(k, k): _finite(v) for k, v in res.items()})

    if "acc" in wanted:
        if labels is None:
            skipped["acc"] = "the samples carry no labels (samples.npz without `labels`)"
        else:
            # Does the classifier see the class the sample was generated for?
            values["class_accuracy"] = float((sample_logits.argmax(axis=1) == labels).mean())
    intervals = _bootstrap_intervals(config, values, sample_feats, sample_logits, labels, ref.stats, tf_kwargs)

    report = {
        "settings": settings,
        "metrics": values,
        "intervals": intervals,
        "skipped": skipped,
        "extractor": {"name": fx.name, "weights_sha256": fx.weights_sha256,
                      "weights_path": str(getattr(fx, "weights_path", weights) or ""),
                      # what the features are (for a domain classifier: the data it learnt, its accuracy)
                      "description": getattr(fx, "description", None)},
        "reference": {
            "path": str(Path(reference).resolve()) if "{" not in reference else reference,
            "kind": ref.kind,
            "sha256": ref.data_sha256,
            "num_samples": ref.stats.num_samples,
            "stats_cache": str(ref.cache_path) if ref.cache_path else None,
        },
        "samples": {
            "path": str(sample_path.resolve()),
            "sha256": sample_digest,
            "num_samples": int(len(sample_feats)),
            "manifest": _read_manifest(samples),
        },
    }
    if ref.kind == "npz-stats":
        report["reference"]["note"] = "mu/sigma-only reference: FID only among the reference-based metrics"
    atomic_write_text(out_path, json.dumps(report, indent=2) + "\n")
    return report
