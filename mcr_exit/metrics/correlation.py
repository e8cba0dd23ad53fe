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


def fisher_z_interval(r: float, n: int, z_crit: float = 1.959964) -> tuple[float, float]:
    """The usual 95 % interval of one Pearson r from n pairs: tanh(atanh(r) -+ z_crit / sqrt(n - 3)).
    NaNs when n <= 3 or r is not finite. (Layer-to-layer changes are not independent draws: read it as a
    rough guide, as the paper's +- across models is.)"""
    if n <= 3 or r is None or not math.isfinite(r):
        return float("nan"), float("nan")
    z, half = math.atanh(max(-0.999999, min(0.999999, r))), z_crit / math.sqrt(n - 3)
    return math.tanh(z - half), math.tanh(z + half)


def fisher_z_pooled(rs: Sequence[float], ns: Sequence[int], z_crit: float = 1.959964) -> tuple[float, float, float]:
    """Correlations of several models pooled by Fisher z, each weighted by n - 3 (its inverse variance):
    (pooled r, lower, upper) of the 95 % interval tanh(z_bar -+ z_crit / sqrt(sum(n - 3)))."""
    pairs = [(r, n) for r, n in zip(rs, ns) if r is not None and math.isfinite(r) and n > 3]
    if not pairs:
        return float("nan"), float("nan"), float("nan")
    w = np.array([n - 3 for _, n in pairs], dtype=float)
    z = np.arctanh(np.clip([r for r, _ in pairs], -0.999999, 0.999999))
    zbar, half = float((w * z).sum() / w.sum()), z_crit / math.sqrt(w.sum())
    return math.tanh(zbar), math.tanh(zbar - half), math.tanh(zbar + half)
