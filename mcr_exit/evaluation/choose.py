"""Choose the embedding layer from downstream evidence and record it in phase_profile.json.

Embedding-task evidence (MTEB main scores, else linear-probe test accuracy) overrides the
compress-phase default: ``embedding_layer`` becomes the best-scoring hidden index (the earliest one
on ties, since an earlier exit is cheaper) and ``embedding_layer_source`` records method, tasks,
scores per layer and the default it replaced. Without such evidence the profile is left unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mcr_exit.phase_profile import read_profile
from mcr_exit.errors import DataError


def best_layer(layers: list[int], scores: list[float]) -> int:
    """The earliest hidden index whose score is within 1e-9 of the maximum (NaN ignored)."""
    s = np.array([np.nan if v is None else v for v in scores], dtype=float)
    if not np.isfinite(s).any():
        raise DataError("no finite score to choose a layer from")
    top = np.nanmax(s)
    return int(layers[int(np.flatnonzero(s >= top - 1e-9)[0])])


def embedding_evidence(mteb: dict | None = None, probe: dict | None = None) -> dict | None:
    """Evidence dict (method, task(s), layers, scores, best_layer) from result documents, or None."""
    if mteb is not None:
        r = mteb["result"]
        return {"method": "mteb_main_score", "tasks": r["tasks"], "layers": r["layers"],
                "scores": r["mean_score"], "per_task": r["main_score"], "config": r.get("config", {}),
                "best_layer": best_layer(r["layers"], r["mean_score"])}
    if probe is not None:
        r = probe["result"]
        return {"method": "linear_probe_test_accuracy", "tasks": [probe["data"].get("name", "probe")],
                "layers": r["layers"], "scores": r["test_accuracy"], "config": r.get("config", {}),
                "best_layer": best_layer(r["layers"], r["test_accuracy"])}
    return None


def apply_evidence(profile: dict, evidence: dict | None) -> dict:
    """A copy of the profile with embedding_layer set from the evidence (unchanged when None)."""
    if evidence is None:
        return profile
    L = profile["n_layers"]
    if max(evidence["layers"]) > L:
        raise DataError(f"the evidence covers hidden index {max(evidence['layers'])} but the profile has 0..{L}: "
                        "was it measured on another model?")
    doc = dict(profile)
    old = profile.get("embedding_layer_source") or {}
    # keep the analysis default as "previous" when evidence is applied again
    previous = old.get("previous") or {"embedding_layer": profile["embedding_layer"], "source": old}
    k = evidence["best_layer"]
    doc["embedding_layer"] = k
    doc["embedding_layer_source"] = {
        "method": evidence["method"], "tasks": evidence["tasks"],
        "reason": f"best {evidence['method']} at hidden {k} ({k / L:.0%} of depth) over {len(evidence['layers'])} layers",
        "scores": dict(zip(map(str, evidence["layers"]), evidence["scores"])),
        **({"per_task": evidence["per_task"]} if "per_task" in evidence else {}),
        "config": evidence.get("config", {}), "previous": previous,
    }
    return doc


def update_profile_file(path: str | Path, evidence: dict | None) -> dict:
    """Rewrite phase_profile.json in place (whole or not at all) with the chosen layer; returns the new document."""
    from mcr_exit.evaluation.writers import write_profile_doc

    doc = apply_evidence(read_profile(path), evidence)
    if evidence is not None:
        write_profile_doc(doc, Path(path))
    return doc


@dataclass(frozen=True, kw_only=True)
class LayerChoice:
    """choose-layer's result: the profile with its embedding layer chosen, and what to draw."""

    profile: dict
    profile_path: Path
    rewrite: bool  # False with --dry-run, or when no evidence changed anything
    curves: dict[str, dict | None]  # lens, lmeval, probe, mteb result documents (None: not given)
    figure: Path | None  # where Figure 8 goes; None when no curve was given


def choose_layer(cfg) -> LayerChoice:
    """Read the profile and the curves of a ``ChooseLayerConfig``; choose the layer (nothing is written)."""
    from mcr_exit.evaluation.results import read_curve

    curves = {kind: read_curve(path, kind) if path else None for kind, path in cfg.curve_files.items()}
    evidence = embedding_evidence(mteb=curves["mteb"], probe=curves["probe"])
    profile = apply_evidence(read_profile(cfg.profile_path), evidence)
    return LayerChoice(profile=profile, profile_path=Path(cfg.profile_path),
                       rewrite=evidence is not None and not cfg.dry_run, curves=curves,
                       figure=cfg.figure_path if any(curves.values()) else None)
