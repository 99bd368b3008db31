"""`make demo`: the pipeline on the embedded digits, stage by stage, skipping stages already finished.

Stage 1 (this issue): train the digits VQ tokenizer (configs/vq/digits.yaml) -> runs/demo/vq/ with
reconstructions.png, metrics.json (val PSNR, codebook usage) and tokenizer/ (safetensors + config).
Later stages (token extraction, AR training, sampling, evaluation, probes) extend this file.
An interrupted demo resumes from the stage's last.ckpt.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from train.cli import run_stage

RUN_DIR = Path("runs/demo")
VQ_CONFIG = "configs/vq/digits.yaml"


def train_tokenizer(run_dir: Path) -> dict:
    """Fit the digits tokenizer unless its export exists; resume a half-finished fit from last.ckpt."""
    vq_dir = run_dir / "vq"
    if not (vq_dir / "tokenizer" / "model.safetensors").is_file():
        args = ["fit", "--config", VQ_CONFIG, "--trainer.logger.init_args.save_dir", str(vq_dir)]
        if (vq_dir / "checkpoints" / "last.ckpt").is_file():
            args += ["--ckpt_path", "last"]
        run_stage("tokenizer", args)
    return json.loads((vq_dir / "metrics.json").read_text())


def main() -> None:
    start = time.perf_counter()
    vq = train_tokenizer(RUN_DIR)
    metrics = vq["metrics"]
    print(f"\n[demo] tokenizer: val PSNR {metrics['psnr']:.2f} dB, codebook usage "
          f"{100 * metrics['codebook_usage']:.1f}% (perplexity {metrics['codebook_perplexity']:.1f}) "
          f"after {vq['global_step']} steps")
    print(f"[demo] reconstructions: {RUN_DIR / 'vq' / 'reconstructions.png'}")
    print(f"[demo] metrics:         {RUN_DIR / 'vq' / 'metrics.json'}")
    print(f"[demo] tokenizer:       {RUN_DIR / 'vq' / 'tokenizer'}")
    print(f"[demo] done in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
