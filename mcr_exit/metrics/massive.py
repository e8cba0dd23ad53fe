"""Massive activations wherever they sit: the tokens with the largest norms, and which tokens they are.

Pure functions (no model, no I/O). A token's *ratio* is its L2 norm over the median L2 norm of its
row's real tokens; the median is the lower median (``torch.median``: for an even count, the smaller of
the two middle values), so that in a two-token row a spike still stands out against the other token.
A token is a *massive activation* at a layer when its ratio is at least ``MASSIVE_RATIO``.

The massive-activations literature (Sun et al., 2024) tabulates where the spike sits: on the starting
token, on the first delimiter (".", "\\n", ","), or elsewhere; ``token_category`` makes that call from
the token's text.
"""

from __future__ import annotations

import unicodedata

import torch

# A token whose norm is at least this many times its row's median token norm is a massive activation.
# The same level marks a massive activation at position 0 in the phase detection (position-0 norm over
# the mean of the other tokens' norms), and the BOS decision reads it too.
MASSIVE_RATIO = 10.0
TOP_TOKENS = 3  # tokens per (prompt, layer) kept in the spike table
CATEGORIES = ("position0", "delimiter", "other")
# Per prompt and hidden index, reduced during the forward pass (registered as hidden metrics).
TOP_TOKEN_STATISTICS = ("max_norm_ratio", "max_at_position0", "max_at_delimiter")


def token_norm_ratios(hidden: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(B, T, d) right-padded hidden states, (B,) real lengths -> (B, T) norm / row median norm, float32;
    padding positions get 0 (never a top token)."""
    norms = hidden.float().norm(dim=-1)  # (B, T)
    T = norms.shape[1]
    valid = torch.arange(T, device=norms.device)[None, :] < lengths.to(norms.device)[:, None]
    # lower median over the real tokens: sort with padding pushed to the end, take index (n - 1) // 2
    keyed = torch.where(valid, norms, torch.full_like(norms, float("inf")))
    ordered = keyed.sort(dim=1).values
    mid = ((lengths.to(norms.device) - 1) // 2).clamp(min=0)
    median = ordered.gather(1, mid[:, None]).clamp_min(1e-12)  # (B, 1)
    return torch.where(valid, norms / median, torch.zeros_like(norms))


def top_tokens(ratios: torch.Tensor, k: int = TOP_TOKENS) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ratios -> positions (B, k) and ratios (B, k) of the k largest, largest first. Rows shorter
    than k repeat padding positions with ratio 0."""
    k = min(k, ratios.shape[1])
    vals, pos = ratios.topk(k, dim=1)
    return pos, vals


def massive_mask(ratios: torch.Tensor, threshold: float = MASSIVE_RATIO) -> torch.Tensor:
    """(B, T) ratios -> (B, T) bool: the tokens that are massive activations."""
    return ratios >= threshold


def is_delimiter(text: str) -> bool:
    """Whether a token's text (decoded, or a byte-level BPE piece such as "Ġ." or "Ċ") is a delimiter:
    nothing but whitespace, newlines and punctuation."""
    t = text.replace("Ġ", " ").replace("Ċ", "\n").replace("▁", " ").strip()
    if not t:
        return bool(text)  # whitespace or newline only
    return all(unicodedata.category(ch).startswith("P") for ch in t)


def token_category(position: int, text: str) -> str:
    """"position0", "delimiter" or "other": where a top-norm token sits (position 0 wins)."""
    if position == 0:
        return "position0"
    return "delimiter" if is_delimiter(text) else "other"
