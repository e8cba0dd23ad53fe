"""`mcr-exit probe`: a logistic-regression probe per hidden index on pooled frozen features."""

from __future__ import annotations

import click

from mcr_exit.cli.evaluation_options import eval_options, finish, load_for_eval, output_dir_for, parse_layers
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
    from dataclasses import replace

    from mcr_exit.evaluation.probes import probe_layers, read_labelled
    from mcr_exit.evaluation.results import curve_document

    train = read_labelled(train_file, text_field=text_field, label_field=label_field)
    test = read_labelled(test_file, text_field=text_field, label_field=label_field) if test_file else None
    if max_examples:
        train = replace(train, texts=train.texts[:max_examples], labels=train.labels[:max_examples])
        test = test and replace(test, texts=test.texts[:max_examples], labels=test.labels[:max_examples])
    loaded = load_for_eval(model, revision, dtype, device)
    result = probe_layers(loaded, train, test, test_fraction=test_fraction, seed=seed, pooling=pooling,
                          layers=parse_layers(layers), c=c, cache_dir=cache_dir, bos=bos, max_length=max_length,
                          max_batch=batch_size)
    from pathlib import Path

    doc = curve_document("probe", result, loaded=loaded, data={
        "name": Path(train_file).stem, "train": train.source, "test": test.source if test else None,
        "max_examples": max_examples})
    out = output_dir_for(output_dir, "probe", loaded.spec.name)
    from mcr_exit.evaluation.plots import figure8

    figure8(probe=doc, out=out / "probe.png")
    tail = finish(doc, out, no_mlflow=no_mlflow, tracking_uri=tracking_uri, experiment=experiment,
                  params={"train": train.source, "test": test.source if test else "", **result.config,
                          "n_train": result.n_train, "n_test": result.n_test})
    L = loaded.adapter.n_layers
    for row in result.rows():
        click.echo(f"  hidden {row['layer']:>3} ({row['layer'] / L:4.0%})  train {row['train_accuracy']:.3f}  "
                   f"test {row['test_accuracy']:.3f}")
    click.echo(f"{loaded.spec.name}: best hidden {result.best_layer}, {result.n_train} train / {result.n_test} test, "
               f"majority {result.majority_baseline:.3f}; {tail}")
