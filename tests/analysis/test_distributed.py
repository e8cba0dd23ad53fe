"""Data-parallel collection over two gloo processes equals one process."""

from __future__ import annotations

import os
import pickle

import numpy as np
import torch.multiprocessing as mp

from mcr_exit.analysis.collect import collect_statistics

IDS = [[2, *range(10, 10 + n)] for n in (5, 9, 3, 12, 7)]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from mcr_exit.analysis.distributed import collect_statistics_distributed
    from mcr_exit.models import from_objects
    from tests.tiny import build_tiny_model

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        loaded = from_objects(build_tiny_model("llama", 300), _NoTokenizer())
        stats = collect_statistics_distributed(loaded, IDS, max_batch=2)
        with open(f"{out}.{rank}", "wb") as f:
            pickle.dump(stats, f)
    finally:
        dist.destroy_process_group()


class _NoTokenizer:
    pad_token_id = 0
    eos_token_id = 1
    unk_token_id = None


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_equal_one_process(tmp_path):
    from mcr_exit.models import from_objects
    from tests.tiny import build_tiny_model

    out = str(tmp_path / "stats")
    mp.start_processes(_worker, args=(2, _free_port(), out), nprocs=2, join=True, start_method="spawn")
    single = collect_statistics(from_objects(build_tiny_model("llama", 300), _NoTokenizer()), IDS, max_batch=4)
    for r in range(2):
        with open(f"{out}.{r}", "rb") as f:
            merged = pickle.load(f)
        np.testing.assert_array_equal(merged.lengths, single.lengths)
        for group in ("hidden", "attention"):
            for key, arr in getattr(single, group).items():
                np.testing.assert_allclose(getattr(merged, group)[key], arr, rtol=1e-5, atol=1e-7, err_msg=key)


def test_the_cli_under_torchrun_writes_the_one_process_result(tmp_path, tiny_llama_dir):
    """`torchrun --nproc-per-node 2 --no-python mcr-exit analyze ...` (gloo on CPUs): rank 0 writes the
    outputs and logs the MLflow run; its layer table equals a one-process run's."""
    import json
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    import pandas as pd

    data = tmp_path / "prompts.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"Prompt {i}: " + "the fox jumps over the dog. " * (1 + i % 4)})
                              for i in range(7)))
    common = ["analyze", "--model", str(tiny_llama_dir), "--data", str(data), "--no-plots", "--device", "cpu"]
    beside = Path(sys.executable).with_name("mcr-exit")  # the environment's console script
    exe = str(beside) if beside.exists() else shutil.which("mcr-exit")
    assert exe, "the mcr-exit console script is not installed"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                str(_free_port()), "--no-python", exe]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([*torchrun, *common, "--output-dir", str(tmp_path / "dp"), "--tracking-uri",
                          f"sqlite:///{tmp_path / 'mlflow.db'}"], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.count("outputs:") == 1  # only rank 0 reports and writes
    one = subprocess.run([exe, *common, "--no-mlflow", "--output-dir", str(tmp_path / "one")], capture_output=True,
                         text=True, env=env, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    for table in ("layers.csv", "per_prompt.csv.gz", "per_head.csv"):  # per prompt: each row where it belongs
        dp, single = (pd.read_csv(tmp_path / d / table) for d in ("dp", "one"))
        assert dp.shape == single.shape and dp.shape[0] > 2, table
        pd.testing.assert_frame_equal(dp, single, rtol=1e-5, atol=1e-7, obj=table)
    import mlflow

    runs = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").search_runs(
        [e.experiment_id for e in mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").search_experiments()])
    assert [r.info.status for r in runs] == ["FINISHED"]  # one run, from rank 0
