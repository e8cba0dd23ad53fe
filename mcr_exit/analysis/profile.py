"""The phase profile: per-layer means over prompts, phases, provenance; written as JSON and CSV."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from mcr_exit.analysis.collect import HEAD_METRICS, LayerStatistics

SCHEMA = "mcr-exit/phase-profile"
SCHEMA_VERSION = 1
PROFILE_FILE = "phase_profile.json"

# Hidden-state metrics (one value per hidden index 0..L) and attention metrics (per block 0..L-1).
HIDDEN_METRICS = (
    "bos_norm", "other_norm", "norm_ratio", "entropy", "entropy_norm", "anisotropy", "sigma1_sq",
    "sigma2_sq", "sigma3_sq", "frob_sq", "dominance", "M", "R", "alpha", "c",
    "sigma1_sq_bound", "sigma1_sq_bound_weak", "dominance_bound", "dominance_bound_weak",
    "anisotropy_bound", "anisotropy_bound_weak", "entropy_bound", "entropy_bound_weak",
)
ATTENTION_METRICS = (
    "sink_rate", "sink_score", "mixing_score", "colsum_concentration", "colsum_rate",
    "diag_score", "svi", "b_plus_d",
)


def _clean(x):
    """JSON-safe floats: NaN and infinities become None."""
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, (np.floating, float)):
        x = float(x)
        return x if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


def _mean_std(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with np.errstate(all="ignore"):
        finite = np.where(np.isfinite(a), a, np.nan)
        return np.nanmean(finite, axis=0), np.nanstd(finite, axis=0)


def layer_table(stats: LayerStatistics) -> pd.DataFrame:
    """One row per hidden index 0..L: means and standard deviations over prompts.

    Attention columns on row i describe block i, which reads hidden[i]; they are NaN on row L.
    """
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
    L, H = stats.n_layers, stats.n_heads
    frame = {"block": np.repeat(np.arange(L), H), "head": np.tile(np.arange(H), L)}
    for key in HEAD_METRICS:
        frame[key] = np.nanmean(stats.heads[key], axis=0).reshape(-1)
    return pd.DataFrame(frame)


def build_profile(
    *, table: pd.DataFrame, phases: dict, embedding_layer: int, embedding_reason: str,
    final_normed: dict, provenance: dict,
) -> dict:
    """The phase_profile.json document (schema version 1)."""
    L = int(table["index"].max())
    layers = []
    for row in table.to_dict(orient="records"):
        entry = {k: v for k, v in row.items()}
        entry["index"] = int(entry["index"])
        if entry["index"] == L:
            for key in ATTENTION_METRICS:
                entry.pop(key, None)
                entry.pop(f"{key}_std", None)
        layers.append(entry)
    doc = {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        **provenance,
        "n_layers": L,
        "phases": phases,
        "embedding_layer": embedding_layer,
        "embedding_layer_source": {"method": "compress_phase_midpoint", "reason": embedding_reason},
        "conventions": {
            "hidden_index": "hidden[i], i = 0..L: 0 = embedding output, i = raw output of block i "
                            "(1-based), L = last block before the final norm",
            "attention_index": "attention[j], j = 0..L-1: block j (0-based), which reads hidden[j]; "
                               "stored on layer row j",
            "entropy_unit": "nats",
            "entropy_norm": "H / log(min(T, d))",
            "position_0": "first real token of each prompt (BOS when present)",
        },
        "final_normed": final_normed,
        "layers": layers,
    }
    return _clean(doc)


def write_profile(doc: dict, out_dir: Path) -> Path:
    path = Path(out_dir) / PROFILE_FILE
    path.write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n")
    return path


def read_profile(path: str | Path) -> dict:
    """Read and validate a phase_profile.json."""
    from mcr_exit.errors import DataError

    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read phase profile {path}: {exc}") from exc
    if doc.get("schema") != SCHEMA:
        raise DataError(f"{path} is not a mcr-exit phase profile (schema={doc.get('schema')!r})")
    if doc.get("schema_version") != SCHEMA_VERSION:
        raise DataError(f"{path}: unsupported phase profile schema version {doc.get('schema_version')}")
    for key in ("model", "n_layers", "phases", "embedding_layer", "layers"):
        if key not in doc:
            raise DataError(f"{path}: phase profile lacks '{key}'")
    return doc
