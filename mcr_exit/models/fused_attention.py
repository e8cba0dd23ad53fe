"""Attention statistics without any T x T matrix, from the softmax normalizer (GPU fast path).

The model's attention call returns, besides its output, lse_t = log sum_j exp(s_tj) for the causal
scores s_tj = scale * q_t . k_j; every statistic is a sum of a function of A_tj = exp(s_tj - lse_t).

On GPUs (``fused_attention_kernels``) one Triton sweep recomputes the scores tile by tile, as a flash
attention kernel does, and reduces them on the spot: column sums (the sink score is the first), row
entropies and the diagonal. One extra product q k^T, no second attention call, memory O(B H T).

Where the kernels do not run, the same quantities come from two more attention calls and row-wise
products (the torch path, also the kernels' reference in the tests):

* A[t, 0] = exp(s_t0 - lse_t) and A[t, t] = exp(s_tt - lse_t): one dot product per row;
* H(A[t, :]) = lse_t - sum_j A_tj s_tj = -log A[t, 0] - scale * q_t . sum_j A_tj (k_j - k_0):
  the sum is an attention output with values k_j - k_0 (centred on the BOS key, so that a sink
  row, whose output is near 0, keeps its precision in half-precision kernels);
* column sums sum_t A[t, j] = exp(LSE over t >= j of (s_tj - lse_t)): an anti-causal attention of
  keys over queries (a one-sided window in flash attention), with -lse_t folded into two extra feature
  columns (a high and a low half-precision part, so the fold costs no precision).

Each attention call is fused (on CUDA cuDNN's fused attention where it runs, else flash attention;
grouped-query heads read in place); a plain matmul reference implements the same primitive on the CPU,
so the algebra is tested everywhere and only the kernel call is GPU-specific.
"""

from __future__ import annotations

import torch

from mcr_exit.metrics.attention import AttentionStats
from mcr_exit.models import fused_attention_kernels as fak


def _expand_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, Hkv, T, d) -> (B, heads, T, d): query head h reads key/value head h // (heads / Hkv)."""
    return x if x.shape[1] == heads else x.repeat_interleave(heads // x.shape[1], dim=1)


def _reference_lse_attention(q, k, v, scale: float, reverse: bool):
    T = q.shape[2]
    k, v = _expand_heads(k, q.shape[1]), _expand_heads(v, q.shape[1])
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    allowed = torch.ones(T, k.shape[2], dtype=torch.bool, device=q.device)
    allowed = allowed.triu() if reverse else allowed.tril()
    scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.matmul(torch.exp(scores - lse[..., None]), v.float()).to(v.dtype)
    return out, lse


def _flash_ok(q: torch.Tensor) -> bool:
    return q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and q.shape[-1] <= 256 and q.shape[-1] % 8 == 0


_CUDNN: dict[tuple, bool] = {}  # (head size, kv heads < heads, dtype, device) -> cuDNN attention works there


def _cudnn_call(q, k, v, scale):
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, True, False,
                                                                 scale=scale)[:2]
    return out, lse.reshape(q.shape[:3])


