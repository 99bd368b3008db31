"""Next-token choice for the AR image model: classifier-free guidance, its schedules, top-k/top-p, sampling.

Plain torch, no model knowledge: `cfg_mix` combines the conditional and unconditional logits of one
step, `cfg_scale_at` gives the guidance weight of a step, `filter_logits` masks outside top-k/top-p and
`sample_next` draws one token per row from an explicit `torch.Generator`. The decode loop, the KV cache
and the batching of the two CFG passes live in `sample/generate.py`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

import torch

CfgSchedule = Literal["constant", "linear", "power-cosine"]

# Floor of the temperature divisor: logits / 1e-5 already makes softmax one-hot for any real gap.
_MIN_TEMPERATURE = 1e-5
# A sorted prefix whose mass is within this of top_p counts as reaching it, so float32 rounding of an
# exact boundary (0.5 + 0.3 vs top_p = 0.8) does not decide whether one more token is kept.
_TOP_P_TOLERANCE = 1e-6


@dataclass(frozen=True)
class SamplingConfig:
    """How one next token is chosen from a row of logits, and how strongly CFG pushes them."""

    temperature: float = 1.0
    """Divides the logits before softmax; 0 means greedy (argmax)."""
    top_k: int = 0
    """Keep only the k most likely tokens (0 = off)."""
    top_p: float = 1.0
    """Keep the smallest most-likely set whose probability mass reaches top_p, in (0, 1] (1 = off)."""
    greedy: bool = False
    """Take the argmax; temperature, top_k and top_p are ignored."""
    cfg_scale: float = 1.0
    """Classifier-free guidance weight, >= 0; 1 = no guidance (the caller runs only the conditional pass)."""
    cfg_schedule: CfgSchedule = "constant"
    """How the guidance weight moves over the decode steps (see `cfg_scale_at`)."""
    cfg_power: float = 1.0
    """Exponent of the power-cosine schedule, > 0 (larger keeps guidance low for longer)."""

    def __post_init__(self) -> None:
        # `not x >= 0` also rejects NaN, which every plain comparison would let through; an infinite
        # temperature or guidance weight turns -inf (masked) or finite logits into NaN probabilities.
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"SamplingConfig.temperature must be a finite number >= 0, got {self.temperature}")
        if not self.top_k >= 0:
            raise ValueError(f"SamplingConfig.top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingConfig.top_p must be in (0, 1], got {self.top_p}")
        if not (self.cfg_scale >= 0 and math.isfinite(self.cfg_scale)):
            raise ValueError(f"SamplingConfig.cfg_scale must be a finite number >= 0, got {self.cfg_scale}")
        if self.cfg_schedule not in get_args(CfgSchedule):
            raise ValueError(f"SamplingConfig.cfg_schedule must be one of {get_args(CfgSchedule)}, "
                             f"got {self.cfg_schedule!r}")
        if not (self.cfg_power > 0 and math.isfinite(self.cfg_power)):
            raise ValueError(f"SamplingConfig.cfg_power must be a finite number > 0, got {self.cfg_power}")

    @property
    def uses_cfg(self) -> bool:
        """Whether the unconditional pass is needed at all (cfg_scale != 1)."""
        return self.cfg_scale != 1.0


def cfg_scale_at(step: int, num_steps: int, config: SamplingConfig) -> float:
    """Guidance weight for decode step `step` of `num_steps` (0-based), with t = step / (num_steps - 1).

    constant:      cfg_scale at every step.
    linear:        1 + (cfg_scale - 1) * t, i.e. 1 at step 0 and cfg_scale at the last step.
    power-cosine:  1 + (cfg_scale - 1) * (1 - cos(pi * t ** cfg_power)) / 2, same endpoints; slow at both
                   ends, and a larger cfg_power delays the rise.
    With num_steps == 1 the only step is the last one (t = 1), so it gets the full cfg_scale.
    """
    # Follows MUSE (Chang et al. 2023, rising guidance) and MDT's power-cosine schedule (Gao et al. 2023).
    if num_steps < 1 or not 0 <= step < num_steps:
        raise ValueError(f"cfg_scale_at needs 0 <= step < num_steps, got step={step}, num_steps={num_steps}")
    scale = config.cfg_scale
    if config.cfg_schedule == "constant":
        return scale
    t = 1.0 if num_steps == 1 else step / (num_steps - 1)
    if config.cfg_schedule == "linear":
        return 1.0 + (scale - 1.0) * t
    return 1.0 + (scale - 1.0) * (1.0 - math.cos(math.pi * t ** config.cfg_power)) / 2.0


def cfg_mix(cond_logits: torch.Tensor, uncond_logits: torch.Tensor, cfg_scale: float) -> torch.Tensor:
    """uncond + cfg_scale * (cond - uncond) on raw logits, any matching shape (e.g. [B,V]).

    Follows LlamaGen (mix before temperature and filtering). cfg_scale == 1 returns `cond_logits` itself
    (bit-exact, no copy), so callers must not write into the result in place.
    """
    if cfg_scale == 1.0:
        # uncond + 1 * (cond - uncond) is not bit-exact in floating point; no guidance must be.
        return cond_logits
    return uncond_logits + cfg_scale * (cond_logits - uncond_logits)


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Logits [B,V] with -inf outside the kept set (same dtype; top-k first). With both filters off this is
    `logits` itself, otherwise a new tensor; the input is never written to.

    top_k > 0 keeps exactly the k largest per row (ties broken by `torch.topk`); top_p < 1 keeps the
    smallest prefix of the sorted distribution whose mass is >= top_p, always at least one token. The masses
    are computed in float32, or float64 for float64 logits (whose range float32 cannot hold).
    """
    vocab = logits.shape[-1]
    if 0 < top_k < vocab:
        # Scatter rather than threshold at the k-th value, so ties never let more than k tokens through.
        values, indices = torch.topk(logits, top_k, dim=-1)
        logits = torch.full_like(logits, -math.inf).scatter(-1, indices, values)
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        mass = torch.softmax(sorted_logits, dim=-1, dtype=_softmax_dtype(logits.dtype)).cumsum(dim=-1)
        # Token i (in sorted order) is dropped when the tokens before it already reach top_p; the first
        # token has nothing before it, so every row keeps at least one.
        drop_sorted = torch.zeros_like(mass, dtype=torch.bool)
        drop_sorted[..., 1:] = mass[..., :-1] >= top_p - _TOP_P_TOLERANCE
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, -math.inf)
    return logits


