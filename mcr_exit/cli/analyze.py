"""`mcr-exit analyze`: the per-layer phase profile of a causal LM."""

from __future__ import annotations

import click

from mcr_exit.cli.options import data_options, model_options, tracking_options
from mcr_exit.cli.phase_text import phase_summary


def _progress_factory(total: int):
    from tqdm.auto import tqdm

    bar = tqdm(total=total, unit="prompt", desc="analyze", dynamic_ncols=True)

    def update(n: int) -> None:
        bar.update(n)
        if bar.n >= total:
            bar.close()

    return update


@click.command("analyze")
@model_options
@data_options
@click.option("--tau", type=float, default=0.3, show_default=True, help="Sink threshold tau in (0, 1].")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Prompts per forward pass.")
@click.option("--output-dir", default=None, help="Where to write the outputs. Default: ./mcr-exit-runs/<model>-<time>.")
@click.option("--no-plots", is_flag=True, help="Skip the figures.")
@click.option("--spectra", type=click.Choice(["auto", "exact", "estimate"]), default="auto", show_default=True,
              help="Entropy and top eigenvalues: exact eigensolver, or estimated from matrix products "
                   "(within ~2e-4 nats of float64 eigenvalues; see docs/metrics.md). auto: estimate on a GPU, "
                   "exact elsewhere.")
@click.option("--verbose", is_flag=True,
              help="Print the seconds each stage took (imports, model load, statistics, figures, logging ...).")
@tracking_options
def analyze_command(model, revision, dtype, device, data, field, max_prompts, max_length, bos, tau,
                    batch_size, output_dir, no_plots, spectra, verbose, tracking_uri, experiment, no_mlflow):
    """Measure, layer by layer, massive activations, compression and attention sinks; find the phases."""
    from mcr_exit.run_state import preflight
    from mcr_exit.timing import StageTimer

    timer = StageTimer.since_process_start()
    preflight(output_dir, mlflow=not no_mlflow, tracking_uri=tracking_uri)  # in a second, before torch loads
    from mcr_exit import prepare

    # what a first run still lacks (Triton kernels, a GGUF's tokenizer) is made in children while this imports
    prepare.start(model, revision=revision, device=device, dtype=dtype, spectra=spectra)
    with timer.stage("imports"):
        from mcr_exit.analysis.run import AnalyzeConfig, analyze

    cfg = AnalyzeConfig(
        model=model, revision=revision, dtype=dtype, device=device, bos=bos, data=data, field=field,
        max_prompts=max_prompts, max_length=max_length, tau=tau, batch_size=batch_size,
        output_dir=output_dir, tracking_uri=tracking_uri, experiment=experiment, mlflow=not no_mlflow,
        plots=not no_plots, spectra=spectra,
    )
    result = analyze(cfg, progress_factory=_progress_factory, timer=timer)
    if result is not None:  # under torchrun only rank 0 reports
        click.echo(phase_summary(result))
        if verbose:
            click.echo(timer.report())