def cudnn_ok(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether cuDNN's fused attention (what SDPA itself picks on Hopper GPUs) runs causal attention with
    log-sum-exp for this head size, head grouping and dtype; tried once on a tiny input, then remembered."""
    if not _flash_ok(q):
        return False
    key = (q.shape[-1], k.shape[1] != q.shape[1], q.dtype, q.device)
    if key not in _CUDNN:
        d, hk = q.shape[-1], max(1, k.shape[1] * 2 // q.shape[1])
        try:
            tq, tk = (torch.ones(1, n, 16, d, dtype=q.dtype, device=q.device).transpose(1, 2) for n in (2, hk))
            _, lse = _cudnn_call(tq, tk, tk, 0.1)
            _CUDNN[key] = bool(torch.isfinite(lse).all())
        except Exception:  # noqa: BLE001 - no cuDNN, or not for this head size: flash attention instead
            _CUDNN[key] = False
    return _CUDNN[key]


def lse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, *, reverse: bool = False):
    """Attention returning (output (B, H, T, dv), logsumexp (B, H, T) float32, natural log).

    q is (B, H, T, d); k and v may have fewer heads (grouped-query attention: H a multiple of theirs).
    Causal (row t reads keys j <= t), or with ``reverse`` anti-causal (row t reads keys j >= t).
    On CUDA this is one fused call on the (B, T, H, d) layout the model already holds (no copy, no head
    expansion): cuDNN's attention where it runs (causal only; about twice as fast as flash attention 2 on
    an H100), else flash attention (the anti-causal mask as a one-sided window); elsewhere a plain
    matmul reference.
    """
    if not _flash_ok(q):
        return _reference_lse_attention(q, k, v, scale, reverse)
    if not reverse and cudnn_ok(q, k):
        return _cudnn_call(q, k, v, scale)
    T, Tk = q.shape[2], k.shape[2]

    def btd(x):  # (B, H, T, d) view -> (B, T, H, d) with a unit last stride, as flash attention wants
        x = x.transpose(1, 2)
        return x if x.stride(-1) == 1 else x.contiguous()

    window = dict(window_size_left=0, window_size_right=-1) if reverse else {}
    out, lse = torch.ops.aten._flash_attention_forward(
        btd(q), btd(k), btd(v), None, None, T, Tk, 0.0, not reverse, False, scale=scale, **window
    )[:2]
    return out.transpose(1, 2), lse[..., :T]


def _row_dots(q: torch.Tensor, others: list[torch.Tensor]) -> torch.Tensor:
    """(B, H, T, len(others)) float32: q_t . x_t for each x in ``others``, products accumulated in float32.

    Each x is (B, Hx, T or 1, d) with H a multiple of Hx (grouped heads share x). On CUDA in half
    precision: one batched product with float32 output (no float32 copies of q); elsewhere in float32.
    """
    B, H, T, d = q.shape
    Hkv = min(x.shape[1] for x in others)
    G = H // Hkv

    def five(x):  # (B, Hx, Tx, d) -> broadcastable (B, Hkv, G or 1, Tx, d)
        return x.unflatten(1, (Hkv, G)) if x.shape[1] == H else x.unsqueeze(2)

    q5 = q.unflatten(1, (Hkv, G))
    if q.is_cuda and q.dtype in (torch.bfloat16, torch.float16):
        try:
            stacked = torch.stack([five(x).expand(B, Hkv, G, T, d) for x in others], dim=-1)
            out = torch.bmm(q5.reshape(B * H * T, 1, d), stacked.reshape(B * H * T, d, len(others)),
                            out_dtype=torch.float32)
            return out.reshape(B, H, T, len(others))
        except (TypeError, RuntimeError):  # a torch without bmm(out_dtype=...)
            pass
    qf = q5.float()
    return torch.stack([(qf * five(x).float()).sum(-1) for x in others], dim=-1).flatten(1, 2)


def _augment(x: torch.Tensor, heads: int, extra: list[torch.Tensor]) -> torch.Tensor:
    """(B, Hx, T, d) -> (B, heads, T, d') with feature columns ``extra`` appended ((B, heads, T) each, or
    scalars), zero-padded to a multiple of 8 (flash attention's head size rule); heads expanded in the
    same single copy. Built in the (B, T, H, d') layout and returned as a (B, H, T, d') view."""
    B, Hx, T, d = x.shape
    G = heads // Hx
    width = d + len(extra)
    cols = [x.transpose(1, 2).unsqueeze(3).expand(B, T, Hx, G, d)]
    for e in extra:
        e = e.transpose(1, 2).reshape(B, T, Hx, G, 1) if torch.is_tensor(e) else torch.full(
            (1, 1, 1, 1, 1), float(e), dtype=x.dtype, device=x.device).expand(B, T, Hx, G, 1)
        cols.append(e.to(x.dtype))
    pad = (-width) % 8
    if pad:
        cols.append(torch.zeros(1, 1, 1, 1, pad, dtype=x.dtype, device=x.device).expand(B, T, Hx, G, pad))
    return torch.cat(cols, dim=-1).reshape(B, T, heads, width + pad).transpose(1, 2)


def augmented_size(d: int) -> int:
    """Head size of the torch path's column-sum call: d + 2 fold columns, padded to a multiple of 8."""
    return d + 2 + (-(d + 2)) % 8


def fused_attention_stats(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, lengths: torch.Tensor,
    *, kernels: bool | None = None,
) -> tuple[torch.Tensor, AttentionStats]:
    """Causal attention output and per-head statistics for a right-padded batch.

    Args:
        q: (B, H, T, d); k, v: (B, Hkv, T, d) with H a multiple of Hkv (grouped-query attention).
        lengths: (B,) real tokens per row.
        kernels: the statistics from one Triton sweep over the scores (``fused_attention_kernels``) after
            the output's own call, instead of two more attention calls and torch operations: None where
            they compile (CUDA with Triton), True to force (tests, interpreter).

    Returns:
        (output (B, H, T, dv) in v's dtype, AttentionStats with (B, H) tensors).
    """
    B, H, T, _ = q.shape
    out, lse = lse_attention(q, k, v, scale)
    if kernels if kernels is not None else fak.usable(q):
        try:
            s = fak.attention_scores(q, k, lse, lengths, scale)
            return out, AttentionStats(sink_score=s[..., 0], mixing_score=s[..., 1],
                                       colsum_concentration=s[..., 2], diag_score=s[..., 3])
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - a GPU or Triton the kernels do not build for
            if kernels:
                raise
            fak.give_up(exc)
    k0 = k[:, :, :1]
    centred, _ = lse_attention(q, k, k - k0, scale)
    # three row-wise dot products q_t . (k_0, k_t, centred_t), accumulated in float32
    dots = _row_dots(q, [k0, k, centred]) * scale  # (B, H, T, 3)
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
    q_aug = _augment(q, H, [hi, lo])
    k_aug = _augment(k, H, [1.0, 1.0])
    _, lse_cols = lse_attention(k_aug, q_aug, q_aug, scale, reverse=True)
    colsum = torch.exp(lse_cols)  # (B, H, T): sum_t A[t, j]

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
