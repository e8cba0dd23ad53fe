"""The warm process (mcr_exit.warm): a cold `analyze` leaves one behind; the next `analyze` in the same
environment runs in a child forked from it and writes the same results; exit statuses, error lines and
SIGTERM pass through; another environment is not served by it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.cli.test_signals import _runs, _wait_running

REPO = Path(__file__).resolve().parents[2]
WARM_HEADER = "time by stage (in a warm process"


@pytest.fixture
def warm_env(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "MCR_EXIT_WARM": "1", "MCR_EXIT_WARM_DIR": str(tmp_path / "warm-processes"),
           "MCR_EXIT_WARM_IDLE": "300"}
    yield env
    subprocess.run([sys.executable, "-m", "mcr_exit", "warm", "stop"], env=env, timeout=60, capture_output=True)


def _mcr(env, *args, timeout=300):
    return subprocess.run([sys.executable, "-m", "mcr_exit", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def _status(env) -> list[str]:
    out = _mcr(env, "warm", "status", timeout=60).stdout
    return [line for line in out.splitlines() if "(this environment)" in line]


def _wait_warm(env, timeout=180.0) -> str:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        lines = _status(env)
        if lines:
            return lines[0]
        time.sleep(0.5)
    logs = "\n".join(p.read_text() for p in Path(env["MCR_EXIT_WARM_DIR"]).glob("*.log"))
    pytest.fail(f"no warm process answered; logs:\n{logs}")


def _tables(out: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(out.iterdir()) if p.suffix in (".csv", ".tsv")}


def _figures(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.suffix == ".png"}


def test_cold_run_leaves_a_warm_process_and_the_next_run_uses_it(tmp_path, tiny_llama_dir, warm_env):
    common = ["analyze", "--model", str(tiny_llama_dir), "--no-mlflow", "--verbose"]
    cold = _mcr(warm_env, *common, "--output-dir", str(tmp_path / "cold"))
    assert cold.returncode == 0, cold.stderr
    assert "time by stage:" in cold.stdout and WARM_HEADER not in cold.stdout
    line = _wait_warm(warm_env)
    assert "served 0" in line

    warm = _mcr(warm_env, *common, "--output-dir", str(tmp_path / "warm"))
    assert warm.returncode == 0, warm.stderr
    assert WARM_HEADER in warm.stdout, warm.stdout
    assert "served 1" in _status(warm_env)[0]
    cold_tables, warm_tables = _tables(tmp_path / "cold"), _tables(tmp_path / "warm")
    assert cold_tables and cold_tables == warm_tables
    figures = _figures(tmp_path / "cold")  # drawn by a new interpreter there, by a fork of the command here
    assert len(figures) == 3 and _figures(tmp_path / "warm") == figures
    profile = [json.loads((tmp_path / d / "phase_profile.json").read_text()) for d in ("cold", "warm")]
    for p in profile:
        p.pop("created", None)
    assert profile[0] == profile[1]

    # A failing command: its one-line error and exit status come back through the caller.
    bad = _mcr(warm_env, "analyze", "--model", str(tmp_path / "no-such-model"), "--no-mlflow")
    assert bad.returncode == 1 and bad.stderr.strip().count("\n") == 0 and "no-such-model" in bad.stderr, bad.stderr
    assert "served 2" in _status(warm_env)[0]

    # Another environment (one more variable) is not served by this process: it runs cold.
    other = _mcr({**warm_env, "MCR_EXIT_TEST_OTHER": "1"}, *common, "--no-plots",
                 "--output-dir", str(tmp_path / "other"))
    assert other.returncode == 0 and WARM_HEADER not in other.stdout
    assert _tables(tmp_path / "other") == cold_tables


def test_sigterm_reaches_the_warm_child(tmp_path, tiny_llama_dir, warm_env):
    start = _mcr(warm_env, "warm", "start", "--wait", "180", timeout=240)
    assert start.returncode == 0, start.stderr
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"text": f"Sentence {i} about foxes and dogs. " * 12})
                                 for i in range(3000)))
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "mcr_exit", "analyze", "--model", str(tiny_llama_dir),
                             "--data", str(prompts), "--output-dir", str(out), "--tracking-uri", store,
                             "--experiment", "sig", "--batch-size", "1", "--no-plots"],
                            env=warm_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    run_id = _wait_running(proc, store)
    assert "served 1" in _status(warm_env)[0] and "running 1" in _status(warm_env)[0]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Terminated (SIGTERM)" in err and "Traceback" not in err, err
    [after] = [r for r in _runs(store) if r.info.run_id == run_id]
    assert after.info.status == "KILLED"
    assert not out.exists()
    assert "running 0" in _status(warm_env)[0]
