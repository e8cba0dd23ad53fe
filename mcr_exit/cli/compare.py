"""`mcr-exit compare` (finished analyze runs side by side) and `mcr-exit sweep` (training checkpoints)."""

from __future__ import annotations

import click

from mcr_exit.cli.options import DTYPES, data_options, tracking_options


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
    from mcr_exit.analysis.compare import CompareConfig, compare, format_table

    cfg = CompareConfig(run_ids=run_ids, models=models, experiment=experiment, log_experiment=log_experiment,
                        tracking_uri=tracking_uri, output_dir=output_dir, mlflow=not no_mlflow, plots=not no_plots)
    cmp = compare(cfg)
    click.echo(format_table(cmp))
    click.echo(f"outputs: {cmp.output_dir}" + (f"; MLflow run {cmp.run_id}" if cmp.run_id else ""))


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
    from mcr_exit.run_state import preflight

    preflight(output_dir, mlflow=not no_mlflow, tracking_uri=tracking_uri)  # in a second, before torch loads
    from mcr_exit.analysis.run import AnalyzeConfig
    from mcr_exit.analysis.sweeps import SweepConfig, run_sweep

    analysis = AnalyzeConfig(model=model, dtype=dtype, device=device, bos=bos, data=data, field=field,
                             max_prompts=max_prompts, max_length=max_length, tau=tau, batch_size=batch_size,
                             tracking_uri=tracking_uri, experiment=experiment, mlflow=not no_mlflow,
                             plots=not no_plots)
    res = run_sweep(SweepConfig(analysis=analysis, revisions=revisions, output_dir=output_dir))
    cols = ["revision", "step", "compress_start", "refine_start", "peak_norm_ratio", "min_entropy", "max_sink_rate"]
    click.echo(res.table[cols].to_string(index=False))
    click.echo(f"outputs: {res.output_dir}" + (f"; MLflow sweep run {res.parent_run_id}" if res.parent_run_id else ""))
