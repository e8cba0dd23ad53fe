"""`mcr-exit lmeval`: lm-eval multiple-choice accuracy through the LogitLens at every hidden index."""

from __future__ import annotations

import click

from mcr_exit.cli.evaluation_options import eval_options, load_for_eval, write_and_log
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
    from mcr_exit.evaluation.commands import run_lmeval
    from mcr_exit.evaluation.configs import LmevalConfig

    cfg = LmevalConfig(model=model, revision=revision, dtype=dtype, device=device, tasks=tasks,
                       task_files=task_files, include_defaults=include_defaults, limit=limit,
                       batch_size=batch_size, bos=bos, layers=layers, output_dir=output_dir,
                       tracking_uri=tracking_uri, experiment=experiment, mlflow=not no_mlflow)
    loaded = load_for_eval(cfg.model, cfg.revision, cfg.dtype, cfg.device)
    run = run_lmeval(cfg, loaded, progress_factory=lambda total: progress_bar(total, desc="lmeval", unit="layer"))
    tail = write_and_log(run, cfg)
    for row in run.result.rows():
        accs = "  ".join(f"{k.removesuffix('/acc')} {v:.3f}" for k, v in row.items() if k.endswith("/acc"))
        click.echo(f"  hidden {row['layer']:>3} ({row['layer'] / run.n_layers:4.0%})  {accs}")
    click.echo(f"{run.model_name}: {tail}")
