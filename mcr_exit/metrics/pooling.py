"""Pooling of one hidden state into one vector per sequence: the single definition used by probes,
MTEB, lm-eval features and the server alike."""

from __future__ import annotations

import torch

from mcr_exit.errors import ConfigError
from mcr_exit.metrics.massive import MASSIVE_RATIO, massive_mask, token_norm_ratios
from mcr_exit.vocabulary import DEFAULT_POOLING, POOLING_ALIASES, POOLINGS  # noqa: F401  (defined there, once)


def canonical_pooling(pooling: str) -> str:
    """The registered name of a pooling (aliases resolved); ConfigError for an unknown one."""
    name = POOLING_ALIASES.get(pooling, pooling)
    if name not in POOLINGS:
        raise ConfigError(f"unknown pooling '{pooling}': use {', '.join(POOLINGS)}")
    return name


def pool_hidden(
    hidden: torch.Tensor, mask: torch.Tensor, pooling: str = DEFAULT_POOLING, *, normalize: bool = False,
    massive_ratio: float = MASSIVE_RATIO,
) -> torch.Tensor:
    """(B, T, d) right-padded hidden states, (B, T) 0/1 mask -> (B, d) float32 vectors.

    mean_no_first: mean over positions 1..n-1 (position 0 carries the massive activation in the middle
    layers and would dominate the mean); a one-token row keeps position 0.
    mean_no_massive: mean over the real tokens that are not massive activations of this hidden state:
    a token is left out when its norm is at least ``massive_ratio`` times the row's (lower) median token
    norm (metrics/massive.py), wherever it sits; the median token itself always stays, so no row is empty.
    last: the last real token. mean: all real tokens, position 0 included.
    normalize: divide each vector by its L2 norm.
    """
    pooling = canonical_pooling(pooling)
    h = hidden.float()
    m = mask.to(h.device, h.dtype)
    if pooling == "last":
        out = h[torch.arange(h.shape[0], device=h.device), mask.long().sum(1).to(h.device) - 1]
    else:
        if pooling == "mean_no_first":
            m = m.clone()
            m[m.sum(1) > 1, 0] = 0.0
        elif pooling == "mean_no_massive":
            ratios = token_norm_ratios(h, mask.long().sum(1).to(h.device))
            m = m * (~massive_mask(ratios, massive_ratio)).to(m.dtype)
        out = (h * m.unsqueeze(-1)).sum(1) / m.sum(1, keepdim=True).clamp_min(1.0)
    return torch.nn.functional.normalize(out, p=2.0, dim=-1) if normalize else out
