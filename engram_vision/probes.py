"""Probes that ask whether an Engram model retrieves from its memory (plain torch; no Lightning).

On held-out images (tokens [N,T], labels [N]) the probes compare the model's next-token distributions P
(its own tokens, as trained) with those Q under an intervention:

- gate-clamp sweep: held-out NLL with every Engram gate clamped to a constant g, and with the gate as
  trained;
- donor probe: the Engram layers hash a donor image's tokens (and class) while the backbone keeps the
  image's own; donors are the nearest / farthest same-class exemplar by token Hamming distance, a random
  same-class and a random other-class image;
- table interventions: every table collapsed to its mean row, or redrawn from N(0,1).

The statistic is KL(P || Q) per position, averaged over the T positions of an image; reported as the mean
over images with a 95% bootstrap interval, paired permutation tests between kinds, and the ratio of each
table intervention to each donor kind. One pass over the data scores every probe, reusing P per batch.
Resampling is `stats.py`; the interventions themselves `interventions.py`; reading token shards, running
this over a study and writing metrics.json is `study/runner.py`.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from itertools import combinations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call

from engram_vision.interventions import collapsed_tables, gate_clamped, random_tables
from engram_vision.model import EngramGPT
from engram_vision.stats import bootstrap_mean, bootstrap_ratio, paired_permutation_test

DONOR_KINDS = ("nearest", "farthest", "random_same", "random_other")
"""Donor kinds of the study; `self` (the image is its own donor, KL exactly 0) is also accepted."""
INTERVENTIONS = ("collapse", "randomize")
GATES = (0.0, 0.05, 0.1, 0.25, 0.5, 1.0)


@dataclass(frozen=True)
class ProbeConfig:
    """What to probe and how to resample."""

    gates: tuple[float, ...] = GATES
    """Constant gate values of the clamp sweep (empty: no sweep)."""
    donors: tuple[str, ...] = DONOR_KINDS
    """Donor kinds, from nearest, farthest, random_same, random_other, self."""
    interventions: tuple[str, ...] = INTERVENTIONS
    """Table interventions, from collapse and randomize."""
    batch_size: int = 32
    """Images per forward pass."""
    bootstrap_samples: int = 2000
    """Bootstrap resamples of the images for each interval."""
    permutations: int = 10_000
    """Sign flips per paired permutation test."""
    level: float = 0.95
    """Confidence level of the intervals."""
    seed: int = 0
    """Seeds donor choice, table randomisation and resampling."""

    def __post_init__(self) -> None:
        unknown = sorted(set(self.donors) - {*DONOR_KINDS, "self"})
        if unknown:
            raise ValueError(f"ProbeConfig.donors: unknown kinds {unknown}; choose from {[*DONOR_KINDS, 'self']}")
        unknown = sorted(set(self.interventions) - set(INTERVENTIONS))
        if unknown:
            raise ValueError(f"ProbeConfig.interventions: unknown {unknown}; choose from {list(INTERVENTIONS)}")
        bad = [g for g in self.gates if not 0.0 <= float(g) <= 1.0]
        if bad:
            raise ValueError(f"ProbeConfig.gates must lie in [0, 1], got {bad}")
        for name in ("batch_size", "bootstrap_samples", "permutations"):
            if getattr(self, name) < 1:
                raise ValueError(f"ProbeConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.level < 1:
            raise ValueError(f"ProbeConfig.level must lie in (0, 1), got {self.level}")
        if self.seed < 0:  # numpy's default_rng would refuse it later, without naming the field
            raise ValueError(f"ProbeConfig.seed must be >= 0, got {self.seed}")


@dataclass
class Probe:
    """One intervention: donor inputs for the Engram hash ([N,T] / [N], aligned with the images), replacement
    parameters for `functional_call` (e.g. tables), and/or a context that changes the model (a gate clamp)."""

    donor_tokens: Tensor | None = None
    donor_labels: Tensor | None = None
    parameters: dict[str, Tensor] = field(default_factory=dict)
    context: Callable[[], AbstractContextManager] = nullcontext


def _log_probs(model: EngramGPT, tokens: Tensor, labels: Tensor, probe: Probe | None = None,
               index: Tensor | None = None) -> Tensor:
    """log P(token t | tokens < t, label) [B,T,V] for images `tokens` [B,T] (rows `index` of the probe's
    donor arrays)."""
    kwargs = {}
    if probe is not None and probe.donor_tokens is not None:
        kwargs["engram_tokens"] = probe.donor_tokens[index][:, :-1].to(tokens.device)
    if probe is not None and probe.donor_labels is not None:
        kwargs["engram_labels"] = probe.donor_labels[index].to(labels.device)
    inputs = (tokens[:, :-1], labels)  # the class token plus T-1 tokens give T predictions
    if probe is not None and probe.parameters:
        logits = functional_call(model, probe.parameters, inputs, kwargs)
    else:
        logits = model(*inputs, **kwargs)
    return F.log_softmax(logits.float(), dim=-1)


def _batches(count: int, batch_size: int) -> Iterator[Tensor]:
    for start in range(0, count, batch_size):
        yield torch.arange(start, min(start + batch_size, count))


def _nll(log_probs: Tensor, targets: Tensor) -> Tensor:
    """Mean NLL per image [B] in nats/token."""
    return -log_probs.gather(-1, targets[..., None]).squeeze(-1).mean(dim=1)


def _kl(reference: Tensor, probed: Tensor) -> Tensor:
    """KL(reference || probed) per position, averaged per image [B] (clamped at 0 against rounding)."""
    per_position = (reference.exp() * (reference - probed)).sum(dim=-1)
    return per_position.mean(dim=1).clamp_min(0.0)


@torch.no_grad()
def score_probes(model: EngramGPT, tokens: Tensor, labels: Tensor, probes: dict[str, Probe],
                 batch_size: int = 32) -> tuple[Tensor, dict[str, dict[str, Tensor]]]:
    """(NLL [N] of the model as it is, {probe: {"kl": [N], "nll": [N]}}), in nats, float64 on the CPU.

    tokens [N,T] int64 (all T image tokens), labels [N]. The model is put in eval mode for the pass and
    returned to its previous mode.
    """
    if tokens.ndim != 2 or labels.shape != (tokens.shape[0],):
        raise ValueError(f"tokens must be [N,T] and labels [N], got {tuple(tokens.shape)} and {tuple(labels.shape)}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    base, scores = [], {name: {"kl": [], "nll": []} for name in probes}
    try:
        for index in _batches(tokens.shape[0], batch_size):
            batch, batch_labels = tokens[index].to(device), labels[index].to(device)
            reference = _log_probs(model, batch, batch_labels)
            base.append(_nll(reference, batch).double().cpu())
            for name, probe in probes.items():
                with probe.context():
                    probed = _log_probs(model, batch, batch_labels, probe, index)
                scores[name]["kl"].append(_kl(reference, probed).double().cpu())
                scores[name]["nll"].append(_nll(probed, batch).double().cpu())
    finally:
        model.train(was_training)
    return torch.cat(base), {name: {k: torch.cat(v) for k, v in s.items()} for name, s in scores.items()}


def hamming_distances(tokens: Tensor, pool: Tensor) -> Tensor:
    """Number of differing positions [N,M] between tokens [N,T] and pool [M,T]."""
    return (tokens[:, None, :] != pool[None, :, :]).sum(dim=-1)


def choose_donors(tokens: Tensor, labels: Tensor, kind: str, rng: torch.Generator,
                  pool_tokens: Tensor | None = None, pool_labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(donor index into the pool [N], token Hamming distance to the donor [N]) for each image.

    Without a pool the images themselves are the pool and nobody is their own donor (except for `self`).
    Ties between equally near or far exemplars are broken at random.
    """
    own_pool = pool_tokens is None
    pool_tokens = tokens if own_pool else pool_tokens
    pool_labels = labels if own_pool else pool_labels
    count = tokens.shape[0]
    if kind == "self":
        if not own_pool:
            raise ValueError("the 'self' donor needs the images themselves as the pool")
        return torch.arange(count), torch.zeros(count, dtype=torch.int64)
    if kind not in DONOR_KINDS:
        raise ValueError(f"unknown donor kind {kind!r}; choose from {[*DONOR_KINDS, 'self']}")
    donors = torch.empty(count, dtype=torch.int64)
    for label in labels.unique().tolist():
        queries = (labels == label).nonzero().squeeze(1)
        same = pool_labels == label
        candidates = (same if kind != "random_other" else ~same).nonzero().squeeze(1)
        # Nobody is their own donor: mask each query's own row when the pool is the image set.
        allowed = torch.ones(len(queries), len(candidates), dtype=torch.bool)
        if own_pool:
            allowed &= queries[:, None] != candidates[None, :]
        if not allowed.any(dim=1).all():
            raise ValueError(f"donor kind {kind!r}: class {label} has no other candidate in the pool; the "
                             f"probe needs at least two held-out images per class")
        jitter = torch.rand(allowed.shape, generator=rng)  # random choice, or random tie-breaking below
        if kind in ("nearest", "farthest"):
            distance = hamming_distances(tokens[queries], pool_tokens[candidates]).double()
            score = distance + 0.5 * jitter if kind == "nearest" else -distance + 0.5 * jitter
        else:
            score = jitter
        donors[queries] = candidates[score.masked_fill(~allowed, math.inf).argmin(dim=1)]
    distances = (tokens != pool_tokens[donors]).sum(dim=1)
    return donors, distances


