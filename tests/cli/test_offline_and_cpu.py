"""Failures a user meets on a laptop: a Hub task offline fails before the model loads, in one line;
lm-eval's CLI runs on a machine without CUDA."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from mcr_exit.cli import main
from mcr_exit.evaluation.lmeval_cli import device_args

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(REPO),
       "OMP_NUM_THREADS": "1"}


def test_offline_hub_task_fails_before_the_model_loads(tmp_path, monkeypatch):
    pytest.importorskip("mteb")
    import mcr_exit.cli.evaluation_options as eo

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the task data")

    monkeypatch.setattr(eo, "load_for_eval", no_model)
    monkeypatch.setattr("mcr_exit.cli.mteb_eval.load_for_eval", no_model)
    t0 = time.perf_counter()
    r = CliRunner().invoke(main, ["mteb", "--task", "Banking77Classification", "--no-mlflow",
                                  "--output-dir", str(tmp_path / "o")])
    assert r.exit_code == 1, r.output
    lines = [line for line in r.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: cannot load the data of mteb task 'Banking77Classification'")
    assert "--custom-task" in lines[0]
    assert time.perf_counter() - t0 < 60


def test_device_defaults_to_cpu_without_cuda():
    argv = ["run", "--model", "mcr-exit-lens", "--tasks", "mcr_capitals"]
    assert device_args(argv, cuda_available=False)[0] == [*argv, "--device", "cpu"]
    assert device_args(argv, cuda_available=True) == (argv, None)
    assert device_args([*argv, "--device", "cuda:1"], cuda_available=False)[0][-1] == "cuda:1"
    assert device_args(["ls", "tasks"], cuda_available=False) == (["ls", "tasks"], None)
    assert device_args(["run", "--help"], cuda_available=False)[1] is None


def _lm_eval_cli(args, cwd):
    from mcr_exit.evaluation.lmeval_model import TASK_DIR

    cmd = [sys.executable, "-m", "mcr_exit.evaluation.lmeval_cli", "run", "--model", "mcr-exit-lens",
           "--include_path", str(TASK_DIR), *args]
    return subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the CPU-only path")
def test_lm_eval_cli_on_a_cpu_only_machine(tiny_llama_dir, tmp_path):
    pytest.importorskip("lm_eval")
    ok = _lm_eval_cli(["--model_args", f"model={tiny_llama_dir},layer=1", "--tasks", "mcr_arithmetic",
                       "--limit", "2"], tmp_path)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "no CUDA device; running on the CPU" in ok.stderr and "mcr_arithmetic" in ok.stdout
    bad = _lm_eval_cli(["--model_args", f"model={tiny_llama_dir},layer=1", "--tasks", "mcr_arithmetic",
                        "--limit", "2", "--device", "cuda:0"], tmp_path)
    assert bad.returncode == 1
    assert "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1].startswith("Error: ")
