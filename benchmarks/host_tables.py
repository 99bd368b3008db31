"""Host-offload overhead: the same Engram model (identical weights) with its tables on the device
(EngramConfig.table_device="device") vs in pinned host memory ("host", `engram_vision/host_table.py`),
timed in the same process: seconds per generated batch (`sample.generate.generate`, eager: host tables
cannot be compiled) and per training step (as benchmarks/train_step.py: forward, cross-entropy, backward,
AdamW). On CUDA it also reports the peak GPU memory of each (one model alive at a time).

On CPU both variants keep their tables in host memory, so the CPU figure only measures the extra code path
(fetch objects, the custom autograd function, the host gradient); the real figure needs --accelerator cuda.
Prints JSON: seconds for each, and offload_overhead_decode / offload_overhead_train (t_host / t_device - 1).
    python benchmarks/host_tables.py [--size gpt-small] [--engram small] [--grid 16] [--batch 4]
        [--accelerator cpu] [--precision 32-true] [--repeats 2] [--cfg_scale 2.0]
e.g. the GPT-B study's tables on a GPU:
    python benchmarks/host_tables.py --size gpt-b --engram study --accelerator cuda --precision bf16-true \\
        --batch 32
"""

from __future__ import annotations

import dataclasses
import gc
import json

import torch
from common import (
    ModelBenchmarkArgs,
    build_config,
    generate_fn,
    machine_info,
    parse_cli,
    rounded,
    time_call,
    train_step_fn,
)

from engram_vision.model import EngramGPT

VARIANTS = ("device", "host")


@dataclasses.dataclass(frozen=True)
class HostTablesArgs(ModelBenchmarkArgs):
    """The flags of host_tables.py: the shared ones (`common.ModelBenchmarkArgs`) and its own."""

    batch: int = 4
    """Images per generated batch and sequences per training step."""
    repeats: int = 2
    """Timed calls of each variant and job after one warm-up."""
    cfg_scale: float = 2.0
    """Classifier-free guidance scale of the generated batches (1.0: no CFG)."""


def parse(args: list[str] | None = None) -> HostTablesArgs:
    """The command line (default sys.argv) as `HostTablesArgs`; `--help` describes every flag."""
    return parse_cli(HostTablesArgs, args, __doc__)


def main(args: HostTablesArgs) -> None:
    args.apply_threads()
    dtype = args.dtype
    cuda = torch.device(args.device).type == "cuda"
    config = build_config(args.size, args.grid, args.engram, args.rows_per_head)
    torch.manual_seed(0)
    weights = EngramGPT(config).state_dict()  # on the host; both variants load it

    def build(table_device: str, weight_dtype: torch.dtype) -> EngramGPT:
        engram = dataclasses.replace(config.engram, table_device=table_device)
        model = EngramGPT(dataclasses.replace(config, engram=engram)).eval()
        model.load_state_dict(weights)
        return model.to(args.device, weight_dtype)

    def measure(job: str, table_device: str) -> tuple[float, float | None]:
        """(seconds per call, peak GPU MiB or None) with only this variant's model alive."""
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(args.device)
        if job == "decode":  # weights in the dtype, as decode_cache.py
            fn = generate_fn(build(table_device, dtype), args.batch, args.cfg_scale, args.device)
        else:  # fp32 weights, bf16 autocast when asked, as train_step.py
            fn = train_step_fn(build(table_device, torch.float32), args.batch, args.device, dtype)
        seconds = time_call(fn, args.repeats, args.device)
        return seconds, (torch.cuda.max_memory_allocated(args.device) / 2 ** 20 if cuda else None)

    seconds, peak_mib = {}, {}
    for job in ("decode", "train"):
        for table_device in VARIANTS:
            seconds[f"{job}_{table_device}"], peak_mib[f"{job}_{table_device}"] = measure(job, table_device)
    ratios = {f"offload_overhead_{job}": seconds[f"{job}_host"] / seconds[f"{job}_device"] - 1
              for job in ("decode", "train")}
    table_bytes = sum(v.numel() * v.element_size() for k, v in weights.items() if k.endswith("engram.table.weight"))
    print(json.dumps({
        "benchmark": "host_tables", "size": args.size, "engram": args.engram,
        "rows_per_head": config.engram.rows_per_head, "table_mib_fp32": round(table_bytes / 2 ** 20, 1),
        "grid": args.grid, "batch": args.batch, "cfg_scale": args.cfg_scale, "device": args.device,
        "dtype": args.dtype_name, **machine_info(args.device),
        "seconds_per_batch": {k.removeprefix("decode_"): round(v, 4) for k, v in seconds.items()
                              if k.startswith("decode")},
        "seconds_per_step": {k.removeprefix("train_"): round(v, 4) for k, v in seconds.items()
                             if k.startswith("train")},
        "peak_gpu_mib": rounded(peak_mib, 1) if cuda else None,
        "ratios": rounded(ratios, 3)}))


if __name__ == "__main__":
    main(parse())
