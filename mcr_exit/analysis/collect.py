"""Run a model over prompts and reduce every hidden state and attention block to statistics on the fly."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from mcr_exit.metrics.attention import AttentionStats, summarize_heads
from mcr_exit.metrics.spectral import spectral_stats
from mcr_exit.models.attention_stats import collect_attention_stats
from mcr_exit.models.forward import run_blocks
from mcr_exit.models.loading import LoadedModel
from mcr_exit.models.tokens import collate, length_batches, pad_id_of

HEAD_METRICS = ("sink_score", "mixing_score", "colsum_concentration", "diag_score")


@dataclass(kw_only=True)
class LayerStatistics:
    """Per-prompt statistics. ``hidden[m]`` is (N, L+1); ``attention[m]`` is (N, L); ``heads[m]`` is (N, L, H)."""

    n_layers: int
    n_heads: int
    lengths: np.ndarray  # (N,)
    hidden: dict[str, np.ndarray] = field(default_factory=dict)
    final_normed: dict[str, np.ndarray] = field(default_factory=dict)  # (N,) each
    attention: dict[str, np.ndarray] = field(default_factory=dict)
    heads: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def n_prompts(self) -> int:
        return len(self.lengths)


def _store(target: dict[str, np.ndarray], key: str, shape: tuple, rows: list[int], col, values: torch.Tensor):
    if key not in target:
        target[key] = np.full(shape, np.nan, dtype=np.float64 if len(shape) < 3 else np.float32)
    arr = values.detach().double().cpu().numpy()
    if col is None:
        target[key][rows] = arr
    else:
        target[key][rows, col] = arr


def collect_statistics(
    loaded: LoadedModel,
    ids: list[list[int]],
    *,
    tau: float = 0.3,
    max_batch: int = 8,
    max_tokens: int = 8192,
    spectral_dtype: torch.dtype = torch.float64,
    progress: Callable[[int], None] | None = None,
) -> LayerStatistics:
    """Per-prompt statistics of every hidden state (0..L) and every attention block (0..L-1).

    Prompts are grouped by length into right-padded batches; padding never enters a statistic,
    so results do not depend on the batching.
    """
    adapter = loaded.adapter
    L = adapter.n_layers
    N = len(ids)
    n_heads = int(getattr(loaded.model.config, "num_attention_heads", 0) or 0)
    stats = LayerStatistics(n_layers=L, n_heads=n_heads, lengths=np.array([len(x) for x in ids]))
    pad = pad_id_of(loaded.tokenizer)
    device = loaded.input_device
    for batch in length_batches([len(x) for x in ids], max_tokens, max_batch):
        input_ids, mask = collate([ids[i] for i in batch], pad, device)
        lengths = mask.sum(1)

        def on_hidden(i: int, h: torch.Tensor) -> None:
            s = spectral_stats(h, lengths.to(h.device), compute_dtype=spectral_dtype)
            for key, val in s.as_dict().items():
                _store(stats.hidden, key, (N, L + 1), batch, i, val)

        def on_attention(j: int, a: AttentionStats) -> None:
            for key, val in summarize_heads(a, tau).items():
                _store(stats.attention, key, (N, L), batch, j, val)
            H = a.sink_score.shape[1]
            for key in HEAD_METRICS:
                _store(stats.heads, key, (N, L, H), batch, j, getattr(a, key))

        with collect_attention_stats(adapter, lengths, on_attention):
            final = run_blocks(adapter, input_ids, mask, on_hidden)
        if final is not None:
            s = spectral_stats(final, lengths.to(final.device), compute_dtype=spectral_dtype)
            for key in ("entropy", "entropy_norm", "anisotropy", "bos_norm", "other_norm", "norm_ratio"):
                _store(stats.final_normed, key, (N,), batch, None, getattr(s, key))
        if progress is not None:
            progress(len(batch))
    if stats.heads:
        stats.n_heads = next(iter(stats.heads.values())).shape[2]
    return stats


def capture_head_maps(
    loaded: LoadedModel, ids: list[int], heads: dict[int, list[int]]
) -> dict[tuple[int, int], np.ndarray]:
    """Full attention maps (T, T) of a few (block, head) pairs for one prompt (Figure 6 style plots)."""
    maps: dict[tuple[int, int], np.ndarray] = {}
    input_ids, mask = collate([ids], pad_id_of(loaded.tokenizer), loaded.input_device)

    def on_map(j: int, m: torch.Tensor) -> None:
        for k, h in enumerate(heads[j]):
            maps[(j, h)] = m[0, k].float().numpy()

    with collect_attention_stats(loaded.adapter, mask.sum(1), lambda j, a: None, capture=heads, on_map=on_map):
        run_blocks(loaded.adapter, input_ids, mask, lambda i, h: None)
    return maps
