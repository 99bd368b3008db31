"""Whether three optimisations in the Engram layer's hot path earn their complexity: the Engram model as it is
("optimised") vs copies with the same weights in which one optimisation at a time is replaced by its plain
form, timed in alternation in one process:
  plain_gate   `EngramMemory.gate_values` through the two RMSNorm modules and a dot product,
               <norm_query(h), norm_key(keys)> / sqrt(dim), instead of three fused `vecdot`s;
  plain_conv   the depthwise conv through the layer's own nn.Conv1d on the window (tail + chunk) instead of
               `causal_depthwise`'s two paths (unfolded multiply-sum without autograd, shifted
               multiply-adds with it);
  plain_table  a plain nn.Embedding holding the same weight instead of `EngramTable` (whose host-memory
               backward adds a sparse gradient into a dense buffer kept across steps).
The plain forms live in this script (the package is not changed): a bound `gate_values` per layer, the
layer's forward wrapped so that `engram_vision.engram.causal_depthwise` is swapped only during its calls,
and the table replaced. Before timing, the script checks (and stops otherwise) that every plain variant
gives the optimised model's logits within 1e-5 relative (max |difference| / max |logit|): a forward with
autograd (the training path), one without (prefill), and decode steps through a `DecodeState`; and that
plain_table's table gradient matches. The output head and the conv weights, zero at init, are drawn at
random first (N(0, 0.02) and N(0, 0.5)), so the logits depend on every path that is compared.

Decode: `decode_cache.lockstep_decode`, a whole generation (--batch images, CFG --cfg_scale) per round with
optimised, plain_gate and plain_conv advancing in turns of 16 tokens; the figure is the sum of the decode
steps (plain_table is not decoded: without autograd `EngramTable` runs nn.Embedding's own forward).
Train: `common.train_step_fn` (--train_batch sequences, AdamW), all four variants in rotating rounds.
Prints one JSON line: the fastest round of each variant, the per-round ratio t_plain / t_optimised (median
over rounds with the lowest and highest round), the saving = 1 - t_optimised / t_plain in percent of the
plain step (same median and interval), and the verdict by the rule "keep where the median saving is more
than 3% of a decode step or a train step", with the checks' largest relative differences.
    python benchmarks/engram_variants.py [--size gpt-small] [--engram small] [--grid 16] [--batch 4]
        [--train_batch 2] [--repeats 4] [--train_repeats 10] [--cfg_scale 2.0] [--threads 1]
e.g. the GPT-B study preset on CPU (BENCHMARKS.md) and a quick check on the small model:
    python benchmarks/engram_variants.py --size gpt-b --engram study --grid 16 --threads 1
    python benchmarks/engram_variants.py --size gpt-small --engram small --grid 8 --repeats 1 --train_repeats 1
"""

from __future__ import annotations

import copy
import dataclasses
import json
import types
from collections.abc import Callable

import torch
from common import (
    ModelBenchmarkArgs,
    PairedTimes,
    build_config,
    machine_info,
    parse_cli,
    rounded,
    time_paired,
    train_step_fn,
)
from decode_cache import lockstep_decode
from torch import Tensor, nn

import engram_vision.engram as engram_module
from engram_vision.cache import DecodeState
from engram_vision.engram import EngramMemory
from engram_vision.model import EngramGPT
from engram_vision.table import EngramTable
from sample.sampling import SamplingConfig

# optimisation -> the variant that replaces it by its plain form
OPTIMISATIONS = {"fused_gate": "plain_gate", "two_path_conv": "plain_conv", "in_place_table_grad": "plain_table"}
DECODED = ("optimised", "plain_gate", "plain_conv")  # plain_table decodes exactly as optimised does
TOLERANCE = 1e-5  # largest relative difference of the logits (float32)
KEEP_ABOVE = 0.03  # the rule: keep an optimisation that saves more than 3% of a step


def plain_gate_values(self: EngramMemory, h: Tensor, keys: Tensor) -> Tensor:
    """`EngramMemory.gate_values` in its plain form: the two RMSNorm modules (float32 out for float32
    weights) and a dot product, then signed sqrt and sigmoid as the layer does."""
    if not isinstance(self.gate, str):
        return h.new_full((*h.shape[:-1], 1), float(self.gate))
    score = (self.norm_query(h) * self.norm_key(keys)).sum(-1, keepdim=True) / self.dim ** 0.5
    if self.config.signed_sqrt:
        score = score.abs().clamp_min(1e-6).sqrt() * score.sign()
    return torch.sigmoid(score).to(h.dtype)


