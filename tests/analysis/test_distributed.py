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
