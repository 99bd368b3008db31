"""Hashing speed: `engram_vision.hashing.hash_rows` over every Engram layer in one call (as
`EngramGPT.engram_rows` does it: one neighbourhood gather, all layers' `HashConstants` together) vs a loop of
one call per layer with that layer's constants alone, in the same process on the same tokens; the script
asserts that both give identical ids.

Two shapes: a training forward (--batch sequences x all grid**2 positions, history = the grid**2 - 1 input
tokens) and a decode step (--decode_rows rows, one position, a full-length history). No model is built:
the constants come from `make_hash_params` with the preset's EngramConfig (default the GPT-B study's two
layers), vocabulary 16384 and 1000 classes (ImageNet with the VQ-16 tokenizer).
Prints JSON: seconds per call, ids per second (ids = rows x positions x heads x layers) and the speed-up of
the stacked call over the loop for each shape (median over alternating rounds, with the rounds' [low, high]).
    python benchmarks/hashing.py [--grid 16] [--batch 8] [--decode_rows 128] [--engram study]
        [--accelerator cpu] [--repeats 20]
"""

from __future__ import annotations

import dataclasses
import json

import torch
from common import BenchmarkArgs, Preset, engram_preset, machine_info, parse_cli, speedup, time_paired

from engram_vision.hashing import hash_constants, hash_rows, make_hash_params

VOCAB_SIZE, NUM_CLASSES = 16384, 1000


@dataclasses.dataclass(frozen=True)
class HashingArgs(BenchmarkArgs):
    """The flags of hashing.py: the shared ones (`common.BenchmarkArgs`; no model is built, so no --size or
    --precision) and its own."""

    batch: int = 8
    """Sequences of the training-forward shape."""
    engram: Preset = "study"
    """Engram memory preset (common.PRESETS) whose layers are hashed: study (the GPT-B study's two layers)
    or small (one layer)."""
    repeats: int = 20
    """Timed rounds (each calls both variants once) after one warm-up."""
    decode_rows: int = 128
    """Rows of the decode-step shape (2 x batch with CFG)."""


def parse(args: list[str] | None = None) -> HashingArgs:
    """The command line (default sys.argv) as `HashingArgs`; `--help` describes every flag."""
    return parse_cli(HashingArgs, args, __doc__)


def main(args: HashingArgs) -> None:
    args.apply_threads()
    config = engram_preset(args.engram, args.rows_per_head)
    grid, cells = (args.grid, args.grid), args.grid ** 2
    # As the model holds them: laid out once, on its device (all layers together, or each layer alone).
    params = [p.to(args.device) for p in make_hash_params(config, VOCAB_SIZE, NUM_CLASSES).values()]
    together_constants = hash_constants(config, params)
    layer_constants = [hash_constants(config, [p]) for p in params]
    rng = torch.Generator().manual_seed(0)
    shapes = {  # name: (history [rows, N], target positions [P])
        "train": (torch.randint(VOCAB_SIZE, (args.batch, cells - 1), generator=rng), torch.arange(cells)),
        "decode": (torch.randint(VOCAB_SIZE, (args.decode_rows, cells), generator=rng), torch.tensor([cells - 1])),
    }
    seconds, ids_per_s, ratios, counts = {}, {}, {}, {}
    for name, (history, positions) in shapes.items():
        history, positions = history.to(args.device), positions.to(args.device)
        labels = torch.arange(history.shape[0], device=args.device) % NUM_CLASSES

        def stacked_call(history=history, positions=positions, labels=labels):
            return hash_rows(history, positions, labels, grid, config, together_constants, pad_id=VOCAB_SIZE)

        def loop_call(history=history, positions=positions, labels=labels):
            return [hash_rows(history, positions, labels, grid, config, c, pad_id=VOCAB_SIZE)[0]
                    for c in layer_constants]

        together, separate = stacked_call(), loop_call()
        if not all(torch.equal(together[i], ids) for i, ids in enumerate(separate)):
            raise AssertionError(f"{name}: all layers at once and one layer at a time give different ids")
        counts[name] = together.numel()  # layers x rows x positions x heads
        timed = time_paired({f"{name}_stacked": stacked_call, f"{name}_loop": loop_call}, args.repeats,
                            args.device)
        seconds.update(timed.best())
        for variant in ("stacked", "loop"):
            ids_per_s[f"{name}_{variant}"] = counts[name] / seconds[f"{name}_{variant}"]
        ratios[f"{name}_stacked_speedup"] = speedup(timed, f"{name}_loop", f"{name}_stacked")
    print(json.dumps({
        "benchmark": "hashing", "engram": args.engram, "layers": list(config.layers),
        "heads_per_layer": config.num_heads, "grid": args.grid, "batch": args.batch,
        "decode_rows": args.decode_rows, "vocab_size": VOCAB_SIZE, "ids_per_call": counts, "identical_ids": True,
        "device": args.device, **machine_info(args.device),
        "seconds_per_call": {k: round(v, 7) for k, v in seconds.items()},
        "ids_per_s": {k: round(v) for k, v in ids_per_s.items()},
        "ratios": ratios}))


if __name__ == "__main__":
    main(parse())
