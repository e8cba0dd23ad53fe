"""`mcr-exit lens`: LogitLens perplexity and entropy at every hidden index."""

from __future__ import annotations

import click

from mcr_exit.cli.evaluation_options import eval_options, load_for_eval, write_and_log
from mcr_exit.cli.options import bos_option, model_options, tracking_options
from mcr_exit.cli.progress import progress_bar
from mcr_exit.tracking import command_run


def perplexity_text(ppl: float) -> str:
    """A perplexity readable at any size: fixed point up to 1e5, scientific notation above."""
    return f"{ppl:12.1f}" if ppl < 1e5 else f"{ppl:12.3e}"


def lens_row_text(row: dict, n_layers: int) -> str:
    return (f"  hidden {row['layer']:>3} ({row['layer'] / n_layers:4.0%})  CE {row['cross_entropy']:7.3f}  "
            f"ppl {perplexity_text(row['perplexity'])}  entropy {row['entropy']:6.3f}")


@click.command("lens")
@model_options
@click.option("--data", default=None, metavar="FILE",
              help="Text corpus (.txt, .jsonl, ...; e.g. WikiText-2 test.txt). Default: the built-in corpus.")
@click.option("--field", default=None, help="Text field of each record (structured files).")
@click.option("--window", type=int, default=256, show_default=True, help="Tokens per window (BOS included).")
@click.option("--max-windows", type=int, default=32, show_default=True, help="Use at most this many windows.")
@click.option("--batch-size", type=int, default=4, show_default=True, help="Windows per forward pass.")
@click.option("--chunk-tokens", type=int, default=512, show_default=True,
              help="Positions unembedded at once (memory ~ chunk x vocab).")
@bos_option
@eval_options
@tracking_options
@command_run("lens")
def lens_command(model, revision, dtype, device, data, field, window, max_windows, batch_size, chunk_tokens, bos,
                 layers, output_dir, tracking_uri, experiment, no_mlflow):
    """Next-token cross-entropy, perplexity and entropy of the LogitLens at every layer."""
    from mcr_exit.evaluation.commands import lens_inputs, run_lens
    from mcr_exit.evaluation.configs import LensConfig

    cfg = LensConfig(model=model, revision=revision, dtype=dtype, device=device, data=data, field=field,
                     window=window, max_windows=max_windows, batch_size=batch_size, chunk_tokens=chunk_tokens,
                     bos=bos, layers=layers, output_dir=output_dir, tracking_uri=tracking_uri,
                     experiment=experiment, mlflow=not no_mlflow)
    prompts = lens_inputs(cfg)
    loaded = load_for_eval(cfg.model, cfg.revision, cfg.dtype, cfg.device)
    run = run_lens(cfg, loaded, prompts,
                   progress_factory=lambda total: progress_bar(total, desc="lens", unit="window"))
    tail = write_and_log(run, cfg)
    for row in run.result.rows():
        click.echo(lens_row_text(row, run.n_layers))
    click.echo(f"{run.model_name}: {run.result.n_windows} windows x {cfg.window} tokens; {tail}")
