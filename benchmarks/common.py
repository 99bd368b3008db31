"""Shared pieces of the benchmark scripts: the Engram presets, an Engram model and the same backbone without
Engram (identical weights elsewhere), one training step, one generated batch, timers that synchronise on CUDA
(`time_paired` alternates variants and compares them round by round), a description of the machine for
the JSON, and the flags every script shares (`BenchmarkArgs`, `ModelBenchmarkArgs`: dataclasses that
`parse_cli` reads from the command line with jsonargparse, one `--field value` per field).

The scripts import this as `common` (run them as `python benchmarks/<name>.py`, which puts this folder on
the path); it prints nothing and measures nothing itself. Models are `engram_vision`, sampling `sample`.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import time
from collections.abc import Callable
from typing import Literal, TypeVar, get_args

import torch
import torch.nn.functional as F
from jsonargparse import DefaultHelpFormatter, auto_cli, set_parsing_settings

from engram_vision.config import MODEL_SIZES, EngramConfig, ModelConfig, model_config
from engram_vision.model import EngramGPT
from engram_vision.param_groups import adamw
from metrics.features import accelerator_device
from sample.generate import generate
from sample.sampling import SamplingConfig

PRESETS: dict[str, EngramConfig] = {
    # One small Engram layer: what the CPU decoding figures in BENCHMARKS.md use.
    "small": EngramConfig(layers=(1,), heads_per_order=4, head_dim=32, rows_per_head=4093),
    # The GPT-B study's memory (configs/ar/gpt_b_imagenet256_engram_rho0.5.yaml): needs >= 7 blocks.
    "study": EngramConfig(layers=(1, 6), neighborhoods=(("L", "U"), ("L", "U", "UL", "UR")), heads_per_order=8,
                          head_dim=32, rows_per_head=53714),
}
Preset = Literal["small", "study"]  # the names in PRESETS, for the --engram flag
if set(get_args(Preset)) != set(PRESETS):
    raise RuntimeError(f"common.Preset {get_args(Preset)} must name the presets {sorted(PRESETS)}")
Accelerator = Literal["cpu", "cuda", "gpu", "auto"]
Precision = Literal["32-true", "bf16-true"]
DTYPES: dict[str, str] = {"32-true": "float32", "bf16-true": "bfloat16"}  # precision -> torch dtype name
ArgsT = TypeVar("ArgsT", bound="BenchmarkArgs")


def engram_preset(name: str, rows_per_head: int | None = None) -> EngramConfig:
    """The named Engram memory (`PRESETS`), optionally with another table size per head."""
    if name not in PRESETS:
        raise ValueError(f"unknown Engram preset {name!r}; choose one of {sorted(PRESETS)}")
    preset = PRESETS[name]
    return preset if rows_per_head is None else dataclasses.replace(preset, rows_per_head=rows_per_head)


def build_config(size: str, grid: int, preset: str, rows_per_head: int | None = None,
                 table_device: str = "device") -> ModelConfig:
    """`size` on a grid x grid token grid with the preset's Engram layers (tables on `table_device`)."""
    engram = dataclasses.replace(engram_preset(preset, rows_per_head), table_device=table_device)
    depth = MODEL_SIZES[size].n_layer if size in MODEL_SIZES else None
    if depth is not None and max(engram.layers) >= depth:
        fits = sorted(name for name, c in MODEL_SIZES.items() if c.n_layer > max(engram.layers))
        raise ValueError(f"Engram preset {preset!r} puts Engram in blocks {engram.layers}, but {size} has only "
                         f"{depth} blocks; use a size with >= {max(engram.layers) + 1} ({', '.join(fits)})")
    return model_config(size, block_size=grid ** 2, grid=None, engram=engram)


