"""Attention statistics per head, reduced from row-stochastic causal attention matrices A.

Definitions (paper Sec. 2, Sec. 4.1, App. B.2), with T the number of real tokens of a prompt:

* sink score of a head: (1/T) sum_{t=0}^{T-1} A[t, 0]  (BOS = position 0, the first real token);
* sink rate of a layer: share of heads whose sink score is >= tau;
* mixing score of a head: mean over rows t >= 1 of H(A[t, :]) / log(t + 1) (row entropy in nats,
  normalized by the entropy of the uniform row; row 0 has a single key and is left out);
* ColSum concentration: C = 1 - H(c) / log T with c_j = (1/T) sum_t A[t, j]; ColSum rate: share of
  heads with C >= tau;
* diagonal score D = (1/T) sum_{t=1}^{T-1} A[t, t]; sink-versus-identity index SVI = B / (B + D), B the
  sink score. D leaves out row 0, whose diagonal is the BOS column already counted in B, so that
  B + D lies in [0, 1] as the paper states (a convention the paper leaves implicit).

The accumulator takes the matrix in chunks of query rows, so a caller never needs all T x T at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, kw_only=True)
class AttentionStats:
    """Per-head statistics, each (B, H)."""

    sink_score: torch.Tensor
    mixing_score: torch.Tensor
    colsum_concentration: torch.Tensor
    diag_score: torch.Tensor

    @property
    def b_plus_d(self) -> torch.Tensor:
        return self.sink_score + self.diag_score

    @property
    def svi(self) -> torch.Tensor:
        return self.sink_score / self.b_plus_d.clamp(min=1e-30)


class HeadStatsAccumulator:
    """Accumulates per-head attention statistics over chunks of query rows.

    Args:
        lengths: (B,) real tokens per row (right padding: rows/keys >= length are padding).
        n_heads: number of (query) heads H.
        n_keys: key length T.
    """

    def __init__(self, lengths: torch.Tensor, n_heads: int, n_keys: int, *, device=None,
                 dtype: torch.dtype = torch.float32):
        device = device if device is not None else lengths.device
        self.lengths = lengths.to(device)
        self.dtype = dtype
        B = lengths.shape[0]
        f32 = dtype
        self.sink = torch.zeros(B, n_heads, device=device, dtype=f32)
        self.diag = torch.zeros(B, n_heads, device=device, dtype=f32)
        self.mix = torch.zeros(B, n_heads, device=device, dtype=f32)
        self.colsum = torch.zeros(B, n_heads, n_keys, device=device, dtype=f32)

    def add(self, probs: torch.Tensor, q_start: int) -> None:
        """Add rows ``q_start .. q_start + probs.shape[2] - 1`` of A, given as probs (B, H, Tq, T)."""
        B, H, Tq, Tk = probs.shape
        probs = probs.to(self.dtype)
        q_pos = torch.arange(q_start, q_start + Tq, device=probs.device)
        k_pos = torch.arange(Tk, device=probs.device)
        row_ok = q_pos[None, :] < self.lengths[:, None]  # (B, Tq)
        key_ok = k_pos[None, :] < self.lengths[:, None]  # (B, Tk)
        # Zero padded keys and padded query rows: padding never enters a statistic.
        A = probs * (row_ok[:, None, :, None] & key_ok[:, None, None, :])
        self.sink += A[..., 0].sum(-1)
        self.colsum += A.sum(2)
        not_first = (q_pos >= 1)[None, :] & row_ok  # (B, Tq)
        if Tq > 0:
            diag_idx = q_pos.clamp(max=Tk - 1)
            diag = A.gather(-1, diag_idx.view(1, 1, Tq, 1).expand(B, H, Tq, 1)).squeeze(-1)
            self.diag += (diag * not_first[:, None, :]).sum(-1)
            row_h = -torch.xlogy(A, A).sum(-1)  # (B, H, Tq)
            norm = torch.log(q_pos.to(self.dtype) + 1.0).clamp(min=1e-30)
            self.mix += (row_h / norm * not_first[:, None, :]).sum(-1)

    def result(self) -> AttentionStats:
        n = self.lengths.to(self.dtype)[:, None]  # (B, 1)
        c = self.colsum / n[..., None]
        h_col = -torch.xlogy(c, c).sum(-1)
        log_n = torch.log(n)
        nan = torch.full_like(h_col, float("nan"))
        colsum_conc = torch.where(log_n > 0, 1.0 - h_col / log_n.clamp(min=1e-30), nan)
        mixing = torch.where(n > 1, self.mix / (n - 1).clamp(min=1), nan)
        return AttentionStats(
            sink_score=self.sink / n,
            mixing_score=mixing,
            colsum_concentration=colsum_conc,
            diag_score=self.diag / n,
        )


def attention_head_stats(probs: torch.Tensor, lengths: torch.Tensor | None = None) -> AttentionStats:
    """Per-head statistics from full attention probabilities (B, H, T, T) (reference path)."""
    if probs.dim() == 3:
        probs = probs.unsqueeze(0)
    B, H, T, _ = probs.shape
    if lengths is None:
        lengths = torch.full((B,), T, dtype=torch.long, device=probs.device)
    dtype = torch.float64 if probs.dtype == torch.float64 else torch.float32
    acc = HeadStatsAccumulator(lengths, H, probs.shape[-1], device=probs.device, dtype=dtype)
    acc.add(probs, 0)
    return acc.result()


def summarize_heads(stats: AttentionStats, tau: float) -> dict[str, torch.Tensor]:
    """Per-layer summaries over heads, each (B,): sink rate at tau, means of the head scores."""
    return {
        "sink_rate": (stats.sink_score >= tau).float().mean(-1),
        "sink_score": stats.sink_score.mean(-1),
        "mixing_score": stats.mixing_score.mean(-1),
        "colsum_concentration": stats.colsum_concentration.mean(-1),
        "colsum_rate": (stats.colsum_concentration >= tau).float().mean(-1),
        "diag_score": stats.diag_score.mean(-1),
        "svi": stats.svi.mean(-1),
        "b_plus_d": stats.b_plus_d.mean(-1),
    }
