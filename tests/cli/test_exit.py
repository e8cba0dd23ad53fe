"""The command line's quick exit keeps what an ordinary exit gives: exit codes, output, and a profiler's
stats written after the program returns."""

from __future__ import annotations

import os
import pstats
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _run(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=cwd)


def test_exit_codes_and_output_survive_the_quick_exit(tmp_path):
    ok = _run("-m", "mcr_exit", "--version", cwd=tmp_path)
    assert ok.returncode == 0 and "mcr-exit, version" in ok.stdout
    bad = _run("-m", "mcr_exit", "analyze", "--tau", "5", "--no-mlflow", cwd=tmp_path)
    assert bad.returncode != 0 and bad.stderr.strip().splitlines() == [bad.stderr.strip()]
    assert "--tau" in bad.stderr


def test_a_profiler_still_writes_its_stats(tmp_path):
    out = tmp_path / "prof.out"
    res = _run("-m", "cProfile", "-o", str(out), "-m", "mcr_exit", "analyze", "--help", cwd=tmp_path)
    assert res.returncode == 0 and "Usage:" in res.stdout
    assert pstats.Stats(str(out)).total_calls > 0
