"""The tracking layer against a real MLflow sqlite store: a command's run opens before its work, ends
FAILED on an error, records its inputs, and follows the one tag and naming scheme."""

from __future__ import annotations

import time

import pytest
from click.testing import CliRunner

from mcr_exit.cli import main
from mcr_exit.tracking import command_run, command_run_logger, open_command_run, run_name, run_tags


@pytest.fixture
def uri(tmp_path):
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def _runs(uri, experiment="t"):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    return client, ([] if exp is None else client.search_runs([exp.experiment_id]))


def test_command_run_spans_the_work_and_fails_with_it(uri):
    @command_run("demo")
    def work(*, tracking_uri, experiment, no_mlflow, fail=False):
        open_command_run(model="m", dtype="float32")
        time.sleep(0.3)
        command_run_logger().log_metrics({"summary/x": 1.0})
        if fail:
            raise RuntimeError("boom")
        return command_run_logger().run_id

    run_id = work(tracking_uri=uri, experiment="t", no_mlflow=False)
    with pytest.raises(RuntimeError):
        work(tracking_uri=uri, experiment="t", no_mlflow=False, fail=True)
    client, runs = _runs(uri)
    by_id = {r.info.run_id: r for r in runs}
    ok = by_id.pop(run_id)
    assert ok.info.status == "FINISHED" and ok.info.end_time - ok.info.start_time >= 300
    assert ok.info.run_name == "demo m · float32" and ok.data.tags["mcr_exit.command"] == "demo"
    assert [r.info.status for r in by_id.values()] == ["FAILED"]


def test_no_run_when_the_command_stops_before_opening_one_or_mlflow_is_off(uri):
    @command_run("demo")
    def bad_input(*, tracking_uri, experiment, no_mlflow):
        raise ValueError("bad input")

    @command_run("demo")
    def off(*, tracking_uri, experiment, no_mlflow):
        return open_command_run(model="m")

    with pytest.raises(ValueError):
        bad_input(tracking_uri=uri, experiment="t", no_mlflow=False)
    assert off(tracking_uri=uri, experiment="t", no_mlflow=True) is None
    assert _runs(uri)[1] == []


def test_names_and_tags():
    assert run_name("analyze", "SmolLM2", revision="main", bos="none", data="gsm8k", dtype="bfloat16") == \
        "analyze SmolLM2@main · bos=none · data=gsm8k · bfloat16"
    tags = run_tags("lens", model="m", revision=None, bos="auto")
    assert tags["mcr_exit.command"] == "lens" and tags["mcr_exit.model"] == "m" and "mcr_exit.revision" not in tags


def test_lens_run_opens_before_the_work_and_records_its_data(tiny_llama_dir, tmp_path, uri):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The quick brown fox jumps over the lazy dog.\nA bee lives in a hive.\n" * 8)
    res = CliRunner().invoke(main, ["lens", "--model", str(tiny_llama_dir), "--data", str(corpus), "--window", "32",
                                    "--max-windows", "4", "--output-dir", str(tmp_path / "out"),
                                    "--tracking-uri", uri, "--experiment", "t"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    client, (run,) = _runs(uri)
    assert run.info.status == "FINISHED"
    assert run.info.run_name.startswith(f"lens {tiny_llama_dir.name}") and "data=corpus" in run.info.run_name
    assert run.data.tags["mcr_exit.command"] == "lens" and run.data.tags["mcr_exit.model"] == tiny_llama_dir.name
    (ds,) = run.inputs.dataset_inputs
    assert ds.dataset.name == "corpus" and ds.tags[0].value == "lens"
    assert client.get_experiment_by_name("t").tags["mlflow.experimentKind"] == "custom_model_development"


def _full_database():
    """What MLflow's SQL store raises when its disk is full: its own exception, from SQLAlchemy's."""
    import sqlite3

    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import OperationalError

    cause = OperationalError("INSERT INTO metrics ...", {}, sqlite3.OperationalError("database or disk is full"))
    try:
        raise MlflowException("(sqlite3.OperationalError) database or disk is full") from cause
    except MlflowException as exc:
        return exc


def test_a_failing_machine_is_told_apart_from_a_bug():
    import errno
    import os

    from mcr_exit.errors import environment_failure

    assert environment_failure(_full_database()) == ("the MLflow store's database failed: "
                                                     "(sqlite3.OperationalError) database or disk is full")
    assert environment_failure(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))) == "No space left on device"
    assert environment_failure(OSError(errno.EROFS, os.strerror(errno.EROFS), "/ro/x")) == \
        "Read-only file system: /ro/x"
    assert environment_failure(FileNotFoundError(errno.ENOENT, "No such file")) is None
    assert environment_failure(ValueError("a bug")) is None


def test_a_store_that_fills_up_during_the_work_gives_one_line(tiny_llama_dir, tmp_path, uri, monkeypatch):
    """The database fails while the analysis logs its metrics: one line, exit 1, the run FAILED (or left
    RUNNING for the repair, where even that cannot be written), and no output folder."""
    from mcr_exit.tracking import RunLogger

    def full(self, rows):
        raise _full_database()

    monkeypatch.setattr(RunLogger, "log_series", full)
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["analyze", "--model", str(tiny_llama_dir), "--max-prompts", "2",
                                    "--tracking-uri", uri, "--experiment", "t", "--output-dir", str(out)])
    lines = [ln for ln in res.output.strip().splitlines()  # less the progress bar and MLflow's INFO lines
             if ln.strip() and "prompt/s" not in ln and " INFO mlflow" not in ln]
    assert res.exit_code == 1 and lines == [
        "Error: the MLflow store's database failed: (sqlite3.OperationalError) database or disk is full"], res.output
    _, runs = _runs(uri)
    assert [r.info.status for r in runs] == ["FAILED"] and not out.exists()


def test_a_store_that_cannot_be_opened_names_itself(tmp_path, monkeypatch):
    import mlflow

    from mcr_exit.errors import ConfigError
    from mcr_exit.tracking import tracked_run

    def full(*args, **kwargs):
        raise _full_database()

    monkeypatch.setattr(mlflow.MlflowClient, "create_run", full)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(ConfigError, match=r"^cannot open the MLflow store sqlite:///.*mlflow\.db: "
                                          r"\(sqlite3\.OperationalError\) database or disk is full$"):
        with tracked_run(tracking_uri=uri, experiment="t", run_name="r"):
            pass
