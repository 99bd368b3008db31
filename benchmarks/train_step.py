"""Training speed: one optimizer step (forward on tokens [B, T-1] and labels, cross-entropy on the T
targets, backward, AdamW over `engram_vision.param_groups`) of the Engram model vs the same backbone without
Engram (identical weights elsewhere), eager and, with --compile true, `model.compile()` (fresh copies).

Prints JSON: seconds per step, target tokens per second (B x grid**2), model FLOPs per step (3 x
`engram_vision.budget.flops_per_token` x tokens: forward plus a backward of twice its cost), MFU against
--peak_flops or, on CUDA, Lightning's table of the GPU's peak for the dtype, and the ratios
engram_overhead_eager / engram_overhead_compiled (t_engram / t_backbone - 1) and compile_speedup (Engram
model, eager over compiled), each the median over alternating rounds with the rounds' [low, high]
(`common.PairedTimes`); seconds are each variant's fastest call. --precision bf16-true (dtype bfloat16
in the JSON) is bf16 autocast over fp32 weights (as bf16-mixed training).
    python benchmarks/train_step.py [--size gpt-small] [--grid 16] [--batch 8] [--engram small]
        [--accelerator cpu] [--precision 32-true] [--repeats 3] [--compile true] [--peak_flops FLOPS]
e.g. the GPT-B study on a GPU:
    python benchmarks/train_step.py --size gpt-b --engram study --accelerator cuda --precision bf16-true \\
        --batch 32 --compile true
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable

import torch
from common import (
    ModelBenchmarkArgs,
    build_config,
    machine_info,
    model_pair,
    overhead,
    parse_cli,
    rounded,
    speedup,
    time_paired,
    train_step_fn,
)
from lightning.fabric.utilities.throughput import get_available_flops

from engram_vision.budget import flops_per_token


def peak_flops(device: str, dtype: torch.dtype, given: float | None) -> float | None:
    """--peak_flops, else Lightning's figure for a known GPU, else None (CPUs: no MFU)."""
    if given is not None:
        return given
    if torch.device(device).type != "cuda":
        return None
    peak = get_available_flops(torch.device(device), dtype)
    return None if peak is None else float(peak)


@dataclasses.dataclass(frozen=True)
class TrainStepArgs(ModelBenchmarkArgs):
    """The flags of train_step.py: the shared ones (`common.ModelBenchmarkArgs`, batch 8, 3 rounds) and its
    own."""

    compile: bool = False
    """Also time model.compile()d copies."""
    peak_flops: float | None = None
    """The device's peak FLOP/s for the dtype, for MFU (None: Lightning's figure for a known GPU, none on CPU)."""


def parse(args: list[str] | None = None) -> TrainStepArgs:
    """The command line (default sys.argv) as `TrainStepArgs`; `--help` describes every flag."""
    return parse_cli(TrainStepArgs, args, __doc__)


def main(args: TrainStepArgs) -> None:
    args.apply_threads()
    dtype = args.dtype

    def steps(compile: bool, suffix: str) -> dict[str, Callable[[], None]]:
        # Fresh fp32 copies per mode (autocast supplies bf16), so compiled and eager runs share nothing.
        model, backbone = model_pair(args.size, args.grid, args.engram, args.device, torch.float32,
                                     rows_per_head=args.rows_per_head)
        if compile:
            model.compile()
            backbone.compile()
        return {f"engram{suffix}": train_step_fn(model, args.batch, args.device, dtype),
                f"backbone{suffix}": train_step_fn(backbone, args.batch, args.device, dtype)}

    variants = steps(False, "")
    if args.compile:
        variants.update(steps(True, "_compiled"))
    timed = time_paired(variants, args.repeats, args.device)
    seconds = timed.best()
    config = build_config(args.size, args.grid, args.engram, args.rows_per_head)
    backbone_config = dataclasses.replace(config, engram=None)
    tokens = args.batch * config.block_size
    flops = {"engram": 3 * flops_per_token(config) * tokens, "backbone": 3 * flops_per_token(backbone_config) * tokens}
    peak = peak_flops(args.device, dtype, args.peak_flops)
    mfu = {} if peak is None else {k: flops[k.removesuffix("_compiled")] / v / peak for k, v in seconds.items()}
    ratios = {"engram_overhead_eager": overhead(timed, "engram", "backbone")}
    if args.compile:
        ratios["engram_overhead_compiled"] = overhead(timed, "engram_compiled", "backbone_compiled")
        ratios["compile_speedup"] = speedup(timed, "engram", "engram_compiled")
    print(json.dumps({
        "benchmark": "train_step", "size": args.size, "engram": args.engram,
        "rows_per_head": config.engram.rows_per_head, "grid": args.grid, "batch": args.batch,
        "tokens_per_step": tokens, "device": args.device, "dtype": args.dtype_name, **machine_info(args.device),
        "seconds_per_step": rounded(seconds, 4),
        "tokens_per_s": {k: round(tokens / v, 1) for k, v in seconds.items()},
        "flops_per_step": {k: int(v) for k, v in flops.items()},
        "peak_flops": peak, "mfu": rounded(mfu, 4) if mfu else None,
        "ratios": ratios}))


if __name__ == "__main__":
    main(parse())
