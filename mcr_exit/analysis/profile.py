"""Per-layer tables (means over prompts, long per-prompt format, per head) from collected statistics.

The columns are the registry's names (``mcr_exit/metrics/registry.py``); the profile document built
from the layer table is defined in ``mcr_exit/phase_profile.py`` (re-exported here).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from mcr_exit.analysis.collect import LayerStatistics
from mcr_exit.metrics.registry import ATTENTION_METRICS, HEAD_METRICS, HIDDEN_METRICS
from mcr_exit.phase_profile import (  # noqa: F401 - re-exported for callers of the analysis package
    PROFILE_FILE,
    SCHEMA,
    SCHEMA_VERSION,
    build_profile as _build_profile,
    read_profile,
    write_profile,
)


def _check_names(what: str, found, registered: tuple[str, ...]) -> None:
    """Every collected statistic has a registered name and every registered name was collected."""
    extra, missing = set(found) - set(registered), set(registered) - set(found)
    if extra or missing:
        raise KeyError(f"{what} statistics and the metric registry disagree: not registered "
                       f"{sorted(extra)}, not collected {sorted(missing)}")


def _mean_std(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with np.errstate(all="ignore"):
        finite = np.where(np.isfinite(a), a, np.nan)
        return np.nanmean(finite, axis=0), np.nanstd(finite, axis=0)


def layer_table(stats: LayerStatistics) -> pd.DataFrame:
    """One row per hidden index 0..L: means and standard deviations over prompts.

    Attention columns on row i describe block i, which reads hidden[i]; they are NaN on row L.
    """
    _check_names("hidden-state", stats.hidden, HIDDEN_METRICS)
    _check_names("attention", stats.attention, ATTENTION_METRICS)
    L = stats.n_layers
    cols: dict[str, np.ndarray] = {"index": np.arange(L + 1), "fraction": np.arange(L + 1) / L}
    for key in HIDDEN_METRICS:
        mean, std = _mean_std(stats.hidden[key])
        cols[key], cols[f"{key}_std"] = mean, std
    for key in ATTENTION_METRICS:
        mean, std = _mean_std(stats.attention[key])
        cols[key] = np.append(mean, np.nan)
        cols[f"{key}_std"] = np.append(std, np.nan)
    return pd.DataFrame(cols)


def per_prompt_table(stats: LayerStatistics, prompt_ids: list[int]) -> pd.DataFrame:
    """Long format: one row per (prompt, hidden index), hidden and attention metrics side by side."""
    N, L = stats.n_prompts, stats.n_layers
    frame = {
        "prompt": np.repeat(prompt_ids, L + 1),
        "n_tokens": np.repeat(stats.lengths, L + 1),
        "index": np.tile(np.arange(L + 1), N),
    }
    for key in HIDDEN_METRICS:
        frame[key] = stats.hidden[key].reshape(-1)
    pad = np.full((N, 1), np.nan)
    for key in ATTENTION_METRICS:
        frame[key] = np.concatenate([stats.attention[key], pad], axis=1).reshape(-1)
    return pd.DataFrame(frame)


def head_table(stats: LayerStatistics) -> pd.DataFrame:
    """Per-head means over prompts: one row per (block, head)."""
    _check_names("per-head", stats.heads, HEAD_METRICS)
    L, H = stats.n_layers, stats.n_heads
    frame = {"block": np.repeat(np.arange(L), H), "head": np.tile(np.arange(H), L)}
    for key in HEAD_METRICS:
        frame[key] = np.nanmean(stats.heads[key], axis=0).reshape(-1)
    return pd.DataFrame(frame)


def build_profile(*, table: pd.DataFrame, **kwargs) -> dict:
    """The phase_profile.json document from a layer table (see ``mcr_exit.phase_profile.build_profile``)."""
    return _build_profile(layers=table.to_dict(orient="records"), **kwargs)
