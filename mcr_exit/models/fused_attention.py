"""Attention statistics without any T x T matrix, from the softmax normalizer (GPU fast path).

For causal attention with scores s_tj = scale * q_t . k_j and lse_t = log sum_j exp(s_tj):

* A[t, 0] = exp(s_t0 - lse_t) and A[t, t] = exp(s_tt - lse_t): one dot product per row;
* H(A[t, :]) = lse_t - sum_j A_tj s_tj = -log A[t, 0] - scale * q_t . sum_j A_tj (k_j - k_0):
  the sum is an attention output with values k_j - k_0 (centred on the BOS key, so that a sink
  row, whose output is near 0, keeps its precision in half-precision kernels);
* column sums sum_t A[t, j] = exp(LSE over t >= j of (s_tj - lse_t)): an attention of keys over
  queries, made causal by reversing the sequence, with -lse_t folded into two extra feature columns
  (a high and a low half-precision part, so the fold costs no precision).

Each quantity is one fused attention call (flash attention on CUDA) or a cheap row-wise product;
memory stays O(B H T d). A plain matmul reference implements the same primitive on the CPU, so the
algebra is tested everywhere and only the kernel call is GPU-specific.
"""

from __future__ import annotations

import torch

from mcr_exit.metrics.attention import AttentionStats


def _reference_lse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    T = q.shape[2]
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~causal, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.matmul(torch.exp(scores - lse[..., None]), v.float()).to(v.dtype)
    return out, lse


def lse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    """Causal attention returning (output (B, H, T, dv), logsumexp (B, H, T) float32, natural log)."""
    if q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and q.shape[-1] <= 256:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(
            q.contiguous(), k.contiguous(), v.contiguous(), 0.0, True, False, scale=scale
        )[:2]
        return out, lse[..., : q.shape[2]]
    return _reference_lse_attention(q, k, v, scale)


def _row_dots(q: torch.Tensor, others: list[torch.Tensor]) -> torch.Tensor:
    """(B, H, T, len(others)) float32: q_t . x_t for each x in ``others``, products accumulated in float32.

    On CUDA in half precision: one batched product with float32 output (no float32 copies of q);
    elsewhere in float32.
    """
    if q.is_cuda and q.dtype in (torch.bfloat16, torch.float16):
        try:
            B, H, T, d = q.shape
            stacked = torch.stack(others, dim=-1).reshape(B * H * T, d, len(others))
            out = torch.bmm(q.reshape(B * H * T, 1, d), stacked, out_dtype=torch.float32)
            return out.reshape(B, H, T, len(others))
        except (TypeError, RuntimeError):  # a torch without bmm(out_dtype=...)
            pass
    qf = q.float()
    return torch.stack([(qf * x.float()).sum(-1) for x in others], dim=-1)


def _pad_features(x: torch.Tensor, extra: list[torch.Tensor]) -> torch.Tensor:
    """Append feature columns, then zero-pad to a multiple of 8 (flash attention's head size rule)."""
    cols = [x, *[e.unsqueeze(-1).to(x.dtype) for e in extra]]
    width = x.shape[-1] + len(extra)
    pad = (-width) % 8
    if pad:
        cols.append(x.new_zeros(*x.shape[:-1], pad))
    return torch.cat(cols, dim=-1)


def fused_attention_stats(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, lengths: torch.Tensor
) -> tuple[torch.Tensor, AttentionStats]:
    """Causal attention output and per-head statistics for a right-padded batch.

    Args:
        q, k, v: (B, H, T, d) with key/value heads already expanded to H.
        lengths: (B,) real tokens per row.

    Returns:
        (output (B, H, T, dv) in v's dtype, AttentionStats with (B, H) tensors).
    """
    B, H, T, _ = q.shape
    out, lse = lse_attention(q, k, v, scale)
    k0 = k[:, :, :1]
    centred, _ = lse_attention(q, k, k - k0, scale)
    # three row-wise dot products q_t . (k_0, k_t, centred_t), accumulated in float32
    dots = _row_dots(q, [k0.expand_as(k), k, centred]) * scale  # (B, H, T, 3)
    log_a0 = dots[..., 0] - lse  # (B, H, T)
    a0 = torch.exp(log_a0)
    a_diag = torch.exp(dots[..., 1] - lse)
    row_h = (-log_a0 - dots[..., 2]).clamp(min=0.0)

    pos = torch.arange(T, device=q.device)
    valid = pos[None, :] < lengths[:, None].to(q.device)  # (B, T)
    # Column sums: pad query rows get lse = +1e4 so they add nothing.
    fold = -torch.where(valid[:, None, :], lse, torch.full_like(lse, 1e4)) / scale
    hi = fold.to(q.dtype)
    lo = (fold - hi.float()).to(q.dtype)
    ones = torch.ones_like(lse)
    q_aug = _pad_features(q, [hi, lo])
    k_aug = _pad_features(k, [ones, ones])
    q_rev = q_aug.flip(2)
    _, lse_cols = lse_attention(k_aug.flip(2), q_rev, q_rev, scale)
    colsum = torch.exp(lse_cols.flip(2))  # (B, H, T): sum_t A[t, j]

    n = lengths.to(q.device).float()[:, None]  # (B, 1)
    v3 = valid[:, None, :].float()
    not_first = v3.clone()
    not_first[..., 0] = 0.0
    sink = (a0 * v3).sum(-1) / n
    diag = (a_diag * not_first).sum(-1) / n
    norm = torch.log(pos.float() + 1.0).clamp(min=1e-30)
    mixing = (row_h / norm * not_first).sum(-1) / (n - 1).clamp(min=1)
    c = colsum * v3 / n[..., None]
    h_col = -torch.xlogy(c, c).sum(-1)
    log_n = torch.log(n)
    nan = torch.full_like(h_col, float("nan"))
    stats = AttentionStats(
        sink_score=sink,
        mixing_score=torch.where(n > 1, mixing, nan),
        colsum_concentration=torch.where(log_n > 0, 1.0 - h_col / log_n.clamp(min=1e-30), nan),
        diag_score=diag,
    )
    return out, stats