def with_plain_conv(memory: EngramMemory) -> None:
    """Make `memory` compute its depthwise conv with its own nn.Conv1d: its forward is wrapped so that
    `engram_vision.engram.causal_depthwise` is the plain conv during the call and restored after it (other
    models keep the package's function)."""
    forward = memory.forward  # the class's forward, bound

    def conv(window: Tensor, weight: Tensor, dilation: int, length: int) -> Tensor:
        # [B, tail + T, dim] -> [B, dim, tail + T] -> 'valid' conv: [B, dim, T] -> [B, T, dim]
        return memory.conv(window.transpose(1, 2)).transpose(1, 2)

    def plain_conv_forward(*args, **kwargs):
        previous = engram_module.causal_depthwise
        engram_module.causal_depthwise = conv
        try:
            return forward(*args, **kwargs)
        finally:
            engram_module.causal_depthwise = previous

    memory.forward = plain_conv_forward


def with_plain_table(memory: EngramMemory) -> None:
    """Replace `memory.table` (an `EngramTable`) by a plain nn.Embedding holding the same weight."""
    table = memory.table
    if type(table) is not EngramTable:
        raise ValueError(f"plain_table replaces an EngramTable; this layer's table is {type(table).__name__}")
    plain = nn.Embedding(table.num_embeddings, table.embedding_dim, padding_idx=table.padding_idx, device="meta")
    plain.weight = table.weight
    memory.table = plain


def plain_variant(model: EngramGPT, name: str) -> EngramGPT:
    """A deep copy of `model` whose Engram layers use the plain form that variant `name` names."""
    variant = copy.deepcopy(model)
    for memory in variant.engram_layers():
        if name == "plain_gate":
            memory.gate_values = types.MethodType(plain_gate_values, memory)
        elif name == "plain_conv":
            if not memory.config.use_conv:
                raise ValueError("plain_conv needs Engram layers with a conv (EngramConfig.use_conv)")
            with_plain_conv(memory)
        elif name == "plain_table":
            with_plain_table(memory)
        else:
            raise ValueError(f"unknown variant {name!r}; choose one of {sorted(OPTIMISATIONS.values())}")
    return variant


def build_model(args: ModelBenchmarkArgs, seed: int = 0) -> EngramGPT:
    """The Engram model (eval mode, on the device in the dtype), with its output head and conv weights
    (zero at init) drawn at random so that the logits depend on the gate, the conv and the table."""
    config = build_config(args.size, args.grid, args.engram, args.rows_per_head)
    torch.manual_seed(seed)
    model = EngramGPT(config)
    with torch.no_grad():
        nn.init.normal_(model.output.weight, std=config.initializer_range)
        for memory in model.engram_layers():
            if memory.config.use_conv:
                nn.init.normal_(memory.conv.weight, std=0.5)
    return model.eval().to(args.device, args.dtype)


def relative_difference(value: Tensor, reference: Tensor) -> float:
    """max |value - reference| / max |reference|."""
    return float((value.float() - reference.float()).abs().max() / reference.float().abs().max())


def check_logits(model: EngramGPT, tokens: Tensor, labels: Tensor, decode_steps: int) -> dict[str, Tensor]:
    """The model's logits (eval mode) on the paths the variants change: `autograd` (a forward that records
    autograd, as training runs it), `no_grad` (a whole-sequence forward without it) and `decode` (the class
    token, then `decode_steps` tokens one at a time through a `DecodeState`)."""
    with torch.enable_grad():
        autograd = model(tokens[:, :-1], labels).detach()
    with torch.no_grad():
        no_grad = model(tokens[:, :-1], labels)
        state = DecodeState.allocate(model.config, tokens.shape[0], device=tokens.device,
                                     dtype=next(model.parameters()).dtype)
        steps = [model(tokens[:, :0], labels, state)]
        steps += [model(tokens[:, i:i + 1], labels, state) for i in range(decode_steps)]
    return {"autograd": autograd, "no_grad": no_grad, "decode": torch.cat(steps, dim=1)}


def table_gradients(model: EngramGPT, tokens: Tensor, labels: Tensor) -> list[Tensor]:
    """The Engram tables' gradients of one backward (eval mode, sum of squared logits); clears all gradients."""
    model(tokens[:, :-1], labels).square().mean().backward()
    grads = [memory.table.weight.grad.clone() for memory in model.engram_layers()]
    model.zero_grad(set_to_none=True)
    return grads


def check_variants(models: dict[str, EngramGPT], batch: int = 2, decode_steps: int = 8,
                   seed: int = 0) -> dict[str, float]:
    """The largest relative difference from "optimised" of each plain variant's logits (and plain_table's
    table gradients) on random tokens; raises AssertionError where one exceeds TOLERANCE."""
    reference = models["optimised"]
    config = reference.config
    device = next(reference.parameters()).device
    rng = torch.Generator().manual_seed(seed)
    tokens = torch.randint(config.vocab_size, (batch, config.block_size), generator=rng).to(device)
    labels = torch.randint(config.num_classes, (batch,), generator=rng).to(device)
    decode_steps = min(decode_steps, config.block_size - 1)
    expected = check_logits(reference, tokens, labels, decode_steps)
    differences = {}
    for name, model in models.items():
        if name == "optimised":
            continue
        got = check_logits(model, tokens, labels, decode_steps)
        worst = max(relative_difference(got[path], expected[path]) for path in expected)
        if name == "plain_table":
            grads = zip(table_gradients(model, tokens, labels), table_gradients(reference, tokens, labels),
                        strict=True)
            worst = max(worst, *(relative_difference(mine, theirs) for mine, theirs in grads))
        if not worst <= TOLERANCE:
            raise AssertionError(f"{name} differs from the optimised model by {worst:.2e} relative "
                                 f"(> {TOLERANCE:g}): the variants would not do the same work")
        differences[name] = worst
    return differences


