"""Decoding speed, every variant in one process on the same inputs: cached decoding (static KV cache,
eager and compiled) vs recomputing the full forward for every token, and the Engram model vs the same
backbone without Engram.

Prints JSON: seconds per generated batch for each (fastest call), and the ratios: the compile speed-up as
the median over alternating whole generations with the rounds' [low, high] (`common.PairedTimes`);
Engram's overhead from generations run in lockstep, each model advancing 16 tokens in turn
(`lockstep_decode`), median and [low, high] over rounds; the cache's speed-up over full recompute (timed
apart: it is slow) from the fastest calls. `fraction_of_bandwidth_floor`: the least time the decode steps
can take at the measured copy bandwidth (weights plus the KV cache written so far, every step:
`bandwidth_floor.py`) over the lockstep decode-step time; 1.0 would be at the floor.
Defaults: a 16x16 grid (256 tokens), a small model with one small Engram layer that runs on CPU;
pass --size / --accelerator / --engram for others (e.g. --size gpt-b --engram study --accelerator cuda
--precision bf16-true --batch 64 --compile true for the GPU figures in BENCHMARKS.md).
    python benchmarks/decode_cache.py [--size gpt-small] [--engram small] [--accelerator cpu] [--batch 4]
        [--compile true] [--skip_recompute true]
"""

from __future__ import annotations

import dataclasses
import json
import time

import torch
from bandwidth_floor import generation_floor_bytes, measure_bandwidth
from common import (
    ModelBenchmarkArgs,
    PairedTimes,
    generate_fn,
    machine_info,
    model_pair,
    overhead,
    parse_cli,
    rounded,
    speedup,
    synchronize,
    time_call,
    time_paired,
)

from engram_vision.model import EngramGPT
from sample.generate import decode_one_token, decode_setup, prefill
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


@torch.no_grad()
def lockstep_decode(variants: dict[str, tuple[EngramGPT, bool]], batch: int, sampling: SamplingConfig,
                    device: str, rounds: int, chunk: int = 16) -> PairedTimes:
    """Decode-step seconds of every variant (name: (model, compiled)), generated in lockstep: each round
    samples one batch with every model, advancing them in turns of `chunk` tokens (variants in an order
    that rotates per turn) and timing each turn. A round's figure is the sum of its decode steps (the
    prefill, one forward, is left out). Machine-speed swings slower than a turn hit every variant alike,
    which whole generations timed one after another cannot promise; a turn of several steps keeps each
    model's weights in cache as a real generation does (switching model every step would charge each step
    a cold start). All models share one config's grid and classes."""
    config = next(iter(variants.values()))[0].config
    labels = torch.arange(batch, device=device) % config.num_classes
    num_steps = config.block_size
    names = list(variants)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(rounds + 1):  # round 0 warms up (and compiles)
        states, forwards, tokens, rngs = {}, {}, {}, {}
        for name, (model, compiled) in variants.items():
            states[name], forwards[name] = decode_setup(model, labels, sampling, compiled)
            rngs[name] = torch.Generator(device).manual_seed(0)
            tokens[name] = prefill(model, labels, states[name], sampling, rngs[name], num_steps)
        spent = dict.fromkeys(names, 0.0)
        for turn, first in enumerate(range(1, num_steps, chunk)):
            for name in names[turn % len(names):] + names[:turn % len(names)]:
                model = variants[name][0]
                synchronize(device)
                start = time.perf_counter()
                for step in range(first, min(first + chunk, num_steps)):
                    tokens[name] = decode_one_token(model, tokens[name], labels, states[name], step, num_steps,
                                                    sampling, rngs[name], forwards[name])
                synchronize(device)
                spent[name] += time.perf_counter() - start
        if round_index > 0:
            for name in names:
                times[name].append(spent[name])
    return PairedTimes(times)


