"""MLflow logging and reading. The only module that imports mlflow (lazily: importing it costs seconds).

Every command's run follows one scheme:
* run name: ``<command> <model>[@revision] · bos=<policy> · data=<name> · <dtype>`` (what tells runs apart);
* tags: ``mcr_exit.command``, ``mcr_exit.model``, ``mcr_exit.revision``, ``mcr_exit.bos``,
  ``mcr_exit.data``, ``mcr_exit.dtype``, ``mcr_exit.version`` (whichever apply);
* metrics: registry keys (``hidden/...``, ``attention/...``, ``summary/...``; see metrics/registry.py),
  described in the run's description and in its ``metrics.json`` artifact;
* the experiment is tagged as a model-development experiment, so the UI opens on its runs.
"""

from __future__ import annotations

import functools
import os
import sys
import warnings
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from contextvars import ContextVar
from pathlib import Path
from urllib.parse import urlparse

from mcr_exit.errors import ConfigError, DataError, McrExitError, environment_detail
from mcr_exit.run_state import check_tracking_server, owner_tags, repair_dead_runs

DEFAULT_EXPERIMENT = "mcr-exit"
# MLflow 3's UI reads this experiment tag: "custom_model_development" opens the runs table, where
# an untagged experiment may open on the GenAI traces page.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
DESCRIPTION_TAG = "mlflow.note.content"
TAG_PREFIX = "mcr_exit."


def _mlflow():
    try:
        import mlflow
    except ImportError as exc:
        raise McrExitError("mlflow is not installed: pip install mlflow") from exc
    _quiet_store_tracebacks()
    return mlflow


def _drop_store_traceback(record) -> bool:
    """False for the record MLflow's SQL store logs (with a traceback) before it raises a database error:
    the error reaches the command, which reports it in one line."""
    return not (record.levelno >= 40 and str(record.msg).startswith("SQLAlchemy database error"))


@functools.cache
def _quiet_store_tracebacks() -> None:
    import logging

    logging.getLogger("mlflow.store.db.utils").addFilter(_drop_store_traceback)


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


def run_tags(command: str, **values: object) -> dict[str, str]:
    """The one tag scheme: ``mcr_exit.command`` plus ``mcr_exit.<key>`` for each value given (None skipped)."""
    from mcr_exit import __version__

    tags = {f"{TAG_PREFIX}command": command, f"{TAG_PREFIX}version": __version__}
    tags.update({f"{TAG_PREFIX}{k}": str(v) for k, v in values.items() if v is not None and v != ""})
    return tags


def run_name(command: str, model: str, *, revision: str | None = None, bos: str | None = None,
             data: str | None = None, dtype: str | None = None, extra: str | None = None) -> str:
    """``analyze SmolLM2-135M-Instruct · bos=none · data=gsm8k · float32``: what tells runs apart."""
    parts = [f"{command} {model}" + (f"@{revision}" if revision else "")]
    if bos:
        parts.append(f"bos={bos}")
    if data:
        parts.append(f"data={data}")
    if dtype:
        parts.append(dtype)
    if extra:
        parts.append(extra)
    return " · ".join(parts)


