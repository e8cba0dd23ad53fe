"""What can fail without the model fails first, in one line: a bad --output-dir or a dead tracking server
is reported before the model loads (the missing model below would otherwise be the error)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from mcr_exit.cli import main

NO_MODEL = "/no/such/model"
REPO = Path(__file__).resolve().parents[2]


def _lines(res) -> list[str]:
    return [ln for ln in res.output.strip().splitlines() if ln.strip()]


def _analyze(*args):
    return CliRunner().invoke(main, ["analyze", "--model", NO_MODEL, *args])


def test_a_folder_of_the_users_is_refused_before_the_model_loads(tmp_path):
    demo = tmp_path / "demo"
    (demo / "sub").mkdir(parents=True)
    (demo / "keep.txt").write_text("x")
    res = _analyze("--no-mlflow", "--output-dir", str(demo))
    assert res.exit_code == 1 and len(_lines(res)) == 1 and "did not write" in res.output, res.output
    assert (demo / "keep.txt").read_text() == "x" and (demo / "sub").is_dir()


@pytest.mark.parametrize("target", [".", ".."])
def test_the_working_directory_and_above_are_refused(tmp_path, monkeypatch, target):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep.txt").write_text("x")
    res = _analyze("--no-mlflow", "--output-dir", target)
    assert res.exit_code == 1 and len(_lines(res)) == 1 and "working directory" in res.output, res.output
    assert (tmp_path / "keep.txt").exists()


def test_an_output_under_a_file_fails_at_once(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    t0 = time.monotonic()
    res = _analyze("--no-mlflow", "--output-dir", str(tmp_path / "file.txt" / "out"))
    assert res.exit_code == 1 and len(_lines(res)) == 1 and "is not a folder" in res.output, res.output
    assert time.monotonic() - t0 < 5


@pytest.mark.parametrize("command", ["analyze", "lens"])
def test_a_dead_tracking_server_fails_in_seconds_before_the_model_loads(tmp_path, command):
    t0 = time.monotonic()
    res = CliRunner().invoke(main, [command, "--model", NO_MODEL, "--tracking-uri", "http://127.0.0.1:9",
                                    "--output-dir", str(tmp_path / "o")])
    took = time.monotonic() - t0
    assert res.exit_code == 1 and len(_lines(res)) == 1, res.output
    assert "tracking server http://127.0.0.1:9 is not reachable" in res.output
    assert took < 10, took


def test_lens_checks_its_output_dir_before_the_model_loads(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    res = CliRunner().invoke(main, ["lens", "--model", NO_MODEL, "--no-mlflow",
                                    "--output-dir", str(tmp_path / "file.txt" / "o")])
    assert res.exit_code == 1 and "is not a folder" in res.output, res.output


@pytest.mark.parametrize("args, message", [
    (["analyze", "--tracking-uri", "http://127.0.0.1:9"], "is not reachable"),
    (["ablate", "--no-mlflow", "--output-dir", "."], "working directory"),
    (["sweep", "--revision", "main", "--tracking-uri", "http://127.0.0.1:9"], "is not reachable"),
])
def test_the_checks_come_before_torch_is_even_imported(tmp_path, args, message):
    code = ("import atexit, sys; atexit.register(lambda: print('torch imported:', 'torch' in sys.modules, "
            "file=sys.stderr)); from mcr_exit.cli import main; main(sys.argv[1:])")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, "-c", code, *args], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=60)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 1 and message in lines[0] and lines[1:] == ["torch imported: False"], res.stderr
