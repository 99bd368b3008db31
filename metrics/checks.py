"""Checks the metric functions run on what they are given: finite arrays, statistics of matching shapes,
labels of the right length inside the classifier's classes. Each raises a ValueError that names the input
(`what`: a file, a flag, "the reference statistics") and the fix, instead of returning a NaN or letting
scipy fail inside `sqrtm`. Where the inputs come from (files, extractors) is left to the callers in
`metrics.fid`, `metrics.evaluate`, `metrics.domain` and `metrics.reference`.
"""

from __future__ import annotations

import numpy as np

# Non-finite statistics or features come from a broken extractor, corrupt weights or a corrupt file.
NON_FINITE_FIX = ("recompute them from finite features (a NaN or inf comes from broken extractor weights, "
                  "broken images or a corrupt statistics file)")


def require_finite(array: np.ndarray, what: str, fix: str = NON_FINITE_FIX) -> None:
    """ValueError naming `what` and how many entries are NaN or inf, when any is."""
    values = np.asarray(array)
    if values.dtype.kind not in "fc":
        return
    bad = ~np.isfinite(values)
    if bad.any():
        raise ValueError(f"{what} hold {int(bad.sum())} NaN or inf value(s) out of {values.size}: {fix}")


def check_stats(mu: np.ndarray, sigma: np.ndarray, what: str) -> None:
    """`mu` [D] and `sigma` [D,D], finite; `what` names them in the error ("the reference statistics")."""
    mu, sigma = np.asarray(mu), np.asarray(sigma)
    if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
        raise ValueError(f"{what} are not Gaussian statistics of one feature size: mu must be [D] and sigma "
                         f"[D,D], got mu {mu.shape} and sigma {sigma.shape}; recompute them")
    require_finite(mu, f"{what} (mu)")
    require_finite(sigma, f"{what} (sigma)")


def check_labels(labels: np.ndarray, count: int, num_classes: int, what: str) -> np.ndarray:
    """int64 [count] labels in [0, num_classes), or a ValueError naming `what` and the fix."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.shape[0] != count:
        raise ValueError(f"{what}: need one label per image ({count}), got labels of shape {labels.shape}; "
                         f"the labels and images come from different runs: sample again into an empty folder")
    if labels.dtype.kind not in "iu":
        raise ValueError(f"{what}: labels must be integers, got {labels.dtype}")
    if count and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"{what}: labels lie in [{int(labels.min())}, {int(labels.max())}] but the classifier "
                         f"knows {num_classes} classes [0, {num_classes}): score them with the classifier of "
                         f"the data the model learnt (--extractor/--weights)")
    return labels.astype(np.int64)
