"""Compare finished `analyze` runs from MLflow: phase boundaries, peaks, correlations, overlays.

Pipeline: ``CompareConfig`` validates itself, ``compare`` reads the runs and returns a ``Comparison``,
``writers.write_comparison`` writes it, ``run_logs.log_comparison`` logs it. MLflow is reached only
through ``mcr_exit.tracking``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from mcr_exit.errors import ConfigError
from mcr_exit.metrics.correlation import fisher_z_mean
from mcr_exit.metrics.registry import mlflow_key

SUMMARY_METRICS = ("compress_start", "refine_start", "compress_start_frac", "refine_start_frac",
                   "peak_norm_ratio", "min_entropy", "corr_bos_entropy", "corr_bos_sink_lag1")
SERIES = (("hidden", "entropy_norm"), ("attention", "sink_rate"), ("hidden", "norm_ratio"))
# Params that change from one execution to the next without changing what was measured.
NOT_CONFIG = ("package_version", "model_location", "device")


@dataclass(frozen=True, kw_only=True)
class CompareConfig:
    run_ids: tuple[str, ...] = ()
    models: tuple[str, ...] = ()  # model names as the analyze runs record them
    experiment: str | None = None
    log_experiment: str | None = None
    tracking_uri: str | None = None
    output_dir: str | None = None
    mlflow: bool = True
    plots: bool = True

    def __post_init__(self):
        object.__setattr__(self, "run_ids", tuple(self.run_ids))
        object.__setattr__(self, "models", tuple(self.models))
        if not self.run_ids and not self.models and self.experiment is None:
            raise ConfigError("compare needs --run, --experiment or --model")


def run_config(run) -> tuple[tuple[str, str], ...]:
    """What an analyze run measured: its params, less those that vary between executions."""
    return tuple(sorted((k, v) for k, v in run.data.params.items() if k not in NOT_CONFIG))


def latest_per_config(runs) -> list:
    """Newest run of each distinct configuration (runs come newest first), oldest first."""
    latest: dict[tuple, object] = {}
    for r in runs:
        latest.setdefault(run_config(r), r)
    return sorted(latest.values(), key=lambda r: r.info.start_time)


def select_runs(client, *, run_ids=(), experiment: str | None = None, models=()) -> list:
    """Runs named by id; else the latest finished analysis of each configuration (model, revision, BOS
    policy, data, dtype, ...) in ``experiment`` (every experiment when None), kept to ``models`` if given."""
    from mcr_exit.tracking import experiment_ids, finished_runs, get_run

    if run_ids:
        runs = [get_run(client, r) for r in run_ids]
        for r in runs:
            if r.data.tags.get("mcr_exit.command") != "analyze":
                raise ConfigError(f"MLflow run '{r.info.run_id}' is not an mcr-exit analyze run")
        return runs
    if not models and experiment is None:
        raise ConfigError("compare needs --run, --experiment or --run-model")
    latest = latest_per_config(finished_runs(client, experiment_ids(client, experiment), "analyze"))
    if models:
        for m in models:
            if not any(r.data.params.get("model") == m for r in latest):
                raise ConfigError(f"no finished analyze run of model '{m}' in {client.tracking_uri}")
        return [r for r in latest if r.data.params.get("model") in models]
    if not latest:
        raise ConfigError(f"MLflow experiment '{experiment}' has no finished analyze runs")
    return latest


def run_labels(runs) -> list[str]:
    """``model@revision`` plus every other config value that differs among ``runs`` (e.g. bos_policy=none)."""
    configs = [dict(run_config(r)) for r in runs]
    keys = sorted({k for c in configs for k in c})
    differing = [k for k in keys if k not in ("model", "revision", "n_layers")
                 and len({c.get(k) for c in configs}) > 1]
    labels, seen = [], set()
    for r, c in zip(runs, configs):
        rev = c.get("revision", "")
        label = c.get("model", r.info.run_id[:8]) + (f"@{rev}" if rev else "")
        extra = [f"{k}={c.get(k, '')}" for k in differing if k not in ("dataset_sha256", "dataset_source")]
        label += f" [{', '.join(extra)}]" if extra else ""
        if label in seen:
            label = f"{label} ({r.info.run_id[:8]})"
        seen.add(label)
        labels.append(label)
    return labels


def _summary(metrics: dict, name: str) -> float:
    # runs logged before the metric keys had prefixes carry the bare name
    return metrics.get(mlflow_key("summary", name), metrics.get(name, float("nan")))


def comparison_table(runs) -> pd.DataFrame:
    """One row per run: phase boundaries (absolute and as a fraction of depth), peaks, correlations."""
    rows = []
    for r, label in zip(runs, run_labels(runs)):
        p = r.data.params
        row = {"label": label, "run_id": r.info.run_id, "model": p.get("model"), "revision": p.get("revision", ""),
               "bos_policy": p.get("bos_policy", ""), "dataset_name": p.get("dataset_name", ""),
               "dtype": p.get("dtype", ""), "n_layers": int(p.get("n_layers", 0))}
        row.update({k: _summary(r.data.metrics, k) for k in SUMMARY_METRICS})
        rows.append(row)
    return pd.DataFrame(rows)


def pooled_correlations(table: pd.DataFrame) -> dict[str, float]:
    """Fisher-z mean and spread across models (the paper: r = -0.9 +- 0.18 and 0.58 +- 0.25)."""
    out = {}
    for key in ("corr_bos_entropy", "corr_bos_sink_lag1"):
        mean, sd = fisher_z_mean(table[key].tolist())
        out[f"{key}_fisher_mean"], out[f"{key}_sd"] = mean, sd
        out[f"{key}_n"] = int(sum(1 for v in table[key] if v is not None and math.isfinite(v)))
    return out


def layer_series(client, run_ids) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """run id -> metric name -> [(layer, value)] from the per-layer step series."""
    from mcr_exit.tracking import metric_history

    out: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for rid in run_ids:
        out[rid] = {}
        for kind, name in SERIES:
            out[rid][name] = metric_history(client, rid, mlflow_key(kind, name)) or metric_history(client, rid, name)
    return out


@dataclass(frozen=True, kw_only=True)
class Comparison:
    table: pd.DataFrame
    pooled: dict[str, float]
    series: dict[str, dict[str, list[tuple[int, float]]]]  # label -> metric -> points
    output_dir: Path | None = None
    run_id: str | None = None


def compare_runs(client, runs) -> Comparison:
    table = comparison_table(runs)
    by_id = layer_series(client, table["run_id"].tolist())
    series = {lab: by_id[rid] for lab, rid in zip(table["label"], table["run_id"])}
    return Comparison(table=table, pooled=pooled_correlations(table), series=series)


def compare(cfg: CompareConfig) -> Comparison:
    """Read the runs, compare them, write the outputs and (unless ``mlflow`` is off) log the comparison."""
    import dataclasses
    import time

    from mcr_exit.analysis.run_logs import log_comparison
    from mcr_exit.analysis.writers import write_comparison
    from mcr_exit.tracking import maybe_run, open_client, run_tags

    from mcr_exit.outputs import check_output_dir

    check_output_dir(cfg.output_dir or f"mcr-exit-runs/.unwritten-{time.time_ns()}", replace=bool(cfg.output_dir))
    client = open_client(cfg.tracking_uri)
    runs = select_runs(client, run_ids=cfg.run_ids, experiment=cfg.experiment, models=cfg.models)
    cmp = compare_runs(client, runs)
    out_dir = Path(cfg.output_dir or f"mcr-exit-runs/compare-{time.strftime('%Y%m%d-%H%M%S')}")
    models = sorted(set(cmp.table["model"].dropna()))
    name = f"compare {len(runs)} runs: " + "; ".join(cmp.table["label"])
    with maybe_run(cfg.mlflow, tracking_uri=cfg.tracking_uri, run_name=name[:250],
                   experiment=cfg.log_experiment or cfg.experiment or "mcr-exit",
                   tags=run_tags("compare", model=",".join(models), n_runs=len(runs))) as logger:
        write_comparison(cmp, out_dir, plots=cfg.plots)
        if logger is not None:
            log_comparison(logger, cmp, out_dir)
    return dataclasses.replace(cmp, output_dir=out_dir, run_id=logger.run_id if logger else None)


def format_table(cmp: Comparison) -> str:
    t = cmp.table
    width = max(34, min(60, max(len(lab) for lab in t["label"]) + 2))
    lines = [f"{'run':<{width}}{'L':>4}{'compress':>10}{'refine':>8}{'c/L':>6}{'r/L':>6}{'peak ratio':>12}"
             f"{'min H':>8}{'r(BOS,H)':>10}{'r(BOS,sink)':>12}"]

    def fmt(v, spec):
        return format(v, spec) if v is not None and math.isfinite(v) else "-"

    for row in t.to_dict(orient="records"):
        lines.append(f"{row['label'][:width - 1]:<{width}}{row['n_layers']:>4}{fmt(row['compress_start'], '>10.0f')}"
                     f"{fmt(row['refine_start'], '>8.0f')}{fmt(row['compress_start_frac'], '>6.2f')}"
                     f"{fmt(row['refine_start_frac'], '>6.2f')}{fmt(row['peak_norm_ratio'], '>12.1f')}"
                     f"{fmt(row['min_entropy'], '>8.3f')}{fmt(row['corr_bos_entropy'], '>+10.2f')}"
                     f"{fmt(row['corr_bos_sink_lag1'], '>+12.2f')}")
    p = cmp.pooled
    lines.append(f"Fisher-z mean over {p['corr_bos_entropy_n']} runs: r(dBOS, dH) = "
                 f"{p['corr_bos_entropy_fisher_mean']:+.2f} +- {p['corr_bos_entropy_sd']:.2f}; "
                 f"r(dBOS, dsink) = {p['corr_bos_sink_lag1_fisher_mean']:+.2f} +- {p['corr_bos_sink_lag1_sd']:.2f}")
    return "\n".join(lines)