def _interval(values: Tensor, rng: np.random.Generator, config: ProbeConfig) -> dict[str, float]:
    return bootstrap_mean(values.numpy(), rng, config.bootstrap_samples, config.level)


def _finite_or_none(interval: dict[str, float]) -> dict[str, float | None]:
    # JSON has no infinity: a ratio to a donor effect of exactly 0 (the `self` donor) is undefined.
    return {key: value if math.isfinite(value) else None for key, value in interval.items()}


def _bits(values: Tensor) -> Tensor:
    return values / math.log(2)


def images_sha256(tokens: Tensor, labels: Tensor) -> str:
    """A hash of the probed images (tokens and labels, in order): equal hashes mean per-image values of two
    runs are paired."""
    digest = hashlib.sha256(tokens.to(torch.int64).cpu().numpy().tobytes())
    digest.update(labels.to(torch.int64).cpu().numpy().tobytes())
    return digest.hexdigest()


def run_probes(model: EngramGPT, tokens: Tensor, labels: Tensor, config: ProbeConfig = ProbeConfig(),
               pool_tokens: Tensor | None = None, pool_labels: Tensor | None = None) -> dict:
    """Every probe of `config` on held-out images tokens [N,T] / labels [N]; a JSON-ready dict:

    nll_bits (the model as trained) and nll_bits_per_image [N], gate_sweep [{gate, nll_bits, kl}], donors {kind: {kl, hamming}},
    interventions {kind: {kl, ratio_to_donors {donor: interval}}}, permutation_tests [{a, b, mean_difference,
    p_value, permutations}], settings. Each interval is {mean, low, high} (a ratio's entries are None where
    the donor effect is 0). A model without Engram gets its NLL
    only. Donors come from the images themselves unless a pool (e.g. training tokens) is given.
    """
    torch_rng = torch.Generator().manual_seed(config.seed)
    np_rng = np.random.default_rng(config.seed)
    has_engram = model.config.engram is not None
    probes: dict[str, Probe] = {}
    hamming: dict[str, float] = {}
    if has_engram:
        for gate in config.gates:
            probes[f"gate={float(gate):g}"] = Probe(context=lambda g=float(gate): gate_clamped(model, g))
        for kind in config.donors:
            donors, distances = choose_donors(tokens, labels, kind, torch_rng, pool_tokens, pool_labels)
            source_tokens = tokens if pool_tokens is None else pool_tokens
            source_labels = labels if pool_labels is None else pool_labels
            probes[kind] = Probe(donor_tokens=source_tokens[donors], donor_labels=source_labels[donors])
            hamming[kind] = float(distances.double().mean())
        device_rng = torch.Generator(device=next(model.parameters()).device).manual_seed(config.seed)
        tables = {"collapse": lambda: collapsed_tables(model), "randomize": lambda: random_tables(model, device_rng)}
        for kind in config.interventions:
            probes[kind] = Probe(parameters=tables[kind]())
    nll, scores = score_probes(model, tokens, labels, probes, config.batch_size)

    result: dict = {"nll_bits": _interval(_bits(nll), np_rng, config),
                    # per image, so runs probed on the same images can be compared pairwise
                    "nll_bits_per_image": _bits(nll).tolist(), "gate_sweep": [], "donors": {},
                    "interventions": {}, "permutation_tests": [],
                    "settings": {**asdict(config), "num_images": int(tokens.shape[0]),
                                 "positions_per_image": int(tokens.shape[1]),
                                 "images_sha256": images_sha256(tokens, labels),
                                 "donor_pool": "held-out images" if pool_tokens is None else "given pool"}}
    if not has_engram:
        return result
    for gate in config.gates:
        score = scores[f"gate={float(gate):g}"]
        result["gate_sweep"].append({"gate": float(gate), "nll_bits": _interval(_bits(score["nll"]), np_rng, config),
                                     "kl": _interval(score["kl"], np_rng, config)})
    if model.config.engram.gate == "learned":
        result["gate_sweep"].append({"gate": "learned", "nll_bits": result["nll_bits"]})
    for kind in config.donors:
        result["donors"][kind] = {"kl": _interval(scores[kind]["kl"], np_rng, config), "hamming": hamming[kind]}
    for kind in config.interventions:
        ratios = {donor: _finite_or_none(bootstrap_ratio(scores[kind]["kl"].numpy(), scores[donor]["kl"].numpy(),
                                                         np_rng, config.bootstrap_samples, config.level))
                  for donor in config.donors}
        result["interventions"][kind] = {"kl": _interval(scores[kind]["kl"], np_rng, config),
                                         "ratio_to_donors": ratios}
    # Between donor kinds, then each intervention against each donor kind (all paired over images).
    pairs = [*combinations(config.donors, 2), *((i, d) for i in config.interventions for d in config.donors)]
    for first, second in pairs:
        test = paired_permutation_test(scores[first]["kl"].numpy(), scores[second]["kl"].numpy(), np_rng,
                                       config.permutations)
        result["permutation_tests"].append({"a": first, "b": second, **test})
    return result


__all__ = ["DONOR_KINDS", "GATES", "INTERVENTIONS", "Probe", "ProbeConfig", "choose_donors", "hamming_distances",
           "images_sha256", "run_probes", "score_probes"]
