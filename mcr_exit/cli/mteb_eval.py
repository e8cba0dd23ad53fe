"""`mcr-exit mteb`: MTEB main score at every hidden index (mteb's tasks by name, or custom tasks from files)."""

from __future__ import annotations

import click

from mcr_exit.cli.evaluation_options import eval_options, finish, load_for_eval, output_dir_for, parse_layers
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
    from mcr_exit.errors import ConfigError
    from mcr_exit.evaluation.mteb_encoder import mteb_sweep
    from mcr_exit.evaluation.mteb_tasks import custom_task, load_task_data, named_tasks, parse_custom_spec
    from mcr_exit.evaluation.plots import figure8
    from mcr_exit.evaluation.results import curve_document

    if not tasks and not custom:
        raise ConfigError("no MTEB task: give --task NAME or --custom-task KIND:FILE")
    wanted_layers = parse_layers(layers)
    task_objs = named_tasks(list(tasks)) + [
        custom_task(*parse_custom_spec(s), text_field=text_field, label_field=label_field) for s in custom]
    load_task_data(task_objs)  # before the slow model load: an unreachable Hub task fails at once
    loaded = load_for_eval(model, revision, dtype, device)
    result = mteb_sweep(loaded, task_objs, layers=wanted_layers, pooling=pooling, normalize=not no_normalize,
                        bos=bos, max_length=max_length, batch_size=batch_size,
                        progress_factory=lambda total: progress_bar(total, desc="mteb", unit="task"))
    doc = curve_document("mteb", result, loaded=loaded, data={"name": "+".join(result.tasks),
                                                               "tasks": list(tasks), "custom": list(custom)})
    out = output_dir_for(output_dir, "mteb", loaded.spec.name)
    figure8(mteb=doc, out=out / "mteb.png")
    tail = finish(doc, out, no_mlflow=no_mlflow, tracking_uri=tracking_uri, experiment=experiment,
                  params={"tasks": ",".join(result.tasks), **result.config})
    for line in score_lines(result, loaded.adapter.n_layers):
        click.echo(line)
    best = result.best_layer
    per_task = ", ".join(f"{t} {result.main_score[t][result.layers.index(best)]:.4f}" for t in result.tasks)
    click.echo(f"{loaded.spec.name}: best hidden {best} ({per_task}); {tail}")
    if profile_path:
        from mcr_exit.evaluation.choose import embedding_evidence, update_profile_file

        new = update_profile_file(profile_path, embedding_evidence(mteb=doc))
        click.echo(f"{profile_path}: embedding_layer = hidden {new['embedding_layer']}")
