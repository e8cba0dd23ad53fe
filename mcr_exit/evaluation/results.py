"""Result files (one JSON + CSV per curve) and their MLflow runs (one metric history per key, step = layer)."""

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


def write_curve(doc: dict, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{doc['kind']}.json"
    path.write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n")
    import pandas as pd

    pd.DataFrame(doc["rows"]).to_csv(out / f"{doc['kind']}.csv", index=False)
    return path


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


def log_curve(doc: dict, out_dir: Path, *, tracking_uri, experiment: str, params: dict) -> str:
    """One MLflow run: params, every numeric row column as a per-layer series, the files as artifacts."""
    from mcr_exit.tracking import tracked_run

    name = f"{doc['kind']}-{doc['model']['name']}"
    tags = {"mcr_exit.kind": doc["kind"], "mcr_exit.model": doc["model"]["name"]}
    with tracked_run(tracking_uri=tracking_uri, experiment=experiment, run_name=name, tags=tags) as run:
        run.log_params({**params, "model": doc["model"]["name"], "n_layers": doc["n_layers"]})
        series = []
        for row in doc["rows"]:
            values = {f"{doc['kind']}/{k}": v for k, v in row.items()
                      if k != "layer" and isinstance(v, (int, float)) and v is not None}
            values[f"{doc['kind']}/relative_depth"] = row["layer"] / doc["n_layers"]
            series.append((int(row["layer"]), values))
        run.log_series(series)
        run.log_artifacts(Path(out_dir))
        return run.run_id