def model_pair(size: str, grid: int, preset: str, device: str, dtype: torch.dtype, table_device: str = "device",
               rows_per_head: int | None = None, seed: int = 0) -> tuple[EngramGPT, EngramGPT]:
    """(Engram model, the same backbone without Engram), both in eval mode on `device` in `dtype`, with
    identical weights outside the Engram layers."""
    config = build_config(size, grid, preset, rows_per_head, table_device)
    torch.manual_seed(seed)
    model = EngramGPT(config).eval().to(device, dtype)
    backbone = EngramGPT(dataclasses.replace(config, engram=None)).eval().to(device, dtype)
    backbone.load_state_dict(model.backbone_state_dict())
    return model, backbone


def autocast(device: str, dtype: torch.dtype) -> torch.autocast:
    """bf16 mixed precision (fp32 weights) when dtype is bfloat16, else a no-op context."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)


def train_step_fn(model: EngramGPT, batch: int, device: str, dtype: torch.dtype, lr: float = 1e-4,
                  weight_decay: float = 0.05, seed: int = 0) -> Callable[[], None]:
    """One optimizer step as training takes it (train/lit_ar.py): forward on tokens [B, T-1] and labels [B]
    (under bf16 autocast when dtype is bfloat16), cross-entropy on all T targets, backward, AdamW over
    `engram_vision.param_groups.adamw` (as LitAR). Puts the model in train mode; the batch is fixed random tokens."""
    config = model.config
    rng = torch.Generator().manual_seed(seed)
    tokens = torch.randint(config.vocab_size, (batch, config.block_size), generator=rng).to(device)
    labels = torch.randint(config.num_classes, (batch,), generator=rng).to(device)
    optimizer = adamw(model, lr, (0.9, 0.95), weight_decay)
    model.train()

    def step() -> None:
        with autocast(device, dtype):
            logits = model(tokens[:, :-1], labels)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def generate_fn(model: EngramGPT, batch: int, cfg_scale: float, device: str,
                compile: bool = False) -> Callable[[], torch.Tensor]:
    """One generated batch (`sample.generate.generate`, static KV cache) of labels 0..batch-1, seed 0."""
    labels = torch.arange(batch, device=device) % model.config.num_classes
    sampling = SamplingConfig(cfg_scale=cfg_scale)
    return lambda: generate(model, labels, sampling, torch.Generator(device).manual_seed(0), compile=compile)


def synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], repeats: int, device: str, warmup: int = 1) -> float:
    """Seconds per call of `fn`, averaged over `repeats` calls after `warmup` untimed ones (compiles and
    lazy allocations happen there); on CUDA the timed region starts and ends with a synchronize."""
    if repeats < 1:
        raise ValueError(f"time_call: repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / repeats


@dataclasses.dataclass
class PairedTimes:
    """Seconds of every call of each variant, round by round (round r called every variant once)."""

    rounds: dict[str, list[float]]

    def best(self) -> dict[str, float]:
        """The fastest call of each variant: the least disturbed estimate of its own time (as `timeit`)."""
        return {name: min(times) for name, times in self.rounds.items()}

    def ratio(self, numerator: str, denominator: str) -> dict[str, float]:
        """t_numerator / t_denominator from calls made next to each other: the median over rounds of the
        round's ratio, with the lowest and highest round as the interval. The machine's speed drifts by tens
        of percent over minutes on shared hosts; a ratio within one round cancels the drift, a ratio of two
        minima taken at different moments does not."""
        per_round = sorted(a / b for a, b in zip(self.rounds[numerator], self.rounds[denominator], strict=True))
        return {"median": statistics.median(per_round), "low": per_round[0], "high": per_round[-1]}


def time_paired(fns: dict[str, Callable[[], object]], repeats: int, device: str,
                warmup: int = 1) -> PairedTimes:
    """Every call of each of `fns`, timed in alternation (round r calls every fn once, in an order that
    rotates between rounds so no variant always runs first): other load on the machine then slows every
    variant alike instead of one. `PairedTimes.ratio` compares two of them, `.best` gives each one's time."""
    if repeats < 1:
        raise ValueError(f"time_paired: repeats must be >= 1, got {repeats}")
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    names = list(fns)
    rounds: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            synchronize(device)
            start = time.perf_counter()
            fns[name]()
            synchronize(device)
            rounds[name].append(time.perf_counter() - start)
    return PairedTimes(rounds)


