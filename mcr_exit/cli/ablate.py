"""`mcr-exit ablate`: remove the MLP's write into BOS (paper Fig. 4) and clip the BOS residual (Fig. 20)."""

from __future__ import annotations

import click

from mcr_exit.cli.options import data_options, model_options, tracking_options


def summary_text(outcome, note: str | None) -> str:
    s = outcome.summary
    lines = [f"ablated blocks {','.join(map(str, outcome.blocks))} (MLP write into position 0); "
             f"spike layer hidden {outcome.spike_layer}"]
    if note:
        lines.append(f"  note: {note}")
    lines.append(f"  {'variant':<22}{'ratio@spike':>12}{'H@spike':>9}{'peak ratio':>11}{'min H':>8}"
                 f"{'sink(window)':>13}{'loss':>8}{'dloss':>8}")
    for row in s.to_dict(orient="records"):
        lines.append(f"  {row['variant']:<22}{row['norm_ratio_at_spike']:>12.2f}{row['entropy_at_spike']:>9.3f}"
                     f"{row['peak_norm_ratio']:>11.1f}{row['min_entropy']:>8.3f}{row['mean_sink_rate_window']:>13.3f}"
                     f"{row['loss']:>8.3f}{row['delta_loss']:>+8.3f}")
    return "\n".join(lines)


@click.command("ablate")
@model_options
@data_options
@click.option("--blocks", "layers", default="auto", show_default=True, metavar="auto|J,J-K",
              help="Blocks, counted from 0, whose MLP write into position 0 is removed, e.g. 0,5-7 (block j "
                   "reads hidden j and writes hidden j+1); auto = every block that builds the massive activation.")
@click.option("--clip", default=None, metavar="auto|G1,G2,...",
              help="Also clip the BOS residual to [-g, g] at the spike layer, for each value (auto: a sweep).")
@click.option("--clip-layer", type=int, default=None,
              help="Hidden index to clip (default: right after the last ablated block).")
@click.option("--tau", type=float, default=0.3, show_default=True, help="Sink threshold tau in (0, 1].")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Prompts per forward pass.")
@click.option("--output-dir", default=None,
              help="Where to write the outputs. Default: ./mcr-exit-runs/ablate-<model>-<time>.")
@click.option("--no-plots", is_flag=True, help="Skip the figures.")
@tracking_options
def ablate_command(model, revision, dtype, device, data, field, max_prompts, max_length, bos, layers, clip,
                   clip_layer, tau, batch_size, output_dir, no_plots, tracking_uri, experiment, no_mlflow):
    """Causal test: remove the massive activation and watch compression and sinks go."""
    from mcr_exit.run_state import preflight

    preflight(output_dir, mlflow=not no_mlflow, tracking_uri=tracking_uri)  # in a second, before torch loads
    from mcr_exit.analysis.ablate_run import AblateConfig, ablate

    cfg = AblateConfig(layers=layers, clip=clip, clip_layer=clip_layer, tau=tau, batch_size=batch_size,
                       model=model, revision=revision, dtype=dtype, device=device, bos=bos, data=data, field=field,
                       max_prompts=max_prompts, max_length=max_length, output_dir=output_dir,
                       tracking_uri=tracking_uri, experiment=experiment, mlflow=not no_mlflow, plots=not no_plots)
    result = ablate(cfg, on_note=lambda note: click.echo(f"note: {note}", err=True), on_result=lambda r: click.echo(
        f"  {r.variant.name}: peak ratio {r.phases.peak_norm_ratio:.1f}, loss {r.loss:.3f}", err=True))
    click.echo(summary_text(result.outcome, result.note))
    click.echo(f"  outputs: {result.output_dir}" + (f"; MLflow run {result.run_id}" if result.run_id else "")
               + f"; took {result.seconds:.1f} s")
