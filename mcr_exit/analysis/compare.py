"""Compare finished `analyze` runs from MLflow: phase boundaries, peaks, correlations, overlays.

mlflow is imported lazily (inside functions): importing it costs seconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from mcr_exit.errors import ConfigError
from mcr_exit.metrics.correlation import fisher_z_mean

SUMMARY_METRICS = ("compress_start", "refine_start", "compress_start_frac", "refine_start_frac",
                   "peak_norm_ratio", "min_entropy", "corr_bos_entropy", "corr_bos_sink_lag1")
SERIES = ("entropy_norm", "sink_rate", "norm_ratio")
ANALYZE_FILTER = "tags.`mcr_exit.command` = 'analyze' and attributes.status = 'FINISHED'"


def client_for(tracking_uri: str | None):
    from mlflow import MlflowClient

    from mcr_exit.tracking import resolve_tracking_uri

    return MlflowClient(tracking_uri=resolve_tracking_uri(tracking_uri))


def _get_run(client, run_id: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException:
        raise ConfigError(f"MLflow run '{run_id}' does not exist in {client.tracking_uri}") from None


def _experiment_ids(client, experiment: str | None) -> list[str]:
    if experiment is None:
        return [e.experiment_id for e in client.search_experiments()]
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ConfigError(f"MLflow experiment '{experiment}' does not exist in {client.tracking_uri}")
    return [exp.experiment_id]


def select_runs(client, *, run_ids=(), experiment: str | None = None, models=()) -> list:
    """Runs named by id, else the latest finished analysis per model (``models``), else every
    finished analysis of ``experiment`` (latest per model and revision)."""
    if run_ids:
        runs = [_get_run(client, r) for r in run_ids]
        for r in runs:
            if r.data.tags.get("mcr_exit.command") != "analyze":
                raise ConfigError(f"MLflow run '{r.info.run_id}' is not an mcr-exit analyze run")
        return runs
    if not models and experiment is None:
        raise ConfigError("compare needs --run, --experiment or --run-model")
    found = client.search_runs(_experiment_ids(client, experiment), ANALYZE_FILTER,
                               order_by=["attributes.start_time DESC"], max_results=5000)
    latest: dict[tuple[str, str], object] = {}
    for r in found:
        key = (r.data.params.get("model", "?"), r.data.params.get("revision", ""))
        latest.setdefault(key, r)
    if models:
        runs = []
        for m in models:
            hits = [r for (name, _), r in latest.items() if name == m]
            if not hits:
                raise ConfigError(f"no finished analyze run of model '{m}' in {client.tracking_uri}")
            runs += hits
        return runs
    if not latest:
        raise ConfigError(f"MLflow experiment '{experiment}' has no finished analyze runs")
    return sorted(latest.values(), key=lambda r: r.info.start_time)


def run_label(run) -> str:
    rev = run.data.params.get("revision", "")
    bos = run.data.params.get("bos_policy", "auto")
    return (run.data.params.get("model", run.info.run_id[:8]) + (f"@{rev}" if rev else "")
            + (f" [bos={bos}]" if bos != "auto" else ""))


def comparison_table(runs) -> pd.DataFrame:
    """One row per run: phase boundaries (absolute and as a fraction of depth), peaks, correlations."""
    rows, seen = [], set()
    for r in runs:
        label = run_label(r)
        if label in seen:
            label = f"{label} ({r.info.run_id[:8]})"
        seen.add(label)
        m = r.data.metrics
        row = {"label": label, "run_id": r.info.run_id, "model": r.data.params.get("model"),
               "revision": r.data.params.get("revision", ""), "n_layers": int(r.data.params.get("n_layers", 0))}
        row.update({k: m.get(k, float("nan")) for k in SUMMARY_METRICS})
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


def layer_series(client, run_ids, keys=SERIES) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """run id -> metric -> [(layer, value)] from the per-layer step series."""
    return {rid: {k: [(m.step, m.value) for m in client.get_metric_history(rid, k)] for k in keys}
            for rid in run_ids}


@dataclass(frozen=True, kw_only=True)
class Comparison:
    table: pd.DataFrame
    pooled: dict[str, float]
    series: dict[str, dict[str, list[tuple[int, float]]]]  # label -> metric -> points


def compare_runs(client, runs) -> Comparison:
    table = comparison_table(runs)
    by_id = layer_series(client, table["run_id"].tolist())
    series = {lab: by_id[rid] for lab, rid in zip(table["label"], table["run_id"])}
    return Comparison(table=table, pooled=pooled_correlations(table), series=series)


def format_table(cmp: Comparison) -> str:
    t = cmp.table
    lines = [f"{'run':<34}{'L':>4}{'compress':>10}{'refine':>8}{'c/L':>6}{'r/L':>6}{'peak ratio':>12}"
             f"{'min H':>8}{'r(BOS,H)':>10}{'r(BOS,sink)':>12}"]

    def fmt(v, spec):
        return format(v, spec) if v is not None and math.isfinite(v) else "-"

    for row in t.to_dict(orient="records"):
        lines.append(f"{row['label'][:33]:<34}{row['n_layers']:>4}{fmt(row['compress_start'], '>10.0f')}"
                     f"{fmt(row['refine_start'], '>8.0f')}{fmt(row['compress_start_frac'], '>6.2f')}"
                     f"{fmt(row['refine_start_frac'], '>6.2f')}{fmt(row['peak_norm_ratio'], '>12.1f')}"
                     f"{fmt(row['min_entropy'], '>8.3f')}{fmt(row['corr_bos_entropy'], '>+10.2f')}"
                     f"{fmt(row['corr_bos_sink_lag1'], '>+12.2f')}")
    p = cmp.pooled
    lines.append(f"Fisher-z mean over {p['corr_bos_entropy_n']} runs: r(dBOS, dH) = "
                 f"{p['corr_bos_entropy_fisher_mean']:+.2f} +- {p['corr_bos_entropy_sd']:.2f}; "
                 f"r(dBOS, dsink) = {p['corr_bos_sink_lag1_fisher_mean']:+.2f} +- {p['corr_bos_sink_lag1_sd']:.2f}")
    return "\n".join(lines)
