"""Find the mix -> compress and compress -> refine boundaries from a per-layer profile.

Each phenomenon is located as the contiguous run of layers around its extreme (peak norm ratio,
entropy minimum, sink-rate maximum) where it stays past the halfway level between its extreme and
its baseline. A smaller earlier bump (SmolLM2 has one at hidden 3-9, ratio ~9 against ~180) is not
part of that run, so it is never taken for the main onset.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from mcr_exit.metrics.correlation import delta_correlation

# A massive activation needs the BOS norm to exceed the others' mean by at least this factor, and
# to rise by at least this many decades over its pre-peak baseline.
MIN_PEAK_RATIO = 10.0
MIN_RISE_DECADES = 1.0


@dataclass(frozen=True, kw_only=True)
class Phases:
    found: bool
    note: str
    n_layers: int
    compress_start: int | None  # hidden index of the first compress-phase state
    refine_start: int | None  # hidden index of the first refine-phase state
    massive_activation_layer: int | None  # hidden index where the norm ratio run starts
    entropy_valley_layer: int | None  # hidden index where the entropy valley run starts
    sink_surge_layer: int | None  # attention (block) index where the sink-rate run starts
    peak_norm_ratio: float
    min_entropy: float
    carrier: str | None  # "norm" (c dominates the bound) or "alignment" (alpha does)
    carrier_norm_share: float | None  # median over compress layers of c / (c + alpha)
    corr_bos_entropy: float
    corr_bos_sink_lag1: float  # BOS norm after block l vs sink rate of block l + 1

    def fractions(self) -> dict[str, float | None]:
        L = self.n_layers
        return {
            "compress_start": None if self.compress_start is None else self.compress_start / L,
            "refine_start": None if self.refine_start is None else self.refine_start / L,
        }

    def as_dict(self) -> dict:
        d = asdict(self)
        d["fractions"] = self.fractions()
        return d


def _run_around(values: np.ndarray, center: int, inside) -> tuple[int, int]:
    """Largest contiguous [start, end] around ``center`` where inside(values[i]) holds."""
    start = end = center
    while start - 1 >= 0 and np.isfinite(values[start - 1]) and inside(values[start - 1]):
        start -= 1
    while end + 1 < len(values) and np.isfinite(values[end + 1]) and inside(values[end + 1]):
        end += 1
    return start, end


def _run_start_of_peak(values: np.ndarray) -> int | None:
    """Start of the run around the maximum where values stay above halfway from the pre-peak minimum."""
    if not np.isfinite(values).any():
        return None
    peak = int(np.nanargmax(values))
    base = float(np.nanmin(values[: peak + 1]))
    top = float(values[peak])
    if top <= base:
        return None
    half = base + 0.5 * (top - base)
    return _run_around(values, peak, lambda v: v >= half)[0]


def detect_phases(
    *,
    bos_norm: np.ndarray,
    norm_ratio: np.ndarray,
    entropy: np.ndarray,
    entropy_norm: np.ndarray,
    sink_rate: np.ndarray,
    c: np.ndarray,
    alpha: np.ndarray,
) -> Phases:
    """Phases from per-layer means. Hidden-indexed arrays have L+1 entries; ``sink_rate`` has L."""
    L = len(norm_ratio) - 1
    corr_e = delta_correlation(bos_norm, entropy)
    # The paper pairs the BOS norm after block l with the sink rate of block l + 1 ("one layer
    # later"). Block l + 1 reads hidden[l + 1], the output of block l: in this package's table that
    # is the same row (hidden[i] with attention[i]), so no shift is applied here.
    corr_s = delta_correlation(bos_norm[:L], sink_rate)
    log_ratio = np.log10(np.clip(norm_ratio, 1e-12, None))
    peak = int(np.nanargmax(log_ratio))
    peak_ratio = float(norm_ratio[peak])
    base = float(np.nanmin(log_ratio[: peak + 1]))
    common = dict(
        n_layers=L,
        peak_norm_ratio=peak_ratio,
        min_entropy=float(np.nanmin(entropy)),
        corr_bos_entropy=corr_e,
        corr_bos_sink_lag1=corr_s,
        entropy_valley_layer=None,
        sink_surge_layer=None,
    )
    if peak_ratio < MIN_PEAK_RATIO or log_ratio[peak] - base < MIN_RISE_DECADES:
        return Phases(
            found=False,
            note=(f"no massive activation: peak position-0/other norm ratio {peak_ratio:.3g} at hidden {peak} "
                  f"(needs >= {MIN_PEAK_RATIO:g} and a rise of >= {MIN_RISE_DECADES:g} decade)"),
            compress_start=None, refine_start=None, massive_activation_layer=None,
            carrier=None, carrier_norm_share=None, **common,
        )
    half = base + 0.5 * (log_ratio[peak] - base)
    start, _ = _run_around(log_ratio, peak, lambda v: v >= half)
    # The compress phase ends once the ratio has fallen a decade below its peak (norms equalize) ...
    end_level = max(half, log_ratio[peak] - 1.0)
    _, end = _run_around(log_ratio, peak, lambda v: v >= end_level)
    valley = int(np.nanargmin(entropy_norm))
    low = float(entropy_norm[valley])
    pre = float(np.nanmax(entropy_norm[: valley + 1]))
    v_start, _ = _run_around(entropy_norm, valley, lambda v: v <= low + 0.5 * (pre - low))
    # ... or once the entropy has recovered a quarter of the way back (decompression), if earlier.
    _, v_end = _run_around(entropy_norm, valley, lambda v: v <= low + 0.25 * (pre - low))
    refine = min(end, v_end) + 1 if start <= v_end else end + 1
    refine = min(max(refine, start + 1), L)
    share = c[start:refine] / (c[start:refine] + alpha[start:refine])
    share_med = float(np.nanmedian(share)) if len(share) else float("nan")
    return Phases(
        found=True,
        note="",
        compress_start=start,
        refine_start=refine,
        massive_activation_layer=start,
        carrier="norm" if share_med >= 0.5 else "alignment",
        carrier_norm_share=share_med,
        **{**common, "entropy_valley_layer": v_start, "sink_surge_layer": _run_start_of_peak(sink_rate)},
    )


def recommend_embedding_layer(phases: Phases) -> tuple[int, str]:
    """A hidden index inside the compress phase: its midpoint (paper Sec. 5: embedding tasks peak there)."""
    L = phases.n_layers
    if not phases.found:
        return L // 2, "no compress phase found: middle of the network"
    k = (phases.compress_start + phases.refine_start - 1) // 2
    return k, f"midpoint of the compress phase (hidden {phases.compress_start}..{phases.refine_start - 1})"
