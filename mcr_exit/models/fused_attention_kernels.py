"""Triton kernels of the fused attention statistics (``fused_attention``): one sweep over the scores.

Given the attention's own log-sum-exp lse_t (returned by the model's fused attention call), every
statistic is a sum over the causal scores s_tj = scale q_t . k_j of something of
A_tj = exp(s_tj - lse_t):

* column sums c_j = sum_t A_tj (the sink score is c_0 / n);
* row entropies H_t = -sum_j A_tj log A_tj, each term >= 0 (no cancellation in float32), weighted by
  1 / log(t + 1) and summed over rows t >= 1 for the mixing score;
* the diagonal A_tt, summed over rows t >= 1.

``score_sweep`` has one program per (batch row, head, block of BN keys). It holds its keys and sweeps
the query blocks t >= j in float32, like a flash-attention kernel with keys and queries swapped and
no second product: per tile one tensor-core product K Q^T, one exp2 per score, and the column sums as
row reductions in registers. The mixing and diagonal sums are per-program partials (no atomics: the
result does not depend on scheduling, and a batch gives the same numbers as its rows alone, to float32
rounding). No T x T array exists; the tiles live in registers. ``finish`` (one program per batch row and
head) adds the partials, takes the column-sum entropy and writes the four scores.

The torch version in ``fused_attention`` stays the reference: tests run these kernels in Triton's
interpreter on the CPU (``TRITON_INTERPRET=1``) and compare; on GPUs they are compiled.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from functools import lru_cache

import torch

# keys per program, queries per tile, warps, pipeline stages, by head size (a power of 2): the fastest of
# 36 settings on an H100 (Llama-3-8B's heads, batch 4, T = 1024: 107 us per layer, where (128, 64, 8, 3)
# took 157); SMALL where a GPU has too little shared memory for them
CONFIGS = {64: (128, 64, 4, 3), 128: (128, 32, 4, 4), 256: (64, 64, 8, 3)}
SMALL = (64, 32, 4, 1)

_SHRUNK: dict[int, tuple] = {}  # head size -> SMALL, where the tuned tiles did not fit
_FAILED: list[Exception] = []  # set once the kernels have failed to build or run here


def give_up(exc: Exception) -> None:
    """Fall back to torch operations for the rest of the process, saying why once."""
    _FAILED.append(exc)
    warnings.warn(f"the attention-statistics Triton kernels failed ({type(exc).__name__}: {exc}); "
                  "using torch operations", stacklevel=3)


def usable(q: torch.Tensor) -> bool:
    if not q.is_cuda or _FAILED:
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


@lru_cache(maxsize=1)
def _kernels():
    import triton
    import triton.language as tl

    # The lengths (T, NB) and the LSE strides that follow T are not specialized on (Triton would compile
    # a kernel per divisibility of T by 16 and for NB == 1): one compiled kernel per head size and dtype
    # serves every batch, so it can be compiled ahead of a run (``mcr_exit.prepare``). They only bound masks
    # and address the small LSE and column-sum rows; the Q and K tiles keep their aligned strides.
    @triton.jit(do_not_specialize=("slb", "slh", "T", "NB"))
    def score_sweep(Q, K, LSE, LEN, COL, PART,
                    sqb, sqh, sqt, skb, skh, skt, slb, slh,
                    H, G, T, NB, D, qk_scale,
                    BN: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, IEEE: tl.constexpr):
        bh = tl.program_id(0)
        jb = tl.program_id(1)
        b = bh // H
        h = bh % H
        hk = h // G
        n = tl.load(LEN + b)
        j = jb * BN + tl.arange(0, BN)
        dd = tl.arange(0, BD)
        col = tl.zeros((BN,), tl.float32)
        mix = tl.zeros((BN,), tl.float32)  # per key: sum over rows t of A log2 A / log(t + 1)
        diag = tl.zeros((BN,), tl.float32)
        j0 = jb * BN
        if j0 < n:
            kb = tl.load(K + b * skb + hk * skh + j[:, None] * skt + dd[None, :],
                         mask=(j[:, None] < n) & (dd[None, :] < D), other=0.0)
            q_base = Q + b * sqb + h * sqh
            l_base = LSE + b * slb + h * slh
            # tiles that cross the diagonal: causal mask, and the diagonal itself
            for m0 in range(j0, tl.minimum(j0 + BN, n), BM):
                t = m0 + tl.arange(0, BM)
                tin = t < n
                qb = tl.load(q_base + t[:, None] * sqt + dd[None, :], mask=tin[:, None] & (dd[None, :] < D), other=0.0)
                lse = tl.load(l_base + t, mask=tin, other=0.0) * 1.4426950408889634
                if IEEE:
                    s = tl.dot(kb, tl.trans(qb), input_precision="ieee")
                else:
                    s = tl.dot(kb, tl.trans(qb))
                ok = (t[None, :] >= j[:, None]) & tin[None, :]
                z = tl.where(ok, s * qk_scale - lse[None, :], -1e30)  # A = 0, and A log A = 0 (not nan)
                p = tl.exp2(z)
                col += tl.sum(p, 1)
                w = tl.where(tin & (t >= 1), 1.0 / tl.log(tl.maximum(t, 1).to(tl.float32) + 1.0), 0.0)
                mix += tl.sum((p * z) * w[None, :], 1)
                diag += tl.sum(tl.where((t[None, :] == j[:, None]) & (t[None, :] >= 1), p, 0.0), 1)
            # tiles below the diagonal: rows past the length read q = 0 and lse = +big, so A = 0 there
            for m0 in range(j0 + BN, n, BM):
                t = m0 + tl.arange(0, BM)
                tin = t < n
                qb = tl.load(q_base + t[:, None] * sqt + dd[None, :], mask=tin[:, None] & (dd[None, :] < D), other=0.0)
                lse = tl.load(l_base + t, mask=tin, other=1e30) * 1.4426950408889634
                if IEEE:
                    s = tl.dot(kb, tl.trans(qb), input_precision="ieee")
                else:
                    s = tl.dot(kb, tl.trans(qb))
                z = s * qk_scale - lse[None, :]
                p = tl.exp2(z)
                col += tl.sum(p, 1)
                w = tl.where(tin, 1.0 / tl.log(t.to(tl.float32) + 1.0), 0.0)
                mix += tl.sum((p * z) * w[None, :], 1)
        tl.store(COL + bh * T + j, col, mask=j < T)
        part = PART + (bh * NB + jb) * 2
        tl.store(part, -0.6931471805599453 * tl.sum(mix, 0))
        tl.store(part + 1, tl.sum(diag, 0))

    @triton.jit(do_not_specialize=("T", "NB"))
    def finish(PART, COL, LEN, OUT, T, NB, H, BT: tl.constexpr):
        bh = tl.program_id(0)
        b = bh // H
        n = tl.load(LEN + b).to(tl.float32)
        mix = 0.0
        diag = 0.0
        for i0 in range(0, NB, BT):
            i = i0 + tl.arange(0, BT)
            p = PART + (bh * NB + i) * 2
            ok = i < NB
            mix += tl.sum(tl.load(p, mask=ok, other=0.0), 0)
            diag += tl.sum(tl.load(p + 1, mask=ok, other=0.0), 0)
        h_col = 0.0
        for t0 in range(0, T, BT):
            t = t0 + tl.arange(0, BT)
            ok = (t < T) & (t.to(tl.float32) < n)
            c = tl.load(COL + bh * T + t, mask=ok, other=0.0) / n
            h_col += tl.sum(tl.where(ok & (c > 0), -c * tl.log(tl.where(c > 0, c, 1.0)), 0.0), 0)
        log_n = tl.log(n)
        nan = float("nan")
        tl.store(OUT + bh * 4, tl.load(COL + bh * T) / n)
        tl.store(OUT + bh * 4 + 1, tl.where(n > 1, mix / tl.maximum(n - 1, 1.0), nan))
        tl.store(OUT + bh * 4 + 2, tl.where(log_n > 0, 1.0 - h_col / tl.maximum(log_n, 1e-30), nan))
        tl.store(OUT + bh * 4 + 3, diag / n)

    return score_sweep, finish


def _launch(t: torch.Tensor, **kw):
    return kw if t.is_cuda else {}  # launch settings mean nothing to the interpreter


def attention_scores(q, k, lse, lengths, scale, config: tuple | None = None) -> torch.Tensor:
    """-> (B, H, 4) float32: sink score, mixing score, ColSum concentration, diagonal score.

    q: (B, H, T, d); k: (B, Hkv, T, d), H a multiple of Hkv (grouped heads read in place); lse (B, H, T)
    float32, natural log, of the causal attention s = scale q . k; lengths (B,) real tokens per row.
    ``config``: (keys per program, queries per tile, warps, stages), else by head size."""
    # Triton launches on the current CUDA device: make it the tensors' one (a model spread over several
    # GPUs runs its later layers on another device than the main thread's current one)
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        return _scores(q, k, lse, lengths, scale, config)


def _scores(q, k, lse, lengths, scale, config):
    B, H, T, d = q.shape
    G = H // k.shape[1]
    for x in (q, k):
        assert x.stride(-1) == 1, "the last dimension must be contiguous"
    BD = max(16, _pow2(d))
    config = config or _SHRUNK.get(BD) or CONFIGS.get(max(BD, 64), CONFIGS[256])
    BN, BM, warps, stages = config
    if not q.is_cuda:  # the interpreter: small tiles, few empty rows
        BN, BM = min(BN, max(16, _pow2(T))), min(BM, max(16, _pow2(T)))
    NB = (T + BN - 1) // BN
    col = torch.empty(B * H, T, dtype=torch.float32, device=q.device)
    part = torch.empty(B * H, NB, 2, dtype=torch.float32, device=q.device)
    lens = lengths.to(device=q.device, dtype=torch.int32)
    lse = lse.float()
    sweep, fin = _kernels()
    try:
        sweep[(B * H, NB)](
            q, k, lse, lens, col, part,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), lse.stride(0),
            lse.stride(1), H, G, T, NB, d, float(scale) * math.log2(math.e),
            BN=BN, BM=BM, BD=BD, IEEE=q.dtype == torch.float32, **_launch(q, num_warps=warps, num_stages=stages),
        )
    except Exception as exc:  # a GPU with less shared memory than the tuned tiles need: smaller ones, once
        if type(exc).__name__ != "OutOfResources" or config == SMALL:
            raise
        _SHRUNK[BD] = SMALL
        return _scores(q, k, lse, lengths, scale, None)
    out = torch.empty(B, H, 4, dtype=torch.float32, device=q.device)
    fin[(B * H,)](part, col, lens, out, T, NB, H, BT=128, **_launch(q, num_warps=4))
    return out
