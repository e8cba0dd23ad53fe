"""`mcr-exit lmeval`: lm-eval multiple-choice accuracy through the LogitLens at every hidden index."""

from __future__ import annotations

import click

from mcr_exit.cli.evaluation_options import eval_options, finish, load_for_eval, output_dir_for, parse_layers
from mcr_exit.cli.options import bos_option, model_options, tracking_options
from mcr_exit.cli.progress import progress_bar
from mcr_exit.tracking import command_run


@click.command("lmeval")
@model_options
@click.option("--task", "tasks", multiple=True,
              help="lm-eval task name (default: the bundled mcr_capitals, mcr_opposites, mcr_arithmetic). Repeatable.")
@click.option("--task-file", "task_files", multiple=True, metavar="FILE.jsonl",
              help="Multiple-choice records {question, choices, answer} as an extra task. Repeatable.")
@click.option("--include-defaults", is_flag=True, help="Also index lm-eval's own tasks (slow; most need the Hub).")
@click.option("--limit", type=int, default=None, help="At most this many documents per task.")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Requests per forward pass.")
@bos_option
@eval_options
@tracking_options
@command_run("lmeval")
def lmeval_command(model, revision, dtype, device, tasks, task_files, include_defaults, limit, batch_size, bos, layers,
                   output_dir, tracking_uri, experiment, no_mlflow):
    """Accuracy per layer of lm-eval tasks, scored by lm-eval itself on the lens logits."""
    from mcr_exit.evaluation.lmeval_model import BUNDLED_TASKS, lmeval_sweep
    from mcr_exit.evaluation.plots import figure8
    from mcr_exit.evaluation.results import curve_document

    names = list(tasks) or ([] if task_files else list(BUNDLED_TASKS))
    loaded = load_for_eval(model, revision, dtype, device)
    result = lmeval_sweep(loaded, names, layers=parse_layers(layers), task_files=list(task_files), limit=limit,
                          batch_size=batch_size, bos=bos, include_defaults=include_defaults,
                          progress_factory=lambda total: progress_bar(total, desc="lmeval", unit="layer"))
    doc = curve_document("lmeval", result, loaded=loaded, data={"name": "+".join(result.tasks),
                                                                 "task_files": list(task_files)})
    out = output_dir_for(output_dir, "lmeval", loaded.spec.name)
    figure8(lmeval=doc, out=out / "lmeval.png")
    tail = finish(doc, out, no_mlflow=no_mlflow, tracking_uri=tracking_uri, experiment=experiment,
                  params={"tasks": ",".join(result.tasks), **result.config})
    L = loaded.adapter.n_layers
    for row in result.rows():
        accs = "  ".join(f"{k.removesuffix('/acc')} {v:.3f}" for k, v in row.items() if k.endswith("/acc"))
        click.echo(f"  hidden {row['layer']:>3} ({row['layer'] / L:4.0%})  {accs}")
    click.echo(f"{loaded.spec.name}: {tail}")
