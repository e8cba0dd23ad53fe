"""MLflow logging of finished results, one function per command. Each consumes a result that the
command's library function returned; metric keys come from the registry (metrics/registry.py)."""

from __future__ import annotations

import math

from mcr_exit.metrics.registry import (
    ATTENTION_METRICS,
    CHECKPOINT_METRICS,
    HIDDEN_METRICS,
    depth_key,
    depth_step,
    keyed,
)

# One value per ablation variant (child runs); the parent logs the baseline and ablated pairs.
VARIANT_SUMMARY = ("bos_norm_at_spike", "norm_ratio_at_spike", "entropy_at_spike", "peak_norm_ratio",
                   "min_entropy", "mean_entropy_window", "mean_entropy_norm_window", "mean_sink_rate_window",
                   "loss", "delta_loss", "gamma")
PARENT_PAIRS = ("peak_norm_ratio", "entropy_at_spike", "mean_sink_rate_window", "loss")


def _number(v) -> float | None:
    if v is None or isinstance(v, bool):
        return None
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def layer_series(table) -> list[tuple[int, dict[str, float]]]:
    """Per-layer step series (step = hidden index for hidden/..., block index for attention/...), and the
    same values under ``depth/...`` with step = round(100 * index / L), so models of different depth
    overlay in the MLflow UI."""
    L = int(table["index"].max())
    rows = []
    for row in table.to_dict(orient="records"):
        values = keyed("hidden", {k: row[k] for k in HIDDEN_METRICS})
        values.update(keyed("attention", {k: row[k] for k in ATTENTION_METRICS}))
        i = int(row["index"])
        rows.append((i, values))
        rows.append((depth_step(i, L), {depth_key(k): v for k, v in values.items()}))
    return rows


def phase_summary(phases, embedding_layer: int) -> dict[str, float]:
    summary = {
        "peak_norm_ratio": phases.peak_norm_ratio, "min_entropy": phases.min_entropy,
        "corr_bos_entropy": phases.corr_bos_entropy, "corr_bos_sink_lag1": phases.corr_bos_sink_lag1,
        "embedding_layer": embedding_layer,
    }
    if phases.found:
        summary.update({
            "compress_start": phases.compress_start, "refine_start": phases.refine_start,
            "compress_start_frac": phases.compress_start / phases.n_layers,
            "refine_start_frac": phases.refine_start / phases.n_layers,
            "carrier_norm_share": phases.carrier_norm_share,
        })
    return summary


def log_analysis(logger, result) -> None:
    """analyze: per-layer series, one-value summaries, the metric legend (the output files are logged by
    the caller once the folder is written: these values need only the result)."""
    logger.log_series(layer_series(result.table))
    logger.log_metrics(keyed("summary", phase_summary(result.phases, result.profile["embedding_layer"])))
    p = result.phases
    logger.set_tags({"mcr_exit.phases_found": str(p.found), "mcr_exit.carrier": str(p.carrier)})
    logger.describe_metrics(("hidden", "attention", "summary"))


def log_ablation(logger, result, *, tracking_uri, experiment: str) -> None:
    """ablate: one child run per variant (its layer series and summary), the pairs on the parent."""
    from mcr_exit.tracking import run_tags, tracked_run

    outcome, params = result.outcome, result.params
    logger.log_params({**params, "blocks": ",".join(map(str, outcome.blocks)), "spike_layer": outcome.spike_layer})
    logger.set_tags({"mcr_exit.position0_special": str(result.note is None)})
    for r, row in zip(outcome.results, outcome.summary.to_dict(orient="records")):
        tags = run_tags("ablate-variant", model=params["model"], variant=r.variant.kind)
        with tracked_run(tracking_uri=tracking_uri, experiment=experiment, run_name=f"{result.name} · {r.variant.name}",
                         tags=tags, parent_run_id=logger.run_id) as child:
            child.log_params({**params, "variant": r.variant.name, "kind": r.variant.kind,
                              "blocks": row["blocks"], "clip_layer": row["clip_layer"], "gamma": row["gamma"]})
            child.log_series(layer_series(r.table))
            child.log_metrics(keyed("summary", {k: _number(row[k]) for k in VARIANT_SUMMARY}))
            child.describe_metrics(("hidden", "attention", "summary"))
    base, abl = outcome.summary.iloc[0], outcome.summary.iloc[1]
    metrics = keyed("summary", {k: _number(base[k]) for k in PARENT_PAIRS}, scope="baseline")
    metrics.update(keyed("summary", {k: _number(abl[k]) for k in PARENT_PAIRS}, scope="ablated"))
    metrics.update(keyed("summary", {"delta_loss": _number(abl["delta_loss"]), "spike_layer": outcome.spike_layer}))
    logger.log_metrics(metrics)
    logger.describe_metrics(("summary",))
    logger.log_artifacts(result.output_dir)


def log_comparison(logger, cmp, out_dir) -> None:
    """compare: which runs, the pooled correlations, the output files."""
    logger.log_params({"runs": ",".join(cmp.table["run_id"]), "labels": " | ".join(cmp.table["label"]),
                       "n_runs": len(cmp.table)})
    logger.log_metrics(keyed("summary", dict(cmp.pooled)))
    logger.describe_metrics(("summary",))
    logger.log_artifacts(out_dir)


def log_sweep(logger, table, out_dir) -> None:
    """sweep: one value per checkpoint, step = training step."""
    logger.log_series([(int(r["step"]), keyed("checkpoint", {k: r[k] for k in CHECKPOINT_METRICS}))
                       for r in table.to_dict(orient="records")])
    logger.describe_metrics(("checkpoint",))
    logger.log_artifacts(out_dir)
