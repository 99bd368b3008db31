"""Decoding speed, every variant in one process on the same inputs: cached decoding (static KV cache,
eager and compiled) vs recomputing the full forward for every token, and the Engram model vs the same
backbone without Engram.

Prints JSON: seconds per generated batch for each, and the ratios (speed-up of the cache, Engram's
overhead). Defaults: a 16x16 grid (256 tokens), a small model that runs on CPU; pass --size / --device
for others (e.g. --size gpt-b --device cuda --batch 64 --compile for the GPU figures in BENCHMARKS.md).
    python benchmarks/decode_cache.py [--size gpt-small] [--device cpu] [--batch 4] [--compile]
"""

from __future__ import annotations

import argparse
import dataclasses
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
    parser.add_argument("--compile", action="store_true", help="also time compiled decoding")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--skip-recompute", action="store_true", help="skip the (slow) full-recompute baseline")
    args = parser.parse_args()
    engram = EngramConfig(layers=(1,), heads_per_order=4, head_dim=32, rows_per_head=4093)
    config = model_config(args.size, block_size=args.grid ** 2, grid=None, engram=engram)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    model = EngramGPT(config).eval().to(args.device, dtype)
    # The same backbone without Engram: identical weights everywhere else.
    backbone = EngramGPT(dataclasses.replace(config, engram=None)).eval().to(args.device, dtype)
    backbone.load_state_dict({k: v for k, v in model.state_dict().items() if ".engram." not in k and k != "code_map"})
    labels = torch.arange(args.batch, device=args.device) % config.num_classes
    sampling = SamplingConfig(cfg_scale=args.cfg_scale)

    def run(net, compile=False):
        return lambda: generate(net, labels, sampling, torch.Generator(args.device).manual_seed(0), compile=compile)

    seconds = {"cached": _time(run(model), args.repeats), "cached_backbone": _time(run(backbone), args.repeats)}
    if args.compile:
        seconds["compiled"] = _time(run(model, True), args.repeats)
        seconds["compiled_backbone"] = _time(run(backbone, True), args.repeats)
    if not args.skip_recompute:
        seconds["full_recompute"] = _time(
            lambda: generate_without_cache(model, labels, sampling, torch.Generator(args.device).manual_seed(0)),
            args.repeats)
    ratios = {"engram_overhead_cached": seconds["cached"] / seconds["cached_backbone"] - 1}
    if "full_recompute" in seconds:
        ratios["cache_speedup"] = seconds["full_recompute"] / seconds["cached"]
    if args.compile:
        ratios["compile_speedup"] = seconds["cached"] / seconds["compiled"]
        ratios["engram_overhead_compiled"] = seconds["compiled"] / seconds["compiled_backbone"] - 1
    rows = args.batch * (2 if sampling.uses_cfg else 1)
    print(json.dumps({
        "benchmark": "decode", "size": args.size, "tokens": config.block_size, "batch": args.batch,
        "rows_through_model": rows, "cfg_scale": args.cfg_scale, "device": args.device, "dtype": args.dtype,
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "seconds_per_batch": {k: round(v, 4) for k, v in seconds.items()},
        "images_per_s": {k: round(args.batch / v, 2) for k, v in seconds.items()},
        "ratios": {k: round(v, 3) for k, v in ratios.items()}}))


if __name__ == "__main__":
    main()
