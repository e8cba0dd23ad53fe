"""`mcr-exit compare` (finished analyze runs side by side) and `mcr-exit sweep` (training checkpoints)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from mcr_exit.cli.options import DTYPES, data_options, tracking_options
from mcr_exit.errors import ConfigError
from mcr_exit.outputs import staged_output_dir


@click.command("compare")
@click.option("--run", "run_ids", multiple=True, help="MLflow run id of an analyze run (repeatable).")
@click.option("--run-model", "models", multiple=True, metavar="NAME",
              help="Latest finished analyze run whose model name (the run's `model` param) is NAME (repeatable).")
@click.option("--experiment", default=None, help="Take the analyze runs of this experiment (and log there).")
@click.option("--log-experiment", default=None, help="Experiment for the comparison run. Default: --experiment or mcr-exit.")
@click.option("--tracking-uri", default=None, help="MLflow tracking URI. Default: $MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db.")
@click.option("--output-dir", default=None,
              help="Where to write the outputs. Default: ./mcr-exit-runs/compare-<time>.")
@click.option("--no-mlflow", is_flag=True, help="Do not log the comparison as a run (still reads runs from MLflow).")
@click.option("--no-plots", is_flag=True, help="Skip the figure.")
def compare_command(run_ids, models, experiment, log_experiment, tracking_uri, output_dir, no_mlflow, no_plots):
    """Phase boundaries, peaks and Fisher-z pooled correlations across models (or checkpoints)."""
    from mcr_exit.analysis import ablation_plots
    from mcr_exit.analysis.compare import client_for, compare_runs, format_table, select_runs

    client = client_for(tracking_uri)
    runs = select_runs(client, run_ids=run_ids, experiment=experiment, models=models)
    cmp = compare_runs(client, runs)
    out_dir = Path(output_dir or f"mcr-exit-runs/compare-{time.strftime('%Y%m%d-%H%M%S')}")
    with staged_output_dir(out_dir) as staging:
        cmp.table.to_csv(staging / "comparison.csv", index=False)
        (staging / "comparison.json").write_text(json.dumps(
            {"runs": json.loads(cmp.table.to_json(orient="records")), "pooled": cmp.pooled}, indent=2) + "\n")
        if not no_plots:
            n_layers = dict(zip(cmp.table["label"], cmp.table["n_layers"]))
            ablation_plots.plot_relative_depth(cmp.series, n_layers, f"{len(runs)} runs against relative depth",
                                               staging / "relative_depth.png")
        run_id = None
        if not no_mlflow:
            from mcr_exit.tracking import tracked_run

            with tracked_run(tracking_uri=tracking_uri, experiment=log_experiment or experiment or "mcr-exit",
                             run_name=f"compare {len(runs)} runs", tags={"mcr_exit.command": "compare"}) as logger:
                logger.log_params({"runs": ",".join(cmp.table["run_id"]), "labels": ",".join(cmp.table["label"])})
                logger.log_metrics({k: v for k, v in cmp.pooled.items()})
                logger.log_artifacts(staging)
                run_id = logger.run_id
    click.echo(format_table(cmp))
    click.echo(f"outputs: {out_dir}" + (f"; MLflow run {run_id}" if run_id else ""))


@click.command("sweep")
@click.option("--model", default=None, metavar="ID|DIR",
              help="Hub id with checkpoint revisions, or a folder holding one sub-folder per revision.")
@click.option("--revision", "revisions", multiple=True, required=True,
              help="Checkpoints, repeatable or comma-separated (e.g. step1000,step8000,step143000).")
@click.option("--dtype", default="auto", show_default=True, type=click.Choice(DTYPES),
              help="Weights dtype; auto = float32 on CPU, bfloat16 on GPU.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N, mps, or auto.")
@data_options
@click.option("--tau", type=float, default=0.3, show_default=True, help="Sink threshold tau in (0, 1].")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Prompts per forward pass.")
@click.option("--output-dir", default=None,
              help="Where to write the outputs. Default: ./mcr-exit-runs/sweep-<time>.")
@click.option("--no-plots", is_flag=True, help="Skip the figures.")
@tracking_options
def sweep_command(model, revisions, dtype, device, data, field, max_prompts, max_length, bos, tau, batch_size,
                  output_dir, no_plots, tracking_uri, experiment, no_mlflow):
    """One analysis per training checkpoint; entropy, sinks and BOS norm against training step (Figure 2)."""
    from mcr_exit.analysis.run import AnalyzeConfig
    from mcr_exit.analysis.sweeps import parse_revisions, resolve_checkpoint, run_sweep

    revs = parse_revisions(revisions)
    if model is None:
        raise ConfigError("sweep needs --model (the built-in GGUF has no checkpoints)")
    for r in revs:  # fail on a missing local checkpoint before any run starts
        resolve_checkpoint(model, r)
    cfg = AnalyzeConfig(model=model, dtype=dtype, device=device, bos=bos, data=data, field=field,
                        max_prompts=max_prompts, max_length=max_length, tau=tau, batch_size=batch_size,
                        tracking_uri=tracking_uri, experiment=experiment, mlflow=not no_mlflow, plots=not no_plots)
    out = Path(output_dir or f"mcr-exit-runs/sweep-{time.strftime('%Y%m%d-%H%M%S')}")
    res = run_sweep(cfg, revs, output_dir=out)
    cols = ["revision", "step", "compress_start", "refine_start", "peak_norm_ratio", "min_entropy", "max_sink_rate"]
    click.echo(res.table[cols].to_string(index=False))
    click.echo(f"outputs: {res.output_dir}" + (f"; MLflow sweep run {res.parent_run_id}" if res.parent_run_id else ""))
