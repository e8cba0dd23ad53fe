"""`mcr-exit probe`: a logistic-regression probe per hidden index on pooled frozen features."""

from __future__ import annotations

import click

from mcr_exit.cli.evaluation_options import eval_options, load_for_eval, write_and_log
from mcr_exit.cli.options import (
    bos_option,
    max_length_option,
    model_options,
    pooling_option,
    tracking_options,
)
from mcr_exit.tracking import command_run
from mcr_exit.vocabulary import EMBEDDING_MAX_LENGTH


@click.command("probe")
@model_options
@click.option("--train", "train_file", required=True, metavar="FILE", help="Labelled texts (.tsv .csv .jsonl ...).")
@click.option("--test", "test_file", default=None, metavar="FILE", help="Test split; default: a seeded split of --train.")
@click.option("--text-field", default="sentence", show_default=True, help="Text column of the files.")
@click.option("--label-field", default="label", show_default=True, help="Label column of the files.")
@click.option("--max-examples", type=int, default=None, help="Use the first N of each file.")
@click.option("--test-fraction", type=float, default=0.3, show_default=True,
              help="Share of --train held out for testing when no --test is given.")
@click.option("--seed", type=int, default=123, show_default=True, help="Seed of the split and of the classifier.")
@pooling_option
@click.option("--C", "c", type=float, default=1.0, show_default=True, help="Inverse L2 regularization strength.")
@max_length_option(EMBEDDING_MAX_LENGTH)
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True,
              help="Texts per forward pass.")
@bos_option
@click.option("--cache-dir", default=None, help="Cache the all-layer features here (reused on a rerun).")
@eval_options
@tracking_options
@command_run("probe")
def probe_command(model, revision, dtype, device, train_file, test_file, text_field, label_field, max_examples,
                  test_fraction, seed, pooling, c, max_length, batch_size, bos, cache_dir, layers, output_dir,
                  tracking_uri, experiment, no_mlflow):
    """Linear-probe accuracy at every layer (one forward pass per batch for all layers)."""
    from mcr_exit.evaluation.commands import probe_inputs, run_probe
    from mcr_exit.evaluation.configs import ProbeConfig

    cfg = ProbeConfig(model=model, revision=revision, dtype=dtype, device=device, train_file=train_file,
                      test_file=test_file, text_field=text_field, label_field=label_field,
                      max_examples=max_examples, test_fraction=test_fraction, seed=seed, pooling=pooling, c=c,
                      max_length=max_length, batch_size=batch_size, bos=bos, cache_dir=cache_dir, layers=layers,
                      output_dir=output_dir, tracking_uri=tracking_uri, experiment=experiment,
                      mlflow=not no_mlflow)
    inputs = probe_inputs(cfg)
    loaded = load_for_eval(cfg.model, cfg.revision, cfg.dtype, cfg.device)
    run = run_probe(cfg, loaded, inputs)
    tail = write_and_log(run, cfg)
    result, n_layers = run.result, run.n_layers
    for row in result.rows():
        click.echo(f"  hidden {row['layer']:>3} ({row['layer'] / n_layers:4.0%})  train {row['train_accuracy']:.3f}  "
                   f"test {row['test_accuracy']:.3f}")
    click.echo(f"{run.model_name}: best hidden {result.best_layer}, {result.n_train} train / {result.n_test} test, "
               f"majority {result.majority_baseline:.3f}; {tail}")