def _softmax_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision and float32 logits, float64 for float64 ones (no range lost)."""
    return torch.promote_types(dtype, torch.float32)


def _check_rng(rng: torch.Generator, device: torch.device) -> None:
    if not isinstance(rng, torch.Generator):
        raise TypeError(f"rng must be a torch.Generator, got {type(rng).__name__}")
    # An index of None (e.g. "cuda") means the current device; only a differing explicit index is wrong.
    same = rng.device.type == device.type and (
        rng.device.index is None or device.index is None or rng.device.index == device.index)
    if not same:
        raise ValueError(f"rng is on {rng.device} but the logits are on {device}; create it with "
                         f"torch.Generator(device=logits.device)")


def sample_next(logits: torch.Tensor, config: SamplingConfig, rng: torch.Generator) -> torch.Tensor:
    """One token per row: logits [B,V] (any float dtype and device) -> int64 [B] on the same device.

    greedy or temperature == 0 takes the argmax; otherwise (logits - row max) / max(temperature, 1e-5), then
    `filter_logits`, softmax in float32 and `torch.multinomial` with `rng`, which must live on the logits'
    device. Rows need at least one finite logit and no +inf. No host synchronisation besides what
    multinomial itself does.
    """
    # Checked even when greedy, so a wrong generator fails on the first run, not the first sampled one.
    _check_rng(rng, logits.device)
    if logits.dim() != 2:
        raise ValueError(f"sample_next expects logits [B,V], got shape {tuple(logits.shape)}")
    if config.greedy or config.temperature == 0:
        return logits.argmax(dim=-1)
    # Softmax ignores a shift; shifting the row maximum to 0 first means a small temperature can only push
    # logits down to -inf (probability 0), never a large one up to +inf (inf - inf = NaN probabilities).
    # The shift runs in at least float32, so half-precision rows lose nothing to it.
    wide = logits.to(_softmax_dtype(logits.dtype))
    scaled = ((wide - wide.amax(dim=-1, keepdim=True)) / max(config.temperature, _MIN_TEMPERATURE)).float()
    probs = torch.softmax(filter_logits(scaled, config.top_k, config.top_p), dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=rng).squeeze(-1)
