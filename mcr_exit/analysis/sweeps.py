"""Training-checkpoint sweeps (paper Figure 2): one `analyze` run per revision, then one plot of
entropy, sink rate and BOS norm against training step.

A revision is resolved to what ``load_model`` gets: a Hub id with ``revision=...`` (e.g. Pythia's
``step1000`` branches), or, when ``model`` is a local folder holding one sub-folder per revision
(``DIR/step1000/``), that sub-folder.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from mcr_exit.errors import ConfigError

_STEP = re.compile(r"(?:^|[^a-z])(?:step|ckpt|checkpoint|iter)[-_]?(\d+)", re.IGNORECASE)


def parse_revisions(values) -> list[str]:
    """Repeated and/or comma-separated --revision values, in order, without duplicates."""
    out: list[str] = []
    for v in values:
        for part in str(v).split(","):
            part = part.strip()
            if part and part not in out:
                out.append(part)
    if not out:
        raise ConfigError("a sweep needs at least one --revision")
    return out


def training_step(revision: str) -> int | None:
    """'step1000' -> 1000; None when the name carries no step."""
    m = _STEP.search(revision)
    return int(m.group(1)) if m else None


def checkpoint_steps(revisions: list[str]) -> dict[str, float]:
    """Training step per revision; revisions without one keep their order after the known ones."""
    steps = {r: training_step(r) for r in revisions}
    top = max([s for s in steps.values() if s is not None], default=0)
    return {r: float(s) if s is not None else float(top + 1 + k) for k, (r, s) in enumerate(steps.items())}


def resolve_checkpoint(model: str | None, revision: str) -> tuple[str | None, str | None]:
    """(model argument, revision argument) for ``load_model``."""
    if model is not None:
        folder = Path(model).expanduser()
        if folder.is_dir():
            sub = folder / revision
            if sub.is_dir():
                return str(sub), None
            raise ConfigError(f"checkpoint folder {sub} does not exist (local sweeps need DIR/<revision>/)")
    return model, revision


@dataclass(frozen=True, kw_only=True)
class SweepResult:
    table: pd.DataFrame  # one row per checkpoint
    run_ids: dict[str, str | None]
    parent_run_id: str | None
    output_dir: Path


def _row(revision: str, step: float, profile: dict, run_id: str | None) -> dict:
    p = profile["phases"]
    layers = pd.DataFrame(profile["layers"])
    return {"revision": revision, "step": step, "run_id": run_id, "phases_found": p["found"],
            "compress_start": p["compress_start"], "refine_start": p["refine_start"],
            "peak_norm_ratio": p["peak_norm_ratio"], "min_entropy": p["min_entropy"],
            "max_sink_rate": float(np.nanmax(layers["sink_rate"].to_numpy(dtype=float))),
            "peak_bos_norm": float(np.nanmax(layers["bos_norm"].to_numpy(dtype=float))),
            "corr_bos_entropy": p["corr_bos_entropy"], "corr_bos_sink_lag1": p["corr_bos_sink_lag1"]}


def run_sweep(cfg, revisions: list[str], *, loader=None, output_dir: Path) -> SweepResult:
    """``cfg`` is an ``AnalyzeConfig`` (its model/revision/output_dir are set per checkpoint).

    ``loader(model, revision)`` loads one checkpoint (default: ``load_model`` with cfg's dtype/device).
    With MLflow on, each checkpoint's analysis run becomes a child of one sweep run.
    """
    from mcr_exit.analysis import ablation_plots
    from mcr_exit.analysis.run import analyze
    from mcr_exit.models import load_model

    steps = checkpoint_steps(revisions)
    loader = loader or (lambda m, r: load_model(m, revision=r, dtype=cfg.dtype, device=cfg.device))
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    def work(parent) -> SweepResult:
        rows, tables, run_ids = [], {}, {}
        for rev in revisions:
            model_arg, rev_arg = resolve_checkpoint(cfg.model, rev)
            loaded = loader(model_arg, rev_arg)
            loaded = dataclasses.replace(loaded, spec=dataclasses.replace(loaded.spec, revision=rev))
            sub = dataclasses.replace(cfg, revision=rev, output_dir=str(output_dir / rev.replace("/", "_")))
            res = analyze(sub, loaded=loaded)
            if parent is not None and res.run_id:
                parent.client.set_tag(res.run_id, "mlflow.parentRunId", parent.run_id)
                parent.client.set_tag(res.run_id, "mcr_exit.sweep_step", str(steps[rev]))
            run_ids[rev] = res.run_id
            tables[rev] = pd.DataFrame(res.profile["layers"])
            rows.append(_row(rev, steps[rev], res.profile, res.run_id))
        table = pd.DataFrame(rows).sort_values("step").reset_index(drop=True)
        staging = Path(tempfile.mkdtemp(prefix=".sweep.", dir=output_dir))
        try:
            table.to_csv(staging / "sweep.csv", index=False)
            if cfg.plots:
                ablation_plots.plot_training_sweep(tables, steps, f"{cfg.model or 'built-in model'}: checkpoints",
                                                   staging / "training_sweep.png")
            if parent is not None:
                parent.log_series([(int(r["step"]), {k: r[k] for k in ("peak_norm_ratio", "min_entropy",
                                                                         "max_sink_rate", "peak_bos_norm")})
                                   for r in table.to_dict(orient="records")])
                parent.log_artifacts(staging)
            for f in staging.iterdir():
                shutil.move(str(f), output_dir / f.name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return SweepResult(table=table, run_ids=run_ids, parent_run_id=parent.run_id if parent else None,
                           output_dir=output_dir)

    if not cfg.mlflow:
        return work(None)
    from mcr_exit.tracking import tracked_run

    with tracked_run(tracking_uri=cfg.tracking_uri, experiment=cfg.experiment,
                     run_name=f"sweep {cfg.model or 'built-in'}", tags={"mcr_exit.command": "sweep"}) as parent:
        parent.log_params({"model": cfg.model or "built-in", "revisions": ",".join(revisions)})
        return work(parent)
