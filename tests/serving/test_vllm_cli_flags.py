"""The vLLM flags of `mcr-exit serve`: bad values fail with one line before anything loads."""

from __future__ import annotations

import importlib.util

import pytest
from click.testing import CliRunner

from mcr_exit.cli import main


@pytest.mark.parametrize("args, message", [
    (["--engine", "vllm", "--tensor-parallel-size", "0"], "--tensor-parallel-size must be at least 1, got 0"),
    (["--engine", "vllm", "--gpu-memory-utilization", "1.5"], "--gpu-memory-utilization must be a fraction in (0, 1]"),
    (["--engine", "vllm", "--gpu-memory-utilization", "0"], "--gpu-memory-utilization must be a fraction in (0, 1]"),
    (["--engine", "vllm", "--max-model-len", "-3"], "--max-model-len must be at least 1, got -3"),
    (["--quantization", "awq"], "--quantization only apply to --engine vllm"),
    (["--tensor-parallel-size", "2", "--max-model-len", "64"],
     "--tensor-parallel-size, --max-model-len only apply to --engine vllm"),
])
def test_bad_vllm_flags_fail_in_one_line(tmp_path, args, message):
    r = CliRunner().invoke(main, ["serve", *args, "--profile", str(tmp_path / "p.json")])
    assert r.exit_code != 0
    assert message in r.output and len(r.output.strip().splitlines()) == 1


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed here")
def test_an_unknown_quantization_is_refused_before_loading(tmp_path):
    r = CliRunner().invoke(main, ["serve", "--engine", "vllm", "--quantization", "nonsense",
                                  "--profile", str(tmp_path / "p.json")])
    assert r.exit_code != 0 and "--quantization 'nonsense' is not a method vLLM knows" in r.output
    assert "awq" in r.output and len(r.output.strip().splitlines()) == 1
