"""Streamed attention statistics: a custom attention function registered with transformers.

While a ``collect_attention_stats`` context is active, every attention call of the model computes its
output in chunks of query rows, reduces each chunk's probabilities to per-head statistics
(``HeadStatsAccumulator``) and drops it. No layer's T x T maps outlive its own attention call, and
at most one chunk of one layer exists at any time. Outside the context, calls go to SDPA.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from mcr_exit.metrics.attention import AttentionStats, HeadStatsAccumulator
from mcr_exit.models import fused_attention_kernels as fak
from mcr_exit.models.adapters import ArchitectureAdapter
from mcr_exit.models.fused_attention import augmented_size, fused_attention_stats

IMPLEMENTATION = "mcr_stats"
# Bytes of float32 scores per chunk of query rows; bounds the transient memory of one attention call.
CHUNK_BYTES = 256 * 2**20

AttentionCallback = Callable[[int, AttentionStats], None]
MapCallback = Callable[[int, torch.Tensor], None]


METHODS = ("auto", "chunked", "fused")


@dataclass
class _Collector:
    index: dict[int, int]
    lengths: torch.Tensor
    on_stats: AttentionCallback
    capture: dict[int, list[int]] = field(default_factory=dict)  # block -> heads whose maps are kept
    on_map: MapCallback | None = None
    method: str = "auto"


def fused_fits(head_dim: int, kernels: bool = False) -> bool:
    """Whether the fused path's calls all run as fused GPU kernels (attention calls take head sizes up to
    256). With the Triton sweep (``kernels``) that is the model's own call; without it the torch path's
    column-sum call has head size head_dim + 2 (rounded up to a multiple of 8), so heads of 256 (Gemma)
    would fall to the matmul reference, which holds T x T scores for all heads at once."""
    return head_dim <= 256 if kernels else augmented_size(head_dim) <= 256


def _use_fused(collector: _Collector, block: int, query, key, softcap, kwargs) -> bool:
    """The fused path needs plain causal attention; maps for plots need the chunked path."""
    if collector.method == "chunked" or block in collector.capture:
        return False
    plain = softcap is None and kwargs.get("sliding_window") is None and query.shape[2] == key.shape[2]
    if collector.method == "fused":
        if not plain:
            raise ValueError("fused attention statistics need plain causal attention (no window, no softcap)")
        return True
    return (plain and query.is_cuda and query.dtype in (torch.bfloat16, torch.float16)
            and fused_fits(query.shape[-1], fak.usable(query)))


_ACTIVE: contextvars.ContextVar[_Collector | None] = contextvars.ContextVar("mcr_exit_collector", default=None)


def _bool_mask(*args, **kwargs):
    # Always materialize the boolean mask: the statistics need it even when SDPA could skip it.
    kwargs["allow_is_causal_skip"] = False
    kwargs.pop("allow_is_bidirectional_skip", None)
    return sdpa_mask(*args, allow_is_bidirectional_skip=False, **kwargs)


def _masked_scores(scores: torch.Tensor, mask: torch.Tensor | None, q0: int, q1: int) -> torch.Tensor:
    Tk = scores.shape[-1]
    if mask is None:
        q = torch.arange(q0, q1, device=scores.device)[:, None]
        k = torch.arange(Tk, device=scores.device)[None, :]
        return scores.masked_fill(k > q, float("-inf"))
    m = mask[:, :, q0:q1, :Tk]
    if m.dtype == torch.bool:
        return scores.masked_fill(~m, float("-inf"))
    return scores + m.float()


def stats_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    **kwargs,
):
    """Attention with per-head statistics. query (B, H, T, dh), key/value (B, Hkv, T, dh).

    Returns (output (B, T, H, dv), None), like transformers' eager attention.
    """
    collector = _ACTIVE.get()
    block = None if collector is None else collector.index.get(id(module))
    if block is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if kwargs.get("s_aux") is not None or kwargs.get("sinks") is not None:
        raise NotImplementedError("attention with learned sink logits (gpt-oss) is not supported yet")
    B, H, T, dh = query.shape
    Tk = key.shape[2]
    scale = dh**-0.5 if scaling is None else scaling
    if _use_fused(collector, block, query, key, softcap, kwargs):  # grouped key/value heads read in place
        out, stats = fused_attention_stats(query, key, value, scale, collector.lengths)
        collector.on_stats(block, stats)
        return out.transpose(1, 2).contiguous(), None
    groups = H // key.shape[1]
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    out = torch.empty(B, H, T, value.shape[-1], dtype=value.dtype, device=value.device)
    acc = HeadStatsAccumulator(collector.lengths, H, Tk, device=query.device)
    rows = max(1, min(T, CHUNK_BYTES // max(1, B * H * Tk * 4)))
    keep_heads = collector.capture.get(block)
    kept = [] if keep_heads else None
    key_t = key.transpose(-1, -2)
    for q0 in range(0, T, rows):
        q1 = min(T, q0 + rows)
        scores = torch.matmul(query[:, :, q0:q1], key_t).float() * scale
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        probs = torch.softmax(_masked_scores(scores, attention_mask, q0, q1), dim=-1)
        probs = torch.nan_to_num(probs, nan=0.0)  # fully masked (padding) rows
        acc.add(probs, q0)
        if kept is not None:
            kept.append(probs[:, keep_heads].detach().cpu())
        out[:, :, q0:q1] = torch.matmul(probs.to(value.dtype), value)
    collector.on_stats(block, acc.result())
    if kept is not None and collector.on_map is not None:
        collector.on_map(block, torch.cat(kept, dim=2))
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(IMPLEMENTATION, stats_attention_forward)
AttentionMaskInterface.register(IMPLEMENTATION, _bool_mask)


@contextmanager
def collect_attention_stats(
    adapter: ArchitectureAdapter,
    lengths: torch.Tensor,
    on_stats: AttentionCallback,
    *,
    capture: dict[int, list[int]] | None = None,
    on_map: MapCallback | None = None,
    method: str = "auto",
) -> Iterator[None]:
    """Within this context, each attention block j reports ``on_stats(j, AttentionStats)``.

    ``capture`` maps block index -> heads whose full maps are passed to ``on_map(j, maps (B, h, T, T))``
    (for plots of a few representative heads only). ``method``: "chunked" (exact softmax in chunks of
    query rows, any mask), "fused" (no T x T at all: ``fused_attention``; plain causal layers only), or
    "auto" (fused on CUDA in half precision where the layer allows it, chunked elsewhere).
    """
    if method not in METHODS:
        raise ValueError(f"unknown attention statistics method '{method}': use {', '.join(METHODS)}")
    model = adapter.model
    previous = model.config._attn_implementation
    if previous != IMPLEMENTATION:
        model.set_attn_implementation(IMPLEMENTATION)
    token = _ACTIVE.set(_Collector(adapter.attention_index(), lengths, on_stats, capture or {}, on_map, method))
    try:
        yield
    finally:
        _ACTIVE.reset(token)
        if previous != IMPLEMENTATION:
            model.set_attn_implementation(previous)