def savings(timed: PairedTimes, names: tuple[str, ...]) -> tuple[dict[str, dict], dict[str, dict]]:
    """Per plain variant: t_plain / t_optimised and the saving 1 - t_optimised / t_plain in percent (median
    over rounds with the lowest and highest round; the saving is a monotone function of the ratio)."""
    ratios = {name: timed.ratio(name, "optimised") for name in names if name != "optimised"}
    percent = {name: {k: round(100 * (1 - 1 / v), 2) for k, v in r.items()} for name, r in ratios.items()}
    return {name: rounded(r, 4) for name, r in ratios.items()}, percent


def verdicts(decode: dict[str, dict], train: dict[str, dict]) -> dict[str, str]:
    """"keep" where the median saving of a decode or a train step is more than KEEP_ABOVE, else "plain"."""
    result = {}
    for optimisation, variant in OPTIMISATIONS.items():
        medians = [table[variant]["median"] for table in (decode, train) if variant in table]
        result[optimisation] = "keep" if medians and max(medians) > 100 * KEEP_ABOVE else "plain"
    return result


@dataclasses.dataclass(frozen=True)
class EngramVariantsArgs(ModelBenchmarkArgs):
    """The flags of engram_variants.py: the shared ones (`common.ModelBenchmarkArgs`) and its own."""

    batch: int = 4
    """Images per generated batch in the decode rounds (labels 0..batch-1; with CFG 2 x batch rows)."""
    train_batch: int = 2
    """Sequences per training step."""
    repeats: int = 4
    """Lockstep decode rounds (whole generations of every decoded variant) after one warm-up round."""
    train_repeats: int = 10
    """Timed training-step rounds (one step of every variant each) after one warm-up step each."""
    cfg_scale: float = 2.0
    """Classifier-free guidance scale of the generated batches (1.0: no CFG)."""


def parse(args: list[str] | None = None) -> EngramVariantsArgs:
    """The command line (default sys.argv) as `EngramVariantsArgs`; `--help` describes every flag."""
    return parse_cli(EngramVariantsArgs, args, __doc__)


def main(args: EngramVariantsArgs) -> None:
    if args.precision != "32-true":
        raise ValueError("engram_variants.py compares float32 logits within 1e-5: use --precision 32-true")
    args.apply_threads()
    optimised = build_model(args)
    config = optimised.config
    models = {"optimised": optimised, **{name: plain_variant(optimised, name) for name in OPTIMISATIONS.values()}}
    differences = check_variants(models)

    sampling = SamplingConfig(cfg_scale=args.cfg_scale)
    decoded = lockstep_decode({name: (models[name], False) for name in DECODED}, args.batch, sampling,
                              args.device, args.repeats)
    if engram_module.causal_depthwise.__module__ != engram_module.__name__:
        raise RuntimeError("engram_vision.engram.causal_depthwise was left patched")
    steps: dict[str, Callable[[], None]] = {name: train_step_fn(model, args.train_batch, args.device, args.dtype)
                                            for name, model in models.items()}
    trained = time_paired(steps, args.train_repeats, args.device)
    decode_ratio, decode_saving = savings(decoded, DECODED)
    train_ratio, train_saving = savings(trained, tuple(models))
    rows = args.batch * (2 if sampling.uses_cfg else 1)
    print(json.dumps({
        "benchmark": "engram_variants", "size": args.size, "engram": args.engram,
        "rows_per_head": config.engram.rows_per_head, "grid": args.grid, "tokens": config.block_size,
        "batch": args.batch, "rows_through_model": rows, "cfg_scale": args.cfg_scale,
        "decode_steps": config.block_size - 1, "decode_rounds": args.repeats,
        "train_batch": args.train_batch, "train_rounds": args.train_repeats,
        "device": args.device, "dtype": args.dtype_name, **machine_info(args.device),
        "max_relative_difference": {k: float(f"{v:.3g}") for k, v in differences.items()},
        "lockstep_decode_seconds": rounded(decoded.best(), 4),
        "train_step_seconds": rounded(trained.best(), 4),
        "plain_over_optimised": {"decode": decode_ratio, "train": train_ratio},
        "saving_percent": {"decode": decode_saving, "train": train_saving},
        "verdict": verdicts(decode_saving, train_saving)}))


if __name__ == "__main__":
    main(parse())
