"""MLflow logging. The only module that imports mlflow (lazily: importing it costs seconds)."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import pandas as pd

from mcr_exit.errors import McrExitError

DEFAULT_EXPERIMENT = "mcr-exit"


def _mlflow():
    try:
        import mlflow
    except ImportError as exc:
        raise McrExitError("mlflow is not installed: pip install mlflow") from exc
    return mlflow


def resolve_tracking_uri(uri: str | None = None) -> str:
    """--tracking-uri, else MLFLOW_TRACKING_URI, else MLflow 3's own default: sqlite:///<cwd>/mlflow.db.

    The default is written out explicitly: a stray ./mlruns file store would otherwise take over.
    """
    if uri:
        return uri
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def _ensure_experiment(client, name: str, uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    artifact_location = None
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite":
        # Keep artifacts beside the database whatever the working directory of later runs.
        db = Path(uri.removeprefix("sqlite:///"))
        artifact_location = (db.parent / "mlartifacts").resolve().as_uri()
    return client.create_experiment(name, artifact_location=artifact_location)


class RunLogger:
    """Logs into one open MLflow run."""

    def __init__(self, client, run_id: str):
        self.client = client
        self.run_id = run_id

    def log_params(self, params: Mapping[str, object]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, values: Mapping[str, float], step: int = 0) -> None:
        self.log_series([(step, values)])

    def log_series(self, rows: list[tuple[int, Mapping[str, float]]]) -> None:
        """Per-layer step series: one metric history per key, step = layer index."""
        import math
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        metrics = [
            Metric(key, float(v), ts, int(step))
            for step, values in rows
            for key, v in values.items()
            if v is not None and math.isfinite(float(v))
        ]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000])

    def log_artifacts(self, directory: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(self.run_id, str(directory), artifact_path)

    def log_dataset(self, texts: list[str], *, name: str, source: str, digest: str, context: str) -> None:
        mlflow = _mlflow()
        from mlflow.data.code_dataset_source import CodeDatasetSource

        df = pd.DataFrame({"text": texts})
        # Local files resolve to a file source; the built-in corpus and hf: names are recorded as tags.
        src = source if Path(source).exists() else CodeDatasetSource(tags={"source": source})
        with warnings.catch_warnings():  # MLflow registers its local-file source twice and says so each time
            warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple")
            dataset = mlflow.data.from_pandas(df, source=src, name=name, digest=digest[:36])
        from mlflow.entities import DatasetInput, InputTag

        tag = InputTag(key="mlflow.data.context", value=context)
        self.client.log_inputs(self.run_id, datasets=[DatasetInput(dataset._to_mlflow_entity(), tags=[tag])])

    def set_tags(self, tags: Mapping[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, v)


@contextmanager
def tracked_run(
    *, tracking_uri: str | None, experiment: str = DEFAULT_EXPERIMENT, run_name: str,
    tags: Mapping[str, str] | None = None, parent_run_id: str | None = None,
) -> Iterator[RunLogger]:
    """One MLflow run; it ends FINISHED on success and FAILED on any exception (which is re-raised)."""
    mlflow = _mlflow()
    uri = resolve_tracking_uri(tracking_uri)
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp_id = _ensure_experiment(client, experiment, uri)
    run_tags = dict(tags or {})
    run_tags["mlflow.runName"] = run_name
    if parent_run_id:
        run_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(exp_id, tags=run_tags, run_name=run_name)
    logger = RunLogger(client, run.info.run_id)
    try:
        yield logger
    except BaseException:
        client.set_terminated(run.info.run_id, status="FAILED")
        raise
    client.set_terminated(run.info.run_id, status="FINISHED")
