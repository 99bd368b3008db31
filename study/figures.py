"""Figures of the study report (matplotlib, Agg backend; torchvision for sample grids): FID and IS against
rho, the gate-clamp curve, donor and intervention effects on a log axis, and a sample grid per run. Each
function reads the parsed results (`study.results.Run`) and writes one PNG atomically; what goes in
report.md is `study/report.py`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.utils import make_grid, save_image

from study.results import Run, get, is_num, kl_rows, metric, sweep
from tokenizers_vq.files import atomic_write

GRID_COLUMNS, GRID_CLASSES, MIN_CELL_PX = 8, 10, 64  # sample grids: per class, classes, cell size


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    return plt

def _save_figure(fig: Any, path: Path) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))
    _pyplot().close(fig)

def fid_is_figure(runs: list[Run], baseline: Run | None, path: Path) -> bool:
    """FID and IS against rho: the sweep as a line, the baseline as a level, variants as labelled points."""
    panels = [("fid", None, "FID (lower is better)"), ("is_mean", "is_std", "IS")]
    if not any(is_num(metric(r, key)) for r in runs for key, _, _ in panels):
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (key, std_key, label) in zip(axes, panels, strict=True):
        sweep = sorted((r for r in runs if r.kind == "sweep" and is_num(metric(r, key)) and is_num(r.rho)),
                       key=lambda r: r.rho)
        if sweep:
            errs = [metric(r, std_key) or 0.0 for r in sweep] if std_key else None
            ax.errorbar([r.rho for r in sweep], [metric(r, key) for r in sweep], yerr=errs, marker="o",
                        capsize=3, label="Engram (learned gate)")
        if baseline is not None and is_num(metric(baseline, key)):
            ax.axhline(metric(baseline, key), color="k", linestyle="--", label=f"baseline ({baseline.name})")
        others = [r for r in runs if r.kind != "sweep" and r is not baseline and is_num(metric(r, key))]
        for marker, r in zip("s^DvPX<>*h" * 10, others, strict=False):
            rho = r.rho if is_num(r.rho) else 1.0  # a variant without rho: place it with the baseline
            ax.scatter([rho], [metric(r, key)], marker=marker, s=50, zorder=3, label=r.name)
            ax.annotate(r.name, (rho, metric(r, key)), textcoords="offset points", xytext=(5, 5), fontsize=8)
        ax.set_xlabel("rho (backbone share of parameters)")
        ax.set_ylabel(label)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    _save_figure(fig, path)
    return True

def _yerr(stats: Sequence[dict[str, Any]], floor: float = -math.inf) -> tuple[np.ndarray, np.ndarray]:
    """(means, [2, n] asymmetric error bars) from mean/low/high, all clipped at `floor`."""
    def bound(s: dict[str, Any], key: str) -> float:
        return max(s[key] if is_num(s.get(key)) else s["mean"], floor)
    means = np.array([bound(s, "mean") for s in stats])
    low, high = np.array([bound(s, "low") for s in stats]), np.array([bound(s, "high") for s in stats])
    return means, np.stack([means - low, high - means]).clip(0)

def gate_clamp_figure(runs: list[Run], baseline: Run | None, path: Path) -> None:
    """NLL against a constant gate per run; the learned gate dashed, the baseline dotted."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for color, r in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"] * 10, runs, strict=False):
        points = [p for p in sweep(r) if is_num((p.get("nll_bits") or {}).get("mean"))]
        fixed = sorted((p for p in points if is_num(p.get("gate"))), key=lambda p: p["gate"])
        if fixed:
            means, err = _yerr([p["nll_bits"] for p in fixed])
            ax.errorbar([p["gate"] for p in fixed], means, yerr=err, marker="o", capsize=3, color=color,
                        label=f"{r.name} (constant gate)")
        for p in points:
            if p.get("gate") == "learned":
                ax.axhline(p["nll_bits"]["mean"], color=color, linestyle="--",
                           label=f"{r.name} (learned gate)")
    base = get(baseline.probe, "nll_bits", "mean") if baseline else None
    if baseline is not None and is_num(base):
        ax.axhline(base, color="k", linestyle=":", label=f"baseline ({baseline.name})")
    ax.set(xlabel="constant gate g", ylabel="held-out NLL (bits/token)")
    ax.legend(fontsize=8)
    _save_figure(fig, path)

def probe_figure(runs: list[Run], floor: float, path: Path) -> None:
    """KL per donor/intervention kind with intervals on a log axis, one panel per run."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(runs), figsize=(1 + 3.5 * len(runs), 4.5), sharey=True, squeeze=False)
    for ax, r in zip(axes[0], runs, strict=True):
        rows = [(k, s) for k, s in kl_rows(r) if is_num(s.get("mean"))]
        for x, (kind, s) in enumerate(rows):
            mean, err = _yerr([s], floor)
            color = "tab:blue" if kind.startswith("donor") else "tab:red"
            ax.errorbar([x], mean, yerr=err, fmt="o", capsize=3, color=color)
        ax.axhline(floor, color="grey", linestyle=":", label=f"clip floor {floor:.3g} nats")
        ax.set_xticks(range(len(rows)), [k for k, _ in rows], rotation=45, ha="right", fontsize=8)
        ax.set_yscale("log")
        ax.set_title(r.name)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("KL (nats, log scale)")
    _save_figure(fig, path)

def sample_grid(npz: Path, path: Path) -> tuple[int, int]:
    """Up to 8 samples per class, one row per class (first 10 classes); returns (rows, columns)."""
    with np.load(npz) as data:
        images = data["arr_0"]
        labels = data["labels"] if "labels" in data.files else None
    if images.ndim == 3:  # grayscale [N, H, W]
        images = np.repeat(images[..., None], 3, axis=-1)
    if labels is None:
        chosen = [images[: GRID_CLASSES * GRID_COLUMNS]]
        columns = GRID_COLUMNS
    else:
        chosen = [images[labels == c][:GRID_COLUMNS] for c in np.unique(labels)[:GRID_CLASSES]]
        columns = max(len(rows) for rows in chosen)
        # pad short classes with black cells so every class stays on its own row
        chosen = [np.concatenate([c, np.zeros((columns - len(c), *c.shape[1:]), c.dtype)]) for c in chosen]
    batch = torch.from_numpy(np.concatenate(chosen)).permute(0, 3, 1, 2).float() / 255.0
    scale = math.ceil(MIN_CELL_PX / min(batch.shape[-2:]))  # nearest-neighbour: 16 px digits stay crisp
    batch = batch.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)
    atomic_write(path, lambda tmp: save_image(make_grid(batch, nrow=columns), tmp, format="png"))
    return math.ceil(len(batch) / columns), columns
