"""`make demo`: the whole pipeline on the embedded digits, stage by stage, skipping stages already finished.

1. the digits VQ tokenizer (configs/vq/digits.yaml) -> runs/demo/vq/ (reconstructions.png, metrics.json,
   tokenizer/);
2. token shards of the train and val splits (centre view only: mirrored digits are other glyphs) ->
   runs/demo/tokens/;
3. the domain classifier (metrics/domain.py) trained on the digits -> runs/demo/domain_classifier/ (one
   saved in an older format is retrained), the reference images, and the tokenizer's PSNR, SSIM and rFID on
   the val images under that classifier -> runs/demo/vq/tokenizer/eval_metrics.json;
4. the study configs/study/digits.yaml (study/runner.py): the AR baseline, an iso-parameter Engram model at
   rho 0.5 and the same with its table frozen at N(0,1) (720 steps each; the best val checkpoint is
   exported) -> runs/demo/ar/<run>/; 1000 class-balanced samples each scored with the domain classifier
   (FID, IS, KID, precision/recall, class accuracy) -> runs/demo/samples/<run>/; the gate-clamp, donor and
   table probes on the 297 held-out digits -> runs/demo/probes/<run>/; and the report ->
   runs/demo/report.md with figures in runs/demo/figures/;
5. a summary, ending with the report's sentences about each run against the baseline and where the
   report is.
Interrupted stages resume (tokenizer and AR from last.ckpt, extraction shard by shard, sampling batch
by batch).

`python -m study demo --setup digits64` (`make demo64`) does the same under runs/digits64/ with the
downsample-2 tokenizer (configs/vq/digits64.yaml: 8x8 = 64 tokens per digit) and the study
configs/study/digits64.yaml: the baseline and rho-0.5 Engram with 3 seeds each, the frozen-table and
constant-gate runs with one, intervals across seeds and the reconstruction reference.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from jsonargparse import auto_cli

from study.runner import study
from train.cli import run_stage


@dataclass(frozen=True)
class DemoSetup:
    """One embedded study: where it runs, its tokenizer config and its study YAML (whose `out` is run_dir)."""

    run_dir: Path
    """Everything the setup writes goes under this directory."""
    vq_config: str
    """The tokenizer's training YAML (its save_dir is overridden to <run_dir>/vq)."""
    study_config: str
    """The study YAML `python -m study run --config` takes."""


SETUPS = {
    # 4x4 tokens per digit: `make demo`, about 9 minutes on 2 cores
    "digits": DemoSetup(Path("runs/demo"), "configs/vq/digits.yaml", "configs/study/digits.yaml"),
    # 8x8 tokens per digit, 3 seeds of the baseline and of rho 0.5: `make demo64`, about half an hour
    "digits64": DemoSetup(Path("runs/digits64"), "configs/vq/digits64.yaml", "configs/study/digits64.yaml"),
}


def _fit_tokenizer(run_dir: Path, vq_config: str) -> dict:
    """Fit the tokenizer with LightningCLI unless its export exists; resume a half-finished fit."""
    if not (run_dir / "tokenizer" / "model.safetensors").is_file():
        args = ["fit", "--config", vq_config, "--trainer.logger.init_args.save_dir", str(run_dir)]
        if (run_dir / "checkpoints" / "last.ckpt").is_file():
            args += ["--ckpt_path", "last"]
        run_stage("tokenizer", args)
    return json.loads((run_dir / "metrics.json").read_text())


def extract(run_dir: Path) -> Path:
    """Token shards of both digits splits with the demo tokenizer (each resumable, skipped when done)."""
    from train.data.images import DigitsDataModule
    from train.prepare.extract_tokens import extract_tokens

    tokens = run_dir / "tokens"
    for split in ("train", "val"):
        if not (tokens / split / "meta.json").is_file():
            extract_tokens(str(run_dir / "vq" / "tokenizer"), DigitsDataModule(batch_size=256), str(tokens / split),
                           split=split, views="center", shard_size=500, batch_size=256, accelerator="cpu", devices=1)
    return tokens


def unigram_entropy_bits(shards: Path) -> float:
    """Entropy of the code frequencies over all training tokens: what a model ignoring context achieves."""
    import numpy as np

    from train.data.tokens import token_histogram

    counts = token_histogram(str(shards))
    probs = counts[counts > 0] / counts.sum()
    return float(-(probs * np.log2(probs)).sum())


