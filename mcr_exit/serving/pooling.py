"""The server's pooling names, mapped onto the package's one pooling definition (metrics/pooling.py)."""

from __future__ import annotations

import torch

from mcr_exit.metrics.pooling import pool_hidden as _pool

POOLINGS = ("mean", "last")


def pool_hidden(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str = "mean",
                *, skip_first: bool = True, normalize: bool = True) -> torch.Tensor:
    """(B, T, d) right-padded hidden states -> (B, d) float32 vectors.

    mean: average over real tokens, without position 0 when ``skip_first`` (the server's default);
    last: each row's last real token. normalize: L2-normalize each vector.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}: use {', '.join(POOLINGS)}")
    name = "last" if pooling == "last" else ("mean_no_bos" if skip_first else "mean")
    return _pool(hidden, attention_mask, name, normalize=normalize)