@dataclasses.dataclass(frozen=True)
class DecodeArgs(ModelBenchmarkArgs):
    """The flags of decode_cache.py: the shared ones (`common.ModelBenchmarkArgs`) and its own."""

    batch: int = 4
    """Images generated per batch (labels 0..batch-1); with CFG twice as many rows go through the model."""
    repeats: int = 2
    """Timed generations (and lockstep rounds) of each variant after one warm-up."""
    cfg_scale: float = 2.0
    """Classifier-free guidance scale (1.0: no CFG, one row per image)."""
    compile: bool = False
    """Also time compiled decoding (CUDA graphs on CUDA)."""
    skip_recompute: bool = False
    """Skip the (slow) full-recompute baseline."""
    bandwidth_mib: int = 1024
    """Size in MiB of the copy that measures memory bandwidth (well above the caches)."""


def parse(args: list[str] | None = None) -> DecodeArgs:
    """The command line (default sys.argv) as `DecodeArgs`; `--help` describes every flag."""
    return parse_cli(DecodeArgs, args, __doc__)


def main(args: DecodeArgs) -> None:
    args.apply_threads()
    model, backbone = model_pair(args.size, args.grid, args.engram, args.device, args.dtype,
                                 rows_per_head=args.rows_per_head)
    config = model.config
    sampling = SamplingConfig(cfg_scale=args.cfg_scale)

    # Every variant as (model, compiled): timed as whole generations and, for the overhead, in lockstep.
    pairs = {"cached": (model, False), "cached_backbone": (backbone, False)}
    if args.compile:
        pairs.update(compiled=(model, True), compiled_backbone=(backbone, True))
    timed = time_paired({name: generate_fn(net, args.batch, args.cfg_scale, args.device, compile=compiled)
                         for name, (net, compiled) in pairs.items()}, args.repeats, args.device)
    seconds = timed.best()
    ratios: dict[str, object] = {"compile_speedup": speedup(timed, "cached", "compiled")} if args.compile else {}
    steps = lockstep_decode(pairs, args.batch, sampling, args.device, args.repeats)
    step_seconds = steps.best()
    ratios["engram_overhead_cached"] = overhead(steps, "cached", "cached_backbone")
    if args.compile:
        ratios["engram_overhead_compiled"] = overhead(steps, "compiled", "compiled_backbone")
    if not args.skip_recompute:
        labels = torch.arange(args.batch, device=args.device) % config.num_classes
        seconds["full_recompute"] = time_call(
            lambda: generate_without_cache(model, labels, sampling, torch.Generator(args.device).manual_seed(0)),
            args.repeats, args.device)
        ratios["cache_speedup"] = round(seconds["full_recompute"] / seconds["cached"], 2)
    rows = args.batch * (2 if sampling.uses_cfg else 1)
    # The bandwidth floor of the decode steps (bandwidth_floor.py) against the lockstep decode-step times.
    bandwidth = measure_bandwidth(args.device, mib=args.bandwidth_mib)
    floors = {name: generation_floor_bytes(net, rows, args.dtype) / bandwidth for name, (net, _) in pairs.items()}
    print(json.dumps({
        "benchmark": "decode", "size": args.size, "engram": args.engram,
        "rows_per_head": config.engram.rows_per_head, "tokens": config.block_size,
        "batch": args.batch, "rows_through_model": rows, "cfg_scale": args.cfg_scale, "device": args.device,
        "dtype": args.dtype_name, **machine_info(args.device),
        "seconds_per_batch": rounded(seconds, 4),
        "lockstep_decode_step_seconds": rounded(step_seconds, 4),
        "images_per_s": {k: round(args.batch / v, 2) for k, v in seconds.items()},
        "copy_bandwidth_gb_per_s": round(bandwidth / 1e9, 2),
        "bandwidth_floor_seconds": rounded(floors, 4),
        "fraction_of_bandwidth_floor": {k: round(floors[k] / v, 3) for k, v in step_seconds.items()},
        "ratios": ratios}))


if __name__ == "__main__":
    main(parse())