def overhead(timed: PairedTimes, variant: str, baseline: str) -> dict[str, float]:
    """t_variant / t_baseline - 1 (median over rounds, with the round interval), rounded for the JSON."""
    return {k: round(v - 1, 3) for k, v in timed.ratio(variant, baseline).items()}


def speedup(timed: PairedTimes, slow: str, fast: str) -> dict[str, float]:
    """t_slow / t_fast (median over rounds, with the round interval), rounded for the JSON."""
    return {k: round(v, 3) for k, v in timed.ratio(slow, fast).items()}


def machine_info(device: str) -> dict[str, object]:
    """torch version, CPU threads, processor, and the GPU's name on CUDA (keys of the scripts' JSON)."""
    info: dict[str, object] = {"torch": torch.__version__, "threads": torch.get_num_threads(),
                               "machine": platform.processor() or platform.machine()}
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


@dataclasses.dataclass(frozen=True)
class BenchmarkArgs:
    """The flags every benchmark shares; each script's dataclass adds its own fields and defaults, and
    `parse_cli` reads them from the command line."""

    grid: int = 16
    """Token grid side (grid**2 tokens per image)."""
    batch: int = 8
    """Batch size."""
    engram: Preset = "small"
    """Engram memory preset (common.PRESETS): small (one small layer) or study (the GPT-B study's memory)."""
    rows_per_head: int | None = None
    """Table rows per head, replacing the preset's (None: the preset's)."""
    accelerator: Accelerator = "cpu"
    """Where it runs, in Lightning's vocabulary: cpu, cuda or gpu (the first CUDA device), or auto (CUDA
    when there is one, else cpu)."""
    repeats: int = 3
    """Timed calls (rounds) of each variant after one warm-up."""
    threads: int | None = None
    """Torch CPU threads (None: torch's default); 1 avoids contention on a loaded machine."""

    @property
    def device(self) -> str:
        """The torch device the accelerator names: "cpu" or "cuda" (the value of the JSON's `device`)."""
        return accelerator_device(self.accelerator).type

    def apply_threads(self) -> None:
        """Set torch's CPU threads to `threads` (when given); call before building any model."""
        if self.threads is not None:
            torch.set_num_threads(self.threads)


@dataclasses.dataclass(frozen=True)
class ModelBenchmarkArgs(BenchmarkArgs):
    """`BenchmarkArgs` plus the model size and precision, for the scripts that build models."""

    size: str = "gpt-small"
    """A model size: a name in engram_vision.config.MODEL_SIZES (gpt-small, gpt-b, ...)."""
    precision: Precision = "32-true"
    """32-true (float32) or bf16-true (bfloat16), the JSON's `dtype`: the dtype of the weights in
    decoding; training steps keep fp32 weights and run bf16 autocast (as bf16-mixed training)."""

    @property
    def dtype_name(self) -> str:
        """The torch dtype's name, "float32" or "bfloat16" (the value of the JSON's `dtype`)."""
        return DTYPES[self.precision]

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype_name)


class _HelpFormatter(DefaultHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """jsonargparse's help, with the description (the script's docstring) printed as written."""


def parse_cli(cls: type[ArgsT], args: list[str] | None = None, description: str | None = None) -> ArgsT:
    """An instance of the dataclass `cls` from the command line (`args`, default sys.argv): one flag per
    field, `--help` shows each field's docstring and `description` (the script's docstring) above them."""
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    # return_instance: the instance itself, not its methods and properties as subcommands
    return auto_cli(cls, args=args, as_positional=False, return_instance=True, description=description,
                    formatter_class=_HelpFormatter)


def rounded(values: dict[str, float], digits: int) -> dict[str, float]:
    return {k: round(v, digits) for k, v in values.items()}
