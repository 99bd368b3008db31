"""Cached decoding vs recomputing the full forward for every token, in one process, same model and inputs.

Prints JSON: seconds per generated sequence for both, and the speed-up ratio. Defaults: a 16x16 grid
(256 tokens), a small Engram model that runs on CPU; pass --size / --device for others.
    python benchmarks/decode_cache.py [--size gpt-small] [--device cpu] [--batch 4]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from engram_vision.config import EngramConfig, model_config
from engram_vision.model import EngramGPT
from sample.generate import generate
from sample.sampling import SamplingConfig, cfg_mix, sample_next


@torch.no_grad()
def generate_without_cache(model: EngramGPT, labels: torch.Tensor, sampling: SamplingConfig,
                           rng: torch.Generator) -> torch.Tensor:
    """The baseline: one full forward over the whole prefix per new token (O(L^2) work)."""
    tokens = torch.zeros(labels.shape[0], 0, dtype=torch.long, device=labels.device)
    null = torch.full_like(labels, model.config.num_classes)
    for _ in range(model.config.block_size):
        logits = model(tokens, labels)[:, -1]
        if sampling.uses_cfg:
            logits = cfg_mix(logits, model(tokens, null)[:, -1], sampling.cfg_scale)
        tokens = torch.cat([tokens, sample_next(logits, sampling, rng)[:, None]], dim=1)
    return tokens


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", default="gpt-small")
    parser.add_argument("--grid", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--cfg-scale", type=float, default=2.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    engram = EngramConfig(layers=(1,), heads_per_order=4, head_dim=32, rows_per_head=4093)
    config = model_config(args.size, block_size=args.grid ** 2, grid=None, engram=engram)
    torch.manual_seed(0)
    model = EngramGPT(config).eval().to(args.device)
    labels = torch.arange(args.batch, device=args.device) % config.num_classes
    sampling = SamplingConfig(cfg_scale=args.cfg_scale)

    def cached():
        return generate(model, labels, sampling, torch.Generator(args.device).manual_seed(0))

    def uncached():
        return generate_without_cache(model, labels, sampling, torch.Generator(args.device).manual_seed(0))

    t_cached, t_uncached = _time(cached, args.repeats), _time(uncached, args.repeats)
    print(json.dumps({
        "benchmark": "decode_cache", "size": args.size, "tokens": config.block_size, "batch": args.batch,
        "cfg_scale": args.cfg_scale, "device": args.device, "torch": torch.__version__,
        "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
        "seconds_cached": round(t_cached, 3), "seconds_full_recompute": round(t_uncached, 3),
        "speedup": round(t_uncached / t_cached, 2)}))


if __name__ == "__main__":
    main()
