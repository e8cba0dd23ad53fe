"""`mcr-exit analyze`: the per-layer phase profile of a causal LM."""

from __future__ import annotations

import click

from mcr_exit.cli.options import data_options, model_options, tracking_options


def _progress_factory(total: int):
    from tqdm.auto import tqdm

    bar = tqdm(total=total, unit="prompt", desc="analyze", dynamic_ncols=True)

    def update(n: int) -> None:
        bar.update(n)
        if bar.n >= total:
            bar.close()

    return update


def phase_summary(result) -> str:
    doc, p = result.profile, result.phases
    L = doc["n_layers"]
    lines = [f"{doc['model']['name']}: {L} blocks, {doc['data']['n_prompts']} prompts of {doc['data']['name']}, "
             f"position 0 = {doc['bos']['token'] or 'first text token'} ({doc['bos']['reason']})"]
    if p.found:
        lines += [
            f"  mix      hidden 0..{p.compress_start - 1}",
            f"  compress hidden {p.compress_start}..{p.refine_start - 1}  "
            f"({p.compress_start / L:.0%}..{p.refine_start / L:.0%} of depth)",
            f"  refine   hidden {p.refine_start}..{L}",
            f"  onsets: massive activation at hidden {p.massive_activation_layer}, entropy valley at hidden "
            f"{p.entropy_valley_layer}, sink surge at block {p.sink_surge_layer}",
            f"  peak BOS/other norm ratio {p.peak_norm_ratio:.1f}, min entropy {p.min_entropy:.3f} nats; "
            f"compression carried by {p.carrier} (c/(c+alpha) = {p.carrier_norm_share:.3f})",
        ]
    else:
        lines.append(f"  phases not found: {p.note}")
    lines += [
        f"  corr(dBOS, dentropy) = {p.corr_bos_entropy:+.2f}; corr(dBOS, dsink rate next block) = "
        f"{p.corr_bos_sink_lag1:+.2f}",
        f"  embedding layer: hidden {doc['embedding_layer']} ({doc['embedding_layer_source']['reason']})",
        f"  outputs: {result.output_dir}" + (f"; MLflow run {result.run_id}" if result.run_id else ""),
        f"  took {result.seconds:.1f} s",
    ]
    return "\n".join(lines)


@click.command("analyze")
@model_options
@data_options
@click.option("--tau", type=float, default=0.3, show_default=True, help="Sink threshold tau in (0, 1].")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Prompts per forward pass.")
@click.option("--output-dir", default=None, help="Where to write the outputs. Default: ./mcr-exit-runs/<model>-<time>.")
@click.option("--no-plots", is_flag=True, help="Skip the figures.")
@click.option("--spectra", type=click.Choice(["auto", "exact", "estimate"]), default="auto", show_default=True,
              help="Entropy and top eigenvalues: exact eigensolver, or estimated from matrix products "
                   "(within 1e-3 nats; see docs/metrics.md). auto: estimate on a GPU, exact elsewhere.")
@tracking_options
def analyze_command(model, revision, dtype, device, data, field, max_prompts, max_length, bos, tau,
                    batch_size, output_dir, no_plots, spectra, tracking_uri, experiment, no_mlflow):
    """Measure, layer by layer, massive activations, compression and attention sinks; find the phases."""
    from mcr_exit.analysis.run import AnalyzeConfig, analyze

    cfg = AnalyzeConfig(
        model=model, revision=revision, dtype=dtype, device=device, bos=bos, data=data, field=field,
        max_prompts=max_prompts, max_length=max_length, tau=tau, batch_size=batch_size,
        output_dir=output_dir, tracking_uri=tracking_uri, experiment=experiment, mlflow=not no_mlflow,
        plots=not no_plots, spectra=spectra,
    )
    result = analyze(cfg, progress_factory=_progress_factory)
    if result is not None:  # under torchrun only rank 0 reports
        click.echo(phase_summary(result))
