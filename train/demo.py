"""`make demo`: the pipeline on the embedded digits, stage by stage, skipping stages already finished.

1. the digits VQ tokenizer (configs/vq/digits.yaml) -> runs/demo/vq/ (reconstructions.png, metrics.json,
   tokenizer/);
2. token shards of the train and val splits (centre view only: mirrored digits are other glyphs) ->
   runs/demo/tokens/;
3. the AR baseline and an iso-parameter Engram model at rho 0.5 (configs/ar/digits_*.yaml, 720 steps
   each, about 2-3 minutes; the best val checkpoint is exported) -> runs/demo/ar/<name>/ (metrics.json,
   samples.png, model/);
4. a domain classifier for digits (metrics/domain.py) -> runs/demo/domain_classifier/, and the tokenizer's
   PSNR, SSIM and rFID on the val images -> runs/demo/vq/tokenizer/eval_metrics.json;
5. 1000 class-balanced samples per AR model (configs/sample/digits.yaml) -> runs/demo/samples/<name>/,
   scored against the training images with the domain classifier: FID, IS, KID, precision/recall and
   class accuracy -> runs/demo/samples/<name>/metrics.json;
6. a summary: val NLL against the unigram entropy of the training tokens, and the sample metrics.
Interrupted stages resume (tokenizer and AR from last.ckpt, extraction shard by shard, sampling batch
by batch). Later issues (probes, the report) extend this file.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from train.cli import run_stage

RUN_DIR = Path("runs/demo")
VQ_CONFIG = "configs/vq/digits.yaml"
SAMPLE_CONFIG = "configs/sample/digits.yaml"
AR_CONFIGS = {"baseline": "configs/ar/digits_baseline.yaml", "engram_rho0.5": "configs/ar/digits_engram_rho0.5.yaml"}


def _fit(stage: str, config: str, run_dir: Path, export: str) -> dict:
    """Fit with LightningCLI unless `run_dir/export` exists; resume a half-finished fit from last.ckpt."""
    if not (run_dir / export / "model.safetensors").is_file():
        args = ["fit", "--config", config, "--trainer.logger.init_args.save_dir", str(run_dir)]
        if (run_dir / "checkpoints" / "last.ckpt").is_file():
            args += ["--ckpt_path", "last"]
        run_stage(stage, args)
    return json.loads((run_dir / "metrics.json").read_text())


def extract(run_dir: Path) -> Path:
    """Token shards of both digits splits with the demo tokenizer (each resumable, skipped when done)."""
    from train.extract_tokens import extract_tokens
    from train.image_data import DigitsDataModule

    tokens = run_dir / "tokens"
    for split in ("train", "val"):
        if not (tokens / split / "meta.json").is_file():
            extract_tokens(str(run_dir / "vq" / "tokenizer"), DigitsDataModule(batch_size=256), str(tokens / split),
                           split=split, views="center", shard_size=500, batch_size=256, accelerator="cpu", devices=1)
    return tokens


def unigram_entropy_bits(shards: Path) -> float:
    """Entropy of the code frequencies over all training tokens: what a model ignoring context achieves."""
    import numpy as np

    from train.token_data import token_histogram

    counts = token_histogram(str(shards))
    probs = counts[counts > 0] / counts.sum()
    return float(-(probs * np.log2(probs)).sum())


def score_samples(run_dir: Path, names: list[str]) -> dict[str, dict]:
    """Sample every AR model and score it with the digits domain classifier (each step skipped when done)."""
    import numpy as np

    from metrics.domain import train_domain_classifier
    from metrics.evaluate import evaluate
    from sample.__main__ import main as sample_main
    from train.digits import digits_split

    classifier = run_dir / "domain_classifier"
    if not (classifier / "model.safetensors").is_file():
        train_domain_classifier(classifier, seed=0)
    reference = run_dir / "reference" / "digits_train.npz"
    if not reference.is_file():
        reference.parent.mkdir(parents=True, exist_ok=True)
        np.savez(reference, arr_0=digits_split("train")[0])
    val = run_dir / "reference" / "digits_val.npz"
    if not val.is_file():
        np.savez(val, arr_0=digits_split("val")[0])
    tokenizer_report = run_dir / "vq" / "tokenizer" / "eval_metrics.json"
    if not tokenizer_report.is_file():
        from metrics.tokenizer_eval import evaluate_tokenizer

        evaluate_tokenizer(str(run_dir / "vq" / "tokenizer"), str(val), extractor="digits-classifier",
                           weights=str(classifier))
    results = {"tokenizer": json.loads(tokenizer_report.read_text())}
    for name in names:
        out = run_dir / "samples" / name
        if not (out / "metrics.json").is_file():
            # Sampling resumes by itself: on a finished folder it only reassembles samples.npz.
            sample_main(["--config", SAMPLE_CONFIG, "--model", str(run_dir / "ar" / name / "model"),
                         "--out", str(out)])
            evaluate(str(out), str(reference), extractor="digits-classifier", weights=str(classifier),
                     metrics="fid,is,kid,prc,acc", device="cpu", cache_dir=str(run_dir / "reference"),
                     kid_subset_size=500)
        results[name] = json.loads((out / "metrics.json").read_text())
    return results


def main() -> None:
    start = time.perf_counter()
    vq = _fit("tokenizer", VQ_CONFIG, RUN_DIR / "vq", "tokenizer")
    tokens = extract(RUN_DIR)
    results = {name: _fit("ar", config, RUN_DIR / "ar" / name, "model") for name, config in AR_CONFIGS.items()}
    entropy = unigram_entropy_bits(tokens / "train")
    scores = score_samples(RUN_DIR, list(AR_CONFIGS))

    m = vq["metrics"]
    print(f"\n[demo] tokenizer: val PSNR {m['psnr']:.2f} dB, codebook usage {100 * m['codebook_usage']:.1f}% "
          f"(perplexity {m['codebook_perplexity']:.1f}) -> {RUN_DIR / 'vq' / 'reconstructions.png'}")
    print(f"[demo] unigram entropy of the training tokens: {entropy:.3f} bits/token")
    for name, result in results.items():
        best = result["best"]["value"] / math.log(2)  # the exported model: best val NLL (nats -> bits)
        final = result["metrics"]["bits_per_token"]
        print(f"[demo] AR {name:<14} val NLL {best:.3f} bits/token (best; {100 * (1 - best / entropy):.1f}% below "
              f"unigram), {final:.3f} at step {result['global_step']} -> {RUN_DIR / 'ar' / name / 'samples.png'}")
    t = scores.pop("tokenizer")["metrics"]
    print(f"[demo] tokenizer on val: PSNR {t['psnr']:.2f} dB, SSIM {t['ssim']:.3f}, domain rFID {t['rfid']:.2f}")
    for name, report in scores.items():
        m = report["metrics"]
        print(f"[demo] samples {name:<14} domain FID {m['fid']:.2f}, IS {m['inception_score_mean']:.2f}, "
              f"class accuracy {100 * m['class_accuracy']:.1f}%, precision {m['precision']:.2f}, recall "
              f"{m['recall']:.2f} ({report['samples']['num_samples']} samples) -> "
              f"{RUN_DIR / 'samples' / name / 'metrics.json'}")
    print(f"[demo] done in {time.perf_counter() - start:.0f} s; everything is under {RUN_DIR}/")


if __name__ == "__main__":
    main()
