"""The engine and the benchmark import without fastapi, uvicorn, mlflow or vllm; the app names its extra."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CODE = """
import sys, runpy
for m in ('fastapi', 'uvicorn', 'mlflow', 'starlette', 'vllm'):
    sys.modules[m] = None  # import fails, find_spec reports absent
import mcr_exit.serving.engine, mcr_exit.serving.scheduler, mcr_exit.serving.jobs
assert callable(runpy.run_path('benchmarks/bench_serving.py').get('main'))
from mcr_exit.serving.app import create_app
try:
    create_app(None)
except Exception as e:
    print(e)
"""


def test_engine_and_benchmark_without_serving_extras():
    r = subprocess.run([sys.executable, "-c", CODE], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    assert "pip install 'mcr-exit[serve]'" in r.stdout
