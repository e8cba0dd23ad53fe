"""Curve documents (one per downstream result; written by writers.write_curve_run) and their MLflow logging
(one metric history per key, step = layer)."""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, is_dataclass
from pathlib import Path

from mcr_exit import __version__
from mcr_exit.errors import DataError
from mcr_exit.phase_profile import portable_location

SCHEMA = "mcr-exit/downstream-curve"


def _clean(x):
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if hasattr(x, "item") and not isinstance(x, (str, bytes)):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def curve_document(kind: str, result, *, loaded, data: dict) -> dict:
    """JSON document of a per-layer result: rows (one per hidden index) plus provenance."""
    body = asdict(result) if is_dataclass(result) else dict(result)
    return _clean({
        "schema": SCHEMA, "kind": kind, "mcr_exit_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": {**asdict(loaded.spec), "location": portable_location(loaded.spec.source, loaded.spec.location)},
        "n_layers": loaded.adapter.n_layers, "data": data,
        "rows": result.rows(), "result": body,
    })


def read_curve(path: str | Path, kind: str | None = None) -> dict:
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read result file {path}: {exc}") from exc
    if doc.get("schema") != SCHEMA:
        raise DataError(f"{path} is not a mcr-exit downstream result (schema={doc.get('schema')!r})")
    if kind and doc.get("kind") != kind:
        raise DataError(f"{path} holds a '{doc.get('kind')}' result, expected '{kind}'")
    return doc


def _log_curve_into(run, doc: dict, out_dir: Path, params: dict) -> str:
    from mcr_exit.tracking import run_name, run_tags

    kind, model, data = doc["kind"], doc["model"], doc.get("data") or {}
    bos = params.get("bos") if params.get("bos") in ("auto", "force", "none") else None  # a policy, not a sentence
    run.set_tags({"mlflow.runName": run_name(kind, model["name"], revision=model.get("revision"), bos=bos,
                                             data=data.get("name"), dtype=model.get("dtype")),
                  **run_tags(kind, model=model["name"], revision=model.get("revision"), bos=bos,
                             data=data.get("name"), dtype=model.get("dtype"))})
    run.log_params({**params, "model": model["name"], "n_layers": doc["n_layers"]})
    source = data.get("source") or data.get("train") or ",".join([*data.get("tasks", []), *data.get("custom", [])])
    run.log_dataset_meta(name=str(data.get("name") or kind), source=str(source or data.get("name") or kind),
                         digest=data.get("digest"), context=kind)
    series = []
    for row in doc["rows"]:
        values = {f"{kind}/{k}": v for k, v in row.items()
                  if k != "layer" and isinstance(v, (int, float)) and v is not None}
        values[f"{kind}/relative_depth"] = row["layer"] / doc["n_layers"]
        series.append((int(row["layer"]), values))
    run.log_series(series)
    run.log_artifacts(Path(out_dir))
    return run.run_id


def log_curve(doc: dict, out_dir: Path, *, tracking_uri, experiment: str, params: dict, logger=None) -> str:
    """Params, the data as a dataset input, every numeric row column as a per-layer series
    (``<kind>/<column>``, step = hidden index), the files as artifacts. Into ``logger`` (the command's
    run, opened before the work) when given, else into a new run."""
    from mcr_exit.tracking import run_tags, tracked_run

    if logger is not None:
        return _log_curve_into(logger, doc, out_dir, params)
    name = f"{doc['kind']} {doc['model']['name']}"
    with tracked_run(tracking_uri=tracking_uri, experiment=experiment, run_name=name,
                     tags=run_tags(doc["kind"], model=doc["model"]["name"])) as run:
        return _log_curve_into(run, doc, out_dir, params)


def log_curve_run(run, cfg) -> str | None:
    """Log a finished ``CurveRun`` (already written to ``run.output_dir``) into the command's run, opened
    before the work (tracking.command_run); None with --no-mlflow."""
    if not cfg.mlflow:
        return None
    from mcr_exit.tracking import command_run_logger

    return log_curve(run.doc, run.output_dir, tracking_uri=cfg.tracking_uri, experiment=cfg.experiment,
                     params=run.params, logger=command_run_logger())
