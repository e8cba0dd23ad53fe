"""Pooling of one hidden state into one vector per sequence (pure functions on tensors)."""

from __future__ import annotations

import torch

POOLINGS = ("mean", "last")


def pool_hidden(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str = "mean",
                *, skip_first: bool = True, normalize: bool = True) -> torch.Tensor:
    """(B, T, d) right-padded hidden states -> (B, d) float32 vectors.

    mean: average over real tokens; with ``skip_first`` position 0 is left out, because the massive
    activation sits there in the middle layers and would dominate the mean (rows of one token keep it).
    last: the hidden state at each row's last real token.
    normalize: divide each vector by its L2 norm.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}: use {', '.join(POOLINGS)}")
    h = hidden.float()
    mask = attention_mask.to(h.device).float()  # (B, T)
    lengths = mask.sum(dim=1).long()  # (B,)
    if pooling == "last":
        out = h[torch.arange(h.shape[0], device=h.device), lengths - 1]
    else:
        if skip_first:
            drop = (lengths > 1).float()
            mask = mask.clone()
            mask[:, 0] = mask[:, 0] * (1.0 - drop)
        out = (h * mask.unsqueeze(-1)).sum(dim=1) / mask.sum(dim=1, keepdim=True).clamp_min(1.0)
    if normalize:
        out = torch.nn.functional.normalize(out, p=2.0, dim=-1)
    return out