def prepare_evaluation(run_dir: Path) -> dict:
    """The domain classifier, the reference images and the tokenizer's scores (each skipped when done)."""
    import numpy as np

    from metrics.domain import read_domain_classifier_meta
    from study.domain_classifier import ClassifierTraining, train_domain_classifier
    from tokenizers_vq.files import atomic_write, file_sha256
    from train.data.digits import digits_split

    classifier = run_dir / "domain_classifier"
    try:
        read_domain_classifier_meta(classifier)
    except (FileNotFoundError, ValueError):  # none yet, or one in a format this version no longer loads
        train_domain_classifier(classifier, training=ClassifierTraining(seed=0))  # the embedded digits
    (run_dir / "reference").mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        path = run_dir / "reference" / f"digits_{split}.npz"
        if not path.is_file():
            images = digits_split(split)[0]

            def write(tmp: str, images: np.ndarray = images) -> None:
                with open(tmp, "wb") as handle:  # a file object: np.savez would append .npz to a bare name
                    np.savez(handle, arr_0=images)

            atomic_write(path, write)
    tokenizer_report = run_dir / "vq" / "tokenizer" / "eval_metrics.json"
    weights_sha256 = file_sha256(classifier / "model.safetensors")
    # rFID is a number of one classifier's feature space: a report made with another one is recomputed
    if not tokenizer_report.is_file() or (
            json.loads(tokenizer_report.read_text()).get("extractor", {}).get("weights_sha256") != weights_sha256):
        from metrics.tokenizer_eval import evaluate_tokenizer

        evaluate_tokenizer(str(run_dir / "vq" / "tokenizer"), str(run_dir / "reference" / "digits_val.npz"),
                           extractor="domain-classifier", weights=str(classifier))
    return json.loads(tokenizer_report.read_text())


def _read(path: Path | None) -> dict:
    return json.loads(path.read_text()) if path is not None and path.is_file() else {}


def summarize(run_dir: Path, entropy: float) -> None:
    """One line per run of the study: val NLL, sample metrics and the probes' headline numbers."""
    index = json.loads((run_dir / "study.json").read_text())
    for entry in index["runs"]:
        name, rho = entry["name"], entry["rho"]
        train = _read(run_dir / entry["train_metrics"] if entry["train_metrics"] else None)
        best = train["best"]["value"] / math.log(2)  # the exported model: best val NLL (nats -> bits)
        line = f"[demo] {name:<21} rho {rho:.2f}  val NLL {best:.3f} bits ({100 * (1 - best / entropy):.1f}% below unigram)"
        sample = _read(run_dir / entry["sample_metrics"] if entry["sample_metrics"] else None).get("metrics", {})
        if sample:
            line += (f"  FID {sample['fid']:.2f}  IS {sample['is_mean']:.2f}  "
                     f"class acc {100 * sample['class_accuracy']:.1f}%")
        probe = _read(run_dir / entry["probe_metrics"] if entry["probe_metrics"] else None)
        donors, interventions = probe.get("donors", {}), probe.get("interventions", {})
        if donors and interventions:
            near, collapse = donors["nearest"]["kl"]["mean"], interventions["collapse"]["kl"]["mean"]
            sweep = {e["gate"]: e["nll_bits"]["mean"] for e in probe["gate_sweep"]}
            line += (f"\n[demo] {'':<21} probes: KL nearest donor {near:.3g}, collapse {collapse:.3g} nats; "
                     f"NLL at gate 0 {sweep[0.0]:.3f}, 0.1 {sweep[0.1]:.3f}, as trained "
                     f"{probe['nll_bits']['mean']:.3f} bits")
        print(line)
    summary = _read(run_dir / "summary.json")
    for comparison in summary.get("comparisons", []):
        for sentence in comparison["sentences"]:
            print(f"[demo] {sentence}")


def demo(setup: Literal["digits", "digits64"] = "digits", rerun_changed: bool = False) -> None:
    """Run the whole pipeline and a study on the embedded digits (finished stages are skipped).

    Args:
        setup: `digits` (`make demo`: 4x4 tokens per image, one seed per run, under runs/demo) or `digits64`
            (`make demo64`: 8x8 tokens, the baseline and rho 0.5 with 3 seeds each plus the frozen-table
            and constant-gate runs, under runs/digits64).
        rerun_changed: Redo the study's steps whose settings changed since they ran (the study runner's
            `--rerun_changed`; their old outputs move to <run_dir>/replaced/<time>/) instead of stopping.
    """
    start = time.perf_counter()
    chosen = SETUPS[setup]
    run_dir = chosen.run_dir
    vq = _fit_tokenizer(run_dir / "vq", chosen.vq_config)
    tokens = extract(run_dir)
    tokenizer_scores = prepare_evaluation(run_dir)["metrics"]
    # the study YAML parsed exactly as `python -m study run --config` parses it
    command = "make demo" if setup == "digits" else f"python -m study demo --setup {setup}"
    report = auto_cli(study, args=["--config", chosen.study_config, "--command", command,
                                   f"--rerun_changed={str(rerun_changed).lower()}"], as_positional=False)
    entropy = unigram_entropy_bits(tokens / "train")

    m, t = vq["metrics"], tokenizer_scores
    print(f"\n[demo] tokenizer: val PSNR {m['psnr']:.2f} dB, codebook usage {100 * m['codebook_usage']:.1f}% "
          f"(perplexity {m['codebook_perplexity']:.1f}); on val: SSIM {t['ssim']:.3f}, domain rFID {t['rfid']:.2f}")
    print(f"[demo] unigram entropy of the training tokens: {entropy:.3f} bits/token")
    summarize(run_dir, entropy)
    print(f"[demo] done in {time.perf_counter() - start:.0f} s; everything is under {run_dir}/")
    print(f"[demo] report: {report}")

