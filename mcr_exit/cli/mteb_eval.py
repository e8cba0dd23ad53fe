"""`mcr-exit mteb`: MTEB main score at every hidden index (mteb's tasks by name, or custom tasks from files)."""

from __future__ import annotations

import click

from mcr_exit.cli.evaluation_options import eval_options, load_for_eval, write_and_log
from mcr_exit.cli.options import bos_option, max_length_option, model_options, pooling_option, tracking_options
from mcr_exit.cli.progress import progress_bar
from mcr_exit.tracking import command_run
from mcr_exit.vocabulary import EMBEDDING_MAX_LENGTH


def score_lines(result, n_layers: int) -> list[str]:
    """One line per hidden index: the mean main score, then each task's."""
    lines = []
    for row in result.rows():
        tasks = "  ".join(f"{t} {row[t]:.4f}" for t in result.tasks)
        lines.append(f"  hidden {row['layer']:>3} ({row['layer'] / n_layers:4.0%})  mean {row['mean_main_score']:.4f}"
                     f"  {tasks}")
    return lines


@click.command("mteb")
@model_options
@click.option("--task", "tasks", multiple=True, help="An mteb task by name (needs the Hub). Repeatable.")
@click.option("--custom-task", "custom", multiple=True, metavar="KIND:FILE",
              help="A task from a local file; KIND = classification, sts, clustering or retrieval. Repeatable.")
@click.option("--text-field", default="text", show_default=True,
              help="Text column of classification and clustering files.")
@click.option("--label-field", default="label", show_default=True,
              help="Label column of classification and clustering files.")
@pooling_option
@click.option("--no-normalize", is_flag=True, help="Do not L2-normalize the embeddings.")
@max_length_option(EMBEDDING_MAX_LENGTH)
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True,
              help="Texts per forward pass.")
@bos_option
@click.option("--profile", "profile_path", default=None, metavar="phase_profile.json",
              help="Set embedding_layer in this profile to the best-scoring layer (with the evidence).")
@eval_options
@tracking_options
@command_run("mteb")
def mteb_command(model, revision, dtype, device, tasks, custom, text_field, label_field, pooling, no_normalize,
                 max_length, batch_size, bos, profile_path, layers, output_dir, tracking_uri, experiment, no_mlflow):
    """Embeddings at every layer scored by mteb; every layer's features from one forward pass per batch."""
    from mcr_exit.evaluation.commands import mteb_inputs, run_mteb
    from mcr_exit.evaluation.configs import MtebConfig

    cfg = MtebConfig(model=model, revision=revision, dtype=dtype, device=device, tasks=tasks, custom=custom,
                     text_field=text_field, label_field=label_field, pooling=pooling, normalize=not no_normalize,
                     max_length=max_length, batch_size=batch_size, bos=bos, profile_path=profile_path,
                     layers=layers, output_dir=output_dir, tracking_uri=tracking_uri, experiment=experiment,
                     mlflow=not no_mlflow)
    inputs = mteb_inputs(cfg)  # before the slow model load: an unreachable Hub task fails at once
    loaded = load_for_eval(cfg.model, cfg.revision, cfg.dtype, cfg.device)
    run = run_mteb(cfg, loaded, inputs,
                   progress_factory=lambda total: progress_bar(total, desc="mteb", unit="task"))
    tail = write_and_log(run, cfg)
    result = run.result
    for line in score_lines(result, run.n_layers):
        click.echo(line)
    best = result.best_layer
    per_task = ", ".join(f"{t} {result.main_score[t][result.layers.index(best)]:.4f}" for t in result.tasks)
    click.echo(f"{run.model_name}: best hidden {best} ({per_task}); {tail}")
    if run.profile is not None:
        click.echo(f"{run.profile_path}: embedding_layer = hidden {run.profile['embedding_layer']}")
