"""Training-checkpoint sweeps (paper Figure 2): one `analyze` run per revision, then one plot of
entropy, sink rate and BOS norm against training step.

A revision is resolved to what ``load_model`` gets: a Hub id with ``revision=...`` (e.g. Pythia's
``step1000`` branches), or, when ``model`` is a local folder holding one sub-folder per revision
(``DIR/step1000/``), that sub-folder.
"""

from __future__ import annotations

import dataclasses
import re
import time
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
class SweepConfig:
    """``analysis`` is applied to every checkpoint (its model/revision/output_dir are set per checkpoint)."""

    analysis: object  # AnalyzeConfig
    revisions: tuple[str, ...] | list[str] | str
    output_dir: str | Path | None = None

    def __post_init__(self):
        revisions = [self.revisions] if isinstance(self.revisions, str) else list(self.revisions)
        object.__setattr__(self, "revisions", tuple(parse_revisions(revisions)))
        if self.analysis.model is None:
            raise ConfigError("sweep needs --model (the built-in GGUF has no checkpoints)")
        for r in self.revisions:  # fail on a missing local checkpoint before any run starts
            resolve_checkpoint(self.analysis.model, r)
        if self.output_dir is None:
            object.__setattr__(self, "output_dir", f"mcr-exit-runs/sweep-{time.strftime('%Y%m%d-%H%M%S')}")


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


def run_sweep(cfg: SweepConfig, *, loader=None) -> SweepResult:
    """One analysis per checkpoint, each into ``<output_dir>/<revision>/``, then sweep.csv and the figure.

    ``loader(model, revision)`` loads one checkpoint (default: ``load_model`` with the analysis's dtype and
    device). With MLflow on, each checkpoint's analysis run becomes a child of one sweep run, opened first.
    The sweep folder is staged: it appears whole, or not at all.
    """
    from mcr_exit.analysis.run import analyze
    from mcr_exit.analysis.run_logs import log_sweep
    from mcr_exit.analysis.writers import write_sweep_summary
    from mcr_exit.models import load_model
    from mcr_exit.outputs import staged_output_dir
    from mcr_exit.tracking import maybe_run, run_name, run_tags

    from mcr_exit.analysis.run import preflight

    acfg, revisions = cfg.analysis, list(cfg.revisions)
    preflight(str(cfg.output_dir), mlflow=acfg.mlflow, tracking_uri=acfg.tracking_uri)
    steps = checkpoint_steps(revisions)
    loader = loader or (lambda m, r: load_model(m, revision=r, dtype=acfg.dtype, device=acfg.device))
    output_dir = Path(cfg.output_dir)
    model = acfg.model or "built-in"
    with maybe_run(acfg.mlflow, tracking_uri=acfg.tracking_uri, experiment=acfg.experiment,
                   run_name=run_name("sweep", Path(model).name, bos=acfg.bos, data=acfg.data and Path(acfg.data).name,
                                     dtype=acfg.dtype,
                                     extra=f"{len(revisions)} checkpoints"),
                   tags=run_tags("sweep", model=model, bos=acfg.bos, dtype=acfg.dtype)) as parent:
        if parent is not None:
            parent.log_params({"model": model, "revisions": ",".join(revisions)})
        with staged_output_dir(output_dir) as staging:
            rows, tables, run_ids = [], {}, {}
            for rev in revisions:
                model_arg, rev_arg = resolve_checkpoint(acfg.model, rev)
                loaded = loader(model_arg, rev_arg)
                loaded = dataclasses.replace(loaded, spec=dataclasses.replace(loaded.spec, revision=rev))
                sub = dataclasses.replace(acfg, revision=rev, output_dir=str(staging / rev.replace("/", "_")))
                res = analyze(sub, loaded=loaded)
                if parent is not None and res.run_id:
                    parent.adopt_child(res.run_id, {"mcr_exit.sweep_step": str(steps[rev])})
                run_ids[rev] = res.run_id
                tables[rev] = pd.DataFrame(res.profile["layers"])
                rows.append(_row(rev, steps[rev], res.profile, res.run_id))
            table = pd.DataFrame(rows).sort_values("step").reset_index(drop=True)
            write_sweep_summary(table, tables, steps, staging, title=f"{model}: checkpoints", plots=acfg.plots)
        if parent is not None:
            log_sweep(parent, table, output_dir)
    return SweepResult(table=table, run_ids=run_ids, parent_run_id=parent.run_id if parent else None,
                       output_dir=output_dir)
