"""Correlations of layer-to-layer changes (paper App. B, "Pearson Correlations")."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def _zscore(x: np.ndarray) -> np.ndarray:
    sd = x.std()
    return (x - x.mean()) / sd if sd > 0 else np.zeros_like(x)


def delta_correlation(a: Sequence[float], b: Sequence[float], lag: int = 0) -> float:
    """Pearson r between z-scored first differences of two layer trajectories.

    Each trajectory is z-scored over layers, then differenced: Delta_l = z_l - z_{l-1}.
    ``lag`` pairs Delta a_l with Delta b_{l+lag} (the paper uses lag 1 for BOS norm vs sink rate).
    Returns NaN when fewer than 3 pairs remain or either side is constant.
    """
    a = np.asarray(a, dtype=float)
    b = np.asarray(b, dtype=float)
    keep = np.isfinite(a) & np.isfinite(b)
    if keep.sum() < 3:
        return float("nan")
    # Both series are z-scored over the layers where both are defined (the last hidden state has
    # no attention block reading it, so a sink-rate series ends one row early).
    da = np.diff(_zscore(a[keep]))
    db = np.diff(_zscore(b[keep]))
    if lag:
        da, db = da[:-lag], db[lag:]
    if len(da) < 2 or da.std() == 0 or db.std() == 0:
        return float("nan")
    return float(np.corrcoef(da, db)[0, 1])


def fisher_z_mean(rs: Sequence[float]) -> tuple[float, float]:
    """Fisher-z average of correlations; returns (mean r, standard deviation of r across inputs)."""
    vals = np.array([r for r in rs if r is not None and math.isfinite(r)], dtype=float)
    if len(vals) == 0:
        return float("nan"), float("nan")
    z = np.arctanh(np.clip(vals, -0.999999, 0.999999))
    return float(np.tanh(z.mean())), float(vals.std())
