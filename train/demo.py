"""`make demo`: the pipeline on the embedded digits, stage by stage, skipping stages already finished.

1. the digits VQ tokenizer (configs/vq/digits.yaml) -> runs/demo/vq/ (reconstructions.png, metrics.json,
   tokenizer/);
2. token shards of the train and val splits (centre view only: mirrored digits are other glyphs) ->
   runs/demo/tokens/;
3. the AR baseline and an iso-parameter Engram model at rho 0.5 (configs/ar/digits_*.yaml, 720 steps
   each, about 2-3 minutes; the best val checkpoint is exported) -> runs/demo/ar/<name>/ (metrics.json,
   samples.png, model/);
4. a summary: best and final val NLL in bits per token against the unigram entropy of the training tokens.
Interrupted stages resume (tokenizer and AR from last.ckpt, extraction shard by shard). Later issues
(sampling, evaluation, probes, the report) extend this file.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from train.cli import run_stage

RUN_DIR = Path("runs/demo")
VQ_CONFIG = "configs/vq/digits.yaml"
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
    from train.token_data import token_histogram

    counts = token_histogram(str(shards))
    probs = counts[counts > 0] / counts.sum()
    return float(-(probs * [math.log2(p) for p in probs]).sum())


def main() -> None:
    start = time.perf_counter()
    vq = _fit("tokenizer", VQ_CONFIG, RUN_DIR / "vq", "tokenizer")
    tokens = extract(RUN_DIR)
    results = {name: _fit("ar", config, RUN_DIR / "ar" / name, "model") for name, config in AR_CONFIGS.items()}
    entropy = unigram_entropy_bits(tokens / "train")

    m = vq["metrics"]
    print(f"\n[demo] tokenizer: val PSNR {m['psnr']:.2f} dB, codebook usage {100 * m['codebook_usage']:.1f}% "
          f"(perplexity {m['codebook_perplexity']:.1f}) -> {RUN_DIR / 'vq' / 'reconstructions.png'}")
    print(f"[demo] unigram entropy of the training tokens: {entropy:.3f} bits/token")
    for name, result in results.items():
        best = result["best"]["value"] / math.log(2)  # the exported model: best val NLL (nats -> bits)
        final = result["metrics"]["bits_per_token"]
        print(f"[demo] AR {name:<14} val NLL {best:.3f} bits/token (best; {100 * (1 - best / entropy):.1f}% below "
              f"unigram), {final:.3f} at step {result['global_step']} -> {RUN_DIR / 'ar' / name / 'samples.png'}")
    print(f"[demo] done in {time.perf_counter() - start:.0f} s; everything is under {RUN_DIR}/")


if __name__ == "__main__":
    main()
