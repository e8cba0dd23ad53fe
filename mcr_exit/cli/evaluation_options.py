"""Options and helpers shared by the downstream commands (lens, probe, mteb, lmeval, choose-layer)."""

from __future__ import annotations

import click


def eval_options(f):
    for opt in reversed([
        click.option("--layers", default="all", show_default=True,
                     help="Hidden indices: all, 0,4,8 or START:STOP[:STEP] (inclusive)."),
        click.option("--output-dir", default=None,
                     help="Where to write the results. Default: ./mcr-exit-runs/<command>-<model>-<time>."),
    ]):
        f = opt(f)
    return f


def load_for_eval(model, revision, dtype, device):
    """Load the model, then open the command's MLflow run (before the work; see tracking.command_run)."""
    from mcr_exit.models import load_model
    from mcr_exit.tracking import open_command_run

    loaded = load_model(model, revision=revision, dtype=dtype, device=device)
    open_command_run(model=loaded.spec.name, revision=loaded.spec.revision, dtype=loaded.spec.dtype)
    return loaded


def results_text(path, run_id: str | None) -> str:
    """The one-line summary suffix: where the results are, and the MLflow run they were logged to."""
    return f"results: {path}" + (f"; MLflow run {run_id}" if run_id else "")


def write_and_log(run, cfg) -> str:
    """The writer, then the logging of the written result; returns ``results_text``."""
    from mcr_exit.evaluation.results import log_curve_run
    from mcr_exit.evaluation.writers import write_curve_run

    path = write_curve_run(run)
    return results_text(path, log_curve_run(run, cfg))