def _ensure_experiment(client, name: str, uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if EXPERIMENT_KIND_TAG not in exp.tags:  # made by an older version, or by hand
            client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return exp.experiment_id
    artifact_location = None
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite":
        # Keep artifacts beside the database whatever the working directory of later runs.
        db = Path(uri.removeprefix("sqlite:///"))
        artifact_location = (db.parent / "mlartifacts").resolve().as_uri()
    return client.create_experiment(name, artifact_location=artifact_location,
                                    tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})


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

    def log_dict(self, doc: dict, artifact_file: str) -> None:
        self.client.log_dict(self.run_id, doc, artifact_file)

    def describe_metrics(self, kinds: tuple[str, ...]) -> None:
        """The run's description (shown on its page) and ``metrics.json``: what each metric key means."""
        from mcr_exit.metrics.registry import describe, legend

        self.set_tags({DESCRIPTION_TAG: "Metrics of this run (step = layer index; under depth/..., "
                                        "step = round(100 * layer / L)):\n\n" + legend(kinds)})
        self.log_dict(describe(kinds), "metrics.json")

    def log_dataset(self, texts: list[str], *, name: str, source: str, digest: str, context: str) -> None:
        """The prompts themselves as a dataset input (local files as a file source, other sources as tags)."""
        import pandas as pd

        mlflow = _mlflow()
        from mlflow.data.code_dataset_source import CodeDatasetSource

        src = source if Path(source).exists() else CodeDatasetSource(tags={"source": source})
        with warnings.catch_warnings():  # MLflow registers its local-file source twice and says so each time
            warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple")
            dataset = mlflow.data.from_pandas(pd.DataFrame({"text": texts}), source=src, name=name, digest=digest[:36])
        self._log_input(dataset, context)

    def log_dataset_meta(self, *, name: str, source: str, digest: str | None, context: str) -> None:
        """A dataset input recorded by name, source and digest only (mteb tasks, labelled files, ...)."""
        _mlflow()
        from mlflow.data.code_dataset_source import CodeDatasetSource
        from mlflow.data.meta_dataset import MetaDataset

        src = CodeDatasetSource(tags={"source": source})
        self._log_input(MetaDataset(src, name=name, digest=digest[:36] if digest else None), context)

    def _log_input(self, dataset, context: str) -> None:
        from mlflow.entities import DatasetInput, InputTag

        tag = InputTag(key="mlflow.data.context", value=context)
        self.client.log_inputs(self.run_id, datasets=[DatasetInput(dataset._to_mlflow_entity(), tags=[tag])])

    def set_tags(self, tags: Mapping[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, v)

    def adopt_child(self, run_id: str, tags: Mapping[str, str] | None = None) -> None:
        """Make a finished run a child of this one (nested in the UI's run list)."""
        self.client.set_tag(run_id, "mlflow.parentRunId", self.run_id)
        for k, v in (tags or {}).items():
            self.client.set_tag(run_id, k, v)


@contextmanager
def tracked_run(
    *, tracking_uri: str | None, experiment: str = DEFAULT_EXPERIMENT, run_name: str,
    tags: Mapping[str, str] | None = None, parent_run_id: str | None = None,
) -> Iterator[RunLogger]:
    """One MLflow run; it ends FINISHED on success, KILLED on SIGTERM or Ctrl-C, FAILED on any other
    exception (which is re-raised). Runs of this experiment left RUNNING by a dead process are marked
    KILLED first (see ``repair_dead_runs``)."""
    mlflow = _mlflow()
    uri = resolve_tracking_uri(tracking_uri)
    check_tracking_server(uri)
    run_tags_ = dict(tags or {})
    run_tags_["mlflow.runName"] = run_name
    if parent_run_id:
        run_tags_["mlflow.parentRunId"] = parent_run_id
    run_tags_.update(owner_tags())
    from mcr_exit.signals import Terminated, sigterm_raises

    with sigterm_raises():
        with _store_opening(uri):
            client = mlflow.MlflowClient(tracking_uri=uri)
            exp_id = _ensure_experiment(client, experiment, uri)
            repair_dead_runs(client, [exp_id], strict=False)
            run = client.create_run(exp_id, tags=run_tags_, run_name=run_name)
        logger = RunLogger(client, run.info.run_id)
        try:
            yield logger
        except (KeyboardInterrupt, Terminated):
            _end_run_after_error(client, run.info.run_id, "KILLED")
            raise
        except BaseException:
            _end_run_after_error(client, run.info.run_id, "FAILED")
            raise
        client.set_terminated(run.info.run_id, status="FINISHED")


@contextmanager
def _store_opening(uri: str) -> Iterator[None]:
    """Opening the store (its database made or migrated, the experiment, the new run): a failure of the
    machine (a full disk, an unwritable database) as one line that names the store."""
    try:
        yield
    except McrExitError:
        raise
    except Exception as exc:
        detail = environment_detail(exc)
        if detail is None:
            raise
        raise ConfigError(f"cannot open the MLflow store {uri}: {detail}") from exc


def _end_run_after_error(client, run_id: str, status: str) -> None:
    """Mark the run ended after the work failed. A store that cannot take even this (the disk that failed
    the work is full) leaves the run RUNNING, and the first error is the one reported: the next run of the
    experiment, or ``mcr-exit runs --repair``, marks it KILLED once this process is gone."""
    try:
        client.set_terminated(run_id, status=status)
    except Exception as exc:  # noqa: BLE001 - only a failure of the machine is swallowed
        if environment_detail(exc) is None:
            raise


@contextmanager
def maybe_run(enabled: bool, **kwargs) -> Iterator[RunLogger | None]:
    """``tracked_run(**kwargs)`` when ``enabled``, else None (``--no-mlflow``): one code path for both."""
    if not enabled:
        yield None
        return
    with tracked_run(**kwargs) as logger:
        yield logger


# A command's run, opened once its model is loaded (before the work) and ended with the command.

_COMMAND_RUN: ContextVar[dict | None] = ContextVar("mcr_exit_command_run", default=None)


def command_run(command: str):
    """Decorator for a click command with the tracking options (--tracking-uri, --experiment, --no-mlflow).

    Inside it, ``open_command_run`` opens the command's MLflow run (once the model is known, before the
    work, so the run's duration is the work's); the run ends FINISHED when the command returns and
    FAILED when it raises. Bad input found before ``open_command_run`` leaves no run behind.
    """
    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            slot = {"command": command, "options": kwargs, "stack": None, "logger": None}
            if kwargs.get("output_dir"):  # an unwritable --output-dir fails now, not after the work
                from mcr_exit.outputs import check_output_dir

                check_output_dir(kwargs["output_dir"], replace=False)
            if not kwargs.get("no_mlflow"):  # a dead tracking server fails now, not after the model loads
                check_tracking_server(resolve_tracking_uri(kwargs.get("tracking_uri")))
            token = _COMMAND_RUN.set(slot)
            try:
                result = fn(*args, **kwargs)
            except BaseException:
                if slot["stack"] is not None:
                    slot["stack"].__exit__(*sys.exc_info())
                raise
            finally:
                _COMMAND_RUN.reset(token)
            if slot["stack"] is not None:
                slot["stack"].close()
            return result

        return wrapper

    return decorate


def open_command_run(*, model: str, revision: str | None = None, dtype: str | None = None) -> RunLogger | None:
    """Open the enclosing ``command_run``'s MLflow run (None with --no-mlflow or outside a command)."""
    slot = _COMMAND_RUN.get()
    if slot is None or slot["options"].get("no_mlflow"):
        return None
    if slot["logger"] is None:
        stack = ExitStack()
        cmd, opts = slot["command"], slot["options"]
        slot["logger"] = stack.enter_context(tracked_run(
            tracking_uri=opts.get("tracking_uri"), experiment=opts.get("experiment") or DEFAULT_EXPERIMENT,
            run_name=run_name(cmd, model, revision=revision, dtype=dtype),
            tags=run_tags(cmd, model=model, revision=revision, dtype=dtype)))
        slot["stack"] = stack
    return slot["logger"]


def command_run_logger() -> RunLogger | None:
    """The open run of the enclosing ``command_run``, if any."""
    slot = _COMMAND_RUN.get()
    return slot["logger"] if slot else None


# Reading runs back (compare) and artifacts (serve's runs:/ and models:/ profiles).

def open_client(tracking_uri: str | None):
    return _mlflow().MlflowClient(tracking_uri=resolve_tracking_uri(tracking_uri))


def get_run(client, run_id: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException:
        raise ConfigError(f"MLflow run '{run_id}' does not exist in {client.tracking_uri}") from None


def experiment_ids(client, experiment: str | None) -> list[str]:
    """The named experiment's id, or every experiment's when ``experiment`` is None."""
    if experiment is None:
        return [e.experiment_id for e in client.search_experiments()]
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ConfigError(f"MLflow experiment '{experiment}' does not exist in {client.tracking_uri}")
    return [exp.experiment_id]


def finished_runs(client, experiment_ids: list[str], command: str) -> list:
    """Every FINISHED run of one mcr-exit command, newest first."""
    flt = f"tags.`{TAG_PREFIX}command` = '{command}' and attributes.status = 'FINISHED'"
    return client.search_runs(experiment_ids, flt, order_by=["attributes.start_time DESC"], max_results=5000)


def metric_history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]


def download_artifacts(uri: str, tracking_uri: str | None, dst: str) -> Path:
    """mlflow's own artifact download for runs:/ and models:/ URIs; one-line DataError on failure."""
    mlflow = _mlflow()
    resolved = resolve_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(resolved)
    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=dst, tracking_uri=resolved))
    except Exception as exc:  # noqa: BLE001 - mlflow raises many types; one line for the user
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"cannot download {uri}: {first}") from exc
