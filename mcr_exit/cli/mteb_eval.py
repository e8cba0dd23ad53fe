"""`mcr-exit mteb`: MTEB main score at every hidden index (mteb's tasks by name, or custom tasks from files)."""

from __future__ import annotations

import click

from mcr_exit.cli.evaluation_options import eval_options, finish, load_for_eval, output_dir_for, parse_layers
from mcr_exit.cli.options import model_options, tracking_options
from mcr_exit.tracking import command_run


@click.command("mteb")
@model_options
@click.option("--task", "tasks", multiple=True, help="An mteb task by name (needs the Hub). Repeatable.")
@click.option("--custom-task", "custom", multiple=True, metavar="KIND:FILE",
              help="A task from a local file; KIND = classification, sts, clustering or retrieval. Repeatable.")
@click.option("--pooling", type=click.Choice(["mean_no_bos", "last", "mean"]), default="mean_no_bos", show_default=True)
@click.option("--no-normalize", is_flag=True, help="Do not L2-normalize the embeddings.")
@click.option("--max-length", type=int, default=256, show_default=True)
@click.option("--bos", type=click.Choice(["auto", "force", "none"]), default="auto", show_default=True)
@click.option("--profile", "profile_path", default=None, metavar="phase_profile.json",
              help="Set embedding_layer in this profile to the best-scoring layer (with the evidence).")
@eval_options
@tracking_options
@command_run("mteb")
def mteb_command(model, revision, dtype, device, tasks, custom, pooling, no_normalize, max_length, bos, profile_path,
                 layers, output_dir, tracking_uri, experiment, no_mlflow):
    """Embeddings at every layer scored by mteb; every layer's features from one forward pass per batch."""
    from mcr_exit.errors import ConfigError
    from mcr_exit.evaluation.mteb_encoder import mteb_sweep
    from mcr_exit.evaluation.mteb_tasks import custom_task, named_tasks, parse_custom_spec
    from mcr_exit.evaluation.plots import figure8
    from mcr_exit.evaluation.results import curve_document

    if not tasks and not custom:
        raise ConfigError("no MTEB task: give --task NAME or --custom-task KIND:FILE")
    task_objs = named_tasks(list(tasks)) + [custom_task(*parse_custom_spec(s)) for s in custom]
    loaded = load_for_eval(model, revision, dtype, device)
    result = mteb_sweep(loaded, task_objs, layers=parse_layers(layers), pooling=pooling,
                        normalize=not no_normalize, bos=bos, max_length=max_length)
    doc = curve_document("mteb", result, loaded=loaded, data={"name": "+".join(result.tasks),
                                                               "tasks": list(tasks), "custom": list(custom)})
    out = output_dir_for(output_dir, "mteb", loaded.spec.name)
    figure8(mteb=doc, out=out / "mteb.png")
    tail = finish(doc, out, no_mlflow=no_mlflow, tracking_uri=tracking_uri, experiment=experiment,
                  params={"tasks": ",".join(result.tasks), **result.config})
    L = loaded.adapter.n_layers
    for row in result.rows():
        click.echo(f"  hidden {row['layer']:>3} ({row['layer'] / L:4.0%})  mean main score {row['mean_main_score']:.4f}")
    click.echo(f"{loaded.spec.name}: best hidden {result.best_layer}; {tail}")
    if profile_path:
        from mcr_exit.evaluation.choose import embedding_evidence, update_profile_file

        new = update_profile_file(profile_path, embedding_evidence(mteb=doc))
        click.echo(f"{profile_path}: embedding_layer = hidden {new['embedding_layer']}")
