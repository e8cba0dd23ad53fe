"""Options and helpers shared by the downstream commands (lens, probe, mteb, lmeval, choose-layer)."""

from __future__ import annotations

import time
from pathlib import Path

import click

from mcr_exit.errors import ConfigError


def parse_layers(text: str | None) -> list[int] | None:
    """'all' / None -> None (every hidden index); '0,4,8' -> list; 'A:B[:S]' -> range(A, B+1, S)."""
    if text is None or text.strip() in ("", "all"):
        return None
    try:
        if ":" in text:
            parts = [int(p) for p in text.split(":")]
            start, stop, step = parts[0], parts[1], parts[2] if len(parts) > 2 else 1
            if step < 1:
                raise ValueError
            return list(range(start, stop + 1, step))
        return [int(p) for p in text.split(",") if p.strip()]
    except ValueError as exc:
        raise ConfigError(f"--layers must be 'all', 'A,B,C' or 'START:STOP[:STEP]', got '{text}'") from exc


def eval_options(f):
    for opt in reversed([
        click.option("--layers", default="all", show_default=True,
                     help="Hidden indices: all, 0,4,8 or START:STOP[:STEP] (inclusive)."),
        click.option("--output-dir", default=None,
                     help="Where to write the results. Default: ./mcr-exit-runs/<command>-<model>-<time>."),
    ]):
        f = opt(f)
    return f


def output_dir_for(output_dir: str | None, command: str, model_name: str) -> Path:
    if output_dir:
        return Path(output_dir)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("mcr-exit-runs") / f"{command}-{model_name}-{stamp}"


def load_for_eval(model, revision, dtype, device):
    """Load the model, then open the command's MLflow run (before the work; see tracking.command_run)."""
    from mcr_exit.models import load_model
    from mcr_exit.tracking import open_command_run

    loaded = load_model(model, revision=revision, dtype=dtype, device=device)
    open_command_run(model=loaded.spec.name, revision=loaded.spec.revision, dtype=loaded.spec.dtype)
    return loaded


def finish(doc: dict, out: Path, *, no_mlflow: bool, tracking_uri, experiment: str, params: dict) -> str:
    """Write the result files, log them to MLflow unless told not to; returns a one-line summary suffix."""
    from mcr_exit.evaluation.results import log_curve, write_curve

    path = write_curve(doc, out)
    if no_mlflow:
        return f"results: {path}"
    from mcr_exit.tracking import command_run_logger

    run_id = log_curve(doc, out, tracking_uri=tracking_uri, experiment=experiment, params=params,
                       logger=command_run_logger())
    return f"results: {path}; MLflow run {run_id}"
