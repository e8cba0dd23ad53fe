"""A real `mcr-exit analyze` process killed mid-run: SIGTERM ends its MLflow run KILLED and leaves no
staging folder; after SIGKILL (no chance to clean up) the next run marks the orphan KILLED and sweeps
the dead process's staging folder."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def store(tmp_path):
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture
def many_prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"Sentence {i} about foxes and dogs. " * 12}) for i in range(3000)))
    return path


def _env():
    return {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _start(model, data, out, store, *extra):
    cmd = [sys.executable, "-m", "mcr_exit", "analyze", "--model", str(model), "--data", str(data),
           "--output-dir", str(out), "--tracking-uri", store, "--experiment", "sig", "--batch-size", "1",
           "--no-plots", *extra]
    return subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _runs(store):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=store)
    exp = client.get_experiment_by_name("sig")
    return [] if exp is None else client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])


def _running_ids(store) -> list[str]:
    """RUNNING run ids, read with plain sqlite (an MlflowClient here could race the child's schema setup)."""
    try:
        with sqlite3.connect(store.removeprefix("sqlite:///"), timeout=1) as db:
            return [row[0] for row in db.execute("SELECT run_uuid FROM runs WHERE status = 'RUNNING'")]
    except sqlite3.Error:
        return []


def _wait_running(proc, store, timeout=240.0) -> str:
    """Until the process's run is RUNNING and its work has begun (the run opens just before it)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        assert proc.poll() is None, proc.communicate()
        ids = _running_ids(store)
        if ids:
            time.sleep(1.0)
            assert proc.poll() is None, "the analysis ended before it could be killed mid-run"
            return ids[-1]
        time.sleep(0.3)
    proc.kill()
    pytest.fail("no RUNNING run appeared")


def _leftovers(parent: Path) -> list[str]:
    """Hidden folders: staging folders (this test makes no other)."""
    return [p.name for p in parent.iterdir() if p.name.startswith(".") and p.is_dir()]


def test_sigterm_marks_the_run_killed_and_cleans_up(tmp_path, tiny_llama_dir, store, many_prompts):
    out = tmp_path / "out"
    proc = _start(tiny_llama_dir, many_prompts, out, store)
    run_id = _wait_running(proc, store)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert time.monotonic() - t0 < 30
    assert "Terminated (SIGTERM)" in err and "Traceback" not in err, err
    [after] = [r for r in _runs(store) if r.info.run_id == run_id]
    assert after.info.status == "KILLED"
    assert not out.exists() and _leftovers(tmp_path) == []


def test_after_sigkill_the_next_run_marks_the_orphan_and_sweeps_dead_stages(tmp_path, tiny_llama_dir, store,
                                                                            many_prompts):
    proc = _start(tiny_llama_dir, many_prompts, tmp_path / "out", store)
    orphan = _wait_running(proc, store)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    # A writer killed during its write step leaves a staging folder (a real process, really killed).
    code = ("import os, signal; from pathlib import Path; from mcr_exit.outputs import staged_output_dir\n"
            f"with staged_output_dir(Path({str(tmp_path / 'half')!r})) as s:\n"
            "    (s / 'x.csv').write_text('1'); os.kill(os.getpid(), signal.SIGKILL)\n")
    subprocess.run([sys.executable, "-c", code], env=_env(), timeout=60)
    assert [r.info.status for r in _runs(store)] == ["RUNNING"] and len(_leftovers(tmp_path)) == 1

    small = tmp_path / "small.jsonl"
    small.write_text("\n".join(json.dumps({"text": f"A short prompt number {i}."}) for i in range(3)))
    nxt = _start(tiny_llama_dir, small, tmp_path / "next", store)
    _, err = nxt.communicate(timeout=300)
    assert nxt.returncode == 0, err
    by_id = {r.info.run_id: r for r in _runs(store)}
    assert by_id[orphan].info.status == "KILLED"
    assert by_id[orphan].data.tags["mcr_exit.ended_by"].startswith("repair")
    assert sorted(r.info.status for r in by_id.values()) == ["FINISHED", "KILLED"]
    assert _leftovers(tmp_path) == [] and (tmp_path / "next" / "phase_profile.json").exists()
