"""Data-parallel collection under torchrun: each rank takes every world-th prompt, then all ranks
exchange their per-prompt statistics. Per-layer means are taken over the merged prompts, so the result
equals a single-process run on the same prompts (any backend: nccl on GPUs, gloo on CPUs)."""

from __future__ import annotations

import numpy as np

from mcr_exit.analysis.collect import LayerStatistics, collect_statistics
from mcr_exit.models.loading import LoadedModel


def is_distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if is_distributed() else 0


def _merge(parts: list[tuple[list[int], LayerStatistics]], n: int) -> LayerStatistics:
    first = next(s for _, s in parts if s is not None)
    merged = LayerStatistics(n_layers=first.n_layers, n_heads=first.n_heads, lengths=np.zeros(n, dtype=int))
    for rows, stats in parts:
        if stats is None:
            continue
        merged.lengths[rows] = stats.lengths
        for group in ("hidden", "final_normed", "attention", "heads", "tokens"):
            src, dst = getattr(stats, group), getattr(merged, group)
            for key, arr in src.items():
                if key not in dst:
                    dst[key] = np.full((n, *arr.shape[1:]), np.nan, dtype=arr.dtype)
                dst[key][rows] = arr
    return merged


def collect_statistics_distributed(loaded: LoadedModel, ids: list[list[int]], **kwargs) -> LayerStatistics:
    """``collect_statistics`` over all ranks; every rank returns the merged statistics of all prompts."""
    import torch.distributed as dist

    if not is_distributed():
        return collect_statistics(loaded, ids, **kwargs)
    world, me = dist.get_world_size(), dist.get_rank()
    mine = list(range(me, len(ids), world))
    local = collect_statistics(loaded, [ids[i] for i in mine], **kwargs) if mine else None
    gathered: list = [None] * world
    dist.all_gather_object(gathered, (mine, local))
    return _merge(gathered, len(ids))


def init_from_env(device: str) -> str:
    """Under torchrun (WORLD_SIZE > 1), join the process group; returns the device this rank uses."""
    import os

    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device
    if not device.startswith("cuda"):
        dist.init_process_group("gloo")
        return device
    import torch

    if device == "cuda":  # one GPU per rank, by its local rank
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", device_id=torch.device(device))  # (NCCL need not guess the rank's GPU)
    return device
