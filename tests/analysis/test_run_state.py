"""Run state: a run ends KILLED on SIGTERM or Ctrl-C, records the process that owns it, and runs left
RUNNING by a dead process are found and marked KILLED (at the next run, or by `mcr-exit runs --repair`)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from mcr_exit.cli import main
from mcr_exit.errors import ConfigError
from mcr_exit.run_state import check_tracking_server
from mcr_exit.signals import Terminated
from mcr_exit.tracking import tracked_run


@pytest.fixture
def uri(tmp_path):
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def _client(uri):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=uri)


@pytest.mark.parametrize("exc, status", [(KeyboardInterrupt, "KILLED"), (Terminated, "KILLED"),
                                         (RuntimeError, "FAILED")])
def test_how_a_run_ends(uri, exc, status):
    with pytest.raises(exc):
        with tracked_run(tracking_uri=uri, experiment="t", run_name="r") as logger:
            raise exc()
    run = _client(uri).get_run(logger.run_id)
    assert run.info.status == status
    assert run.data.tags["mcr_exit.pid"] == str(__import__("os").getpid())
    assert run.data.tags["mcr_exit.host"] == socket.gethostname()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _orphan(client, exp_id, *, pid, host=None, start="") -> str:
    tags = {"mcr_exit.host": host or socket.gethostname(), "mcr_exit.pid": str(pid), "mcr_exit.pid_start": start}
    return client.create_run(exp_id, tags=tags).info.run_id


def _setup(uri):
    with tracked_run(tracking_uri=uri, experiment="t", run_name="first"):
        pass
    client = _client(uri)
    exp_id = client.get_experiment_by_name("t").experiment_id
    import os

    ids = {"dead": _orphan(client, exp_id, pid=_dead_pid()),
           "live": _orphan(client, exp_id, pid=os.getpid()),
           "reused": _orphan(client, exp_id, pid=os.getpid(), start="1"),  # this pid, but an older process
           "elsewhere": _orphan(client, exp_id, pid=_dead_pid(), host="another-host")}
    return client, ids


def _statuses(client, ids):
    return {k: client.get_run(v).info.status for k, v in ids.items()}


def test_runs_repair_marks_only_provably_dead_owners(uri):
    client, ids = _setup(uri)
    res = CliRunner().invoke(main, ["runs", "--tracking-uri", uri])
    assert res.exit_code == 0, res.output
    assert ids["dead"] in res.output and ids["reused"] in res.output and ids["live"] not in res.output
    assert set(_statuses(client, ids).values()) == {"RUNNING"}  # listing changes nothing
    res = CliRunner().invoke(main, ["runs", "--repair", "--tracking-uri", uri, "--experiment", "t"])
    assert res.exit_code == 0 and "marked 2 run(s) KILLED" in res.output, res.output
    assert _statuses(client, ids) == {"dead": "KILLED", "live": "RUNNING", "reused": "KILLED",
                                      "elsewhere": "RUNNING"}
    assert client.get_run(ids["dead"]).data.tags["mcr_exit.ended_by"].startswith("repair")


def test_the_next_run_repairs_its_experiment(uri):
    client, ids = _setup(uri)
    with tracked_run(tracking_uri=uri, experiment="t", run_name="next"):
        pass
    assert _statuses(client, ids) == {"dead": "KILLED", "live": "RUNNING", "reused": "KILLED",
                                      "elsewhere": "RUNNING"}


def test_a_closed_port_fails_fast_and_a_listening_one_passes():
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens on it now
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match="not reachable"):
        check_tracking_server(f"http://127.0.0.1:{port}")
    assert time.monotonic() - t0 < 5
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        check_tracking_server(f"http://127.0.0.1:{server.getsockname()[1]}")
    with pytest.raises(ConfigError, match="port"):
        check_tracking_server("http://127.0.0.1:99999")
    check_tracking_server("sqlite:///x.db")  # not a server: nothing to check


def test_a_sqlite_store_that_cannot_be_made_is_refused_before_any_work(tmp_path):
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "a-folder").mkdir()
    with pytest.raises(ConfigError, match="a-file is a file, so the database cannot be made under it"):
        check_tracking_server(f"sqlite:///{tmp_path}/a-file/sub/mlflow.db")
    with pytest.raises(ConfigError, match="a-folder is a folder, not a database file"):
        check_tracking_server(f"sqlite:///{tmp_path}/a-folder")
    check_tracking_server(f"sqlite:///{tmp_path}/new/sub/mlflow.db")  # folders MLflow will make: fine
    check_tracking_server("sqlite:///:memory:")
