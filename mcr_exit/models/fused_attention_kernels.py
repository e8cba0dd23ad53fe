"""Triton kernels for the per-row work of the fused attention statistics (``fused_attention``).

Between its flash-attention calls, ``fused_attention_stats`` needs, for every query row, three dot
products, a few exponentials and logarithms, masked sums over rows, and the feature-augmented query and
key matrices of the column-sum call; afterwards, the column-sum entropy and the final ratios. In torch
that is ~70 small operations per layer, and the analysis becomes bound by launching them. Here it is
two kernels:

* ``row_stats``: one program per (batch row, head, block of positions) computes q.k_0, q.k_t and q.c_t
  in float32, the per-row sink, diagonal and mixing terms and their partial sums, and writes q_aug and
  k_aug (grouped key heads read in place).
* ``finish``: one program per (batch row, head) sums the partials and the column-sum entropy and writes
  sink score, mixing score, ColSum concentration and diagonal score.

The torch version in ``fused_attention`` stays the reference: tests run these kernels in Triton's
interpreter on the CPU (``TRITON_INTERPRET=1``) and compare; on GPUs they are compiled.
"""

from __future__ import annotations

import warnings
from functools import lru_cache

import torch

ROWS = 32  # positions per program of ``row_stats``


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

    @triton.jit
    def row_stats(Q, K, C, LSE, LEN, QA, KA, PART,
                  sqb, sqh, sqt, skb, skh, skt, scb, sch, sct, slb, slh,
                  H, G, T, D, DP, scale,
                  BT: tl.constexpr, BD: tl.constexpr, BP: tl.constexpr, REV: tl.constexpr):
        bh = tl.program_id(0)
        tb = tl.program_id(1)
        b = bh // H
        h = bh % H
        hk = h // G
        t = tb * BT + tl.arange(0, BT)
        dd = tl.arange(0, BD)
        tin = t < T
        m2 = tin[:, None] & (dd[None, :] < D)
        q_row = Q + b * sqb + h * sqh + t[:, None] * sqt
        k_row = K + b * skb + hk * skh + t[:, None] * skt
        q = tl.load(q_row + dd[None, :], mask=m2, other=0.0).to(tl.float32)
        k = tl.load(k_row + dd[None, :], mask=m2, other=0.0).to(tl.float32)
        c = tl.load(C + b * scb + h * sch + t[:, None] * sct + dd[None, :], mask=m2, other=0.0).to(tl.float32)
        k0 = tl.load(K + b * skb + hk * skh + dd, mask=dd < D, other=0.0).to(tl.float32)
        d0 = tl.sum(q * k0[None, :], 1) * scale
        dt = tl.sum(q * k, 1) * scale
        dc = tl.sum(q * c, 1) * scale
        lse = tl.load(LSE + b * slb + h * slh + t, mask=tin, other=0.0)
        n = tl.load(LEN + b)
        valid = tin & (t < n)
        later = valid & (t >= 1)
        log_a0 = d0 - lse
        a0 = tl.exp(log_a0)
        a_diag = tl.exp(dt - lse)
        row_h = tl.maximum(-log_a0 - dc, 0.0)
        norm = tl.maximum(tl.log(t.to(tl.float32) + 1.0), 1e-30)
        part = PART + (bh * tl.num_programs(1) + tb) * 3
        tl.store(part, tl.sum(tl.where(valid, a0, 0.0), 0))
        tl.store(part + 1, tl.sum(tl.where(later, row_h / norm, 0.0), 0))
        tl.store(part + 2, tl.sum(tl.where(later, a_diag, 0.0), 0))
        # augmented rows of the column-sum call: q_aug = [q, hi, lo, 0..], k_aug = [k, 1, 1, 0..],
        # with -lse_t / scale split into two half-precision parts (pad rows: lse = 1e4, adding nothing)
        fold = -tl.where(valid, lse, 1e4) / scale
        hi = fold.to(QA.dtype.element_ty)
        lo = (fold - hi.to(tl.float32)).to(QA.dtype.element_ty)
        pp = tl.arange(0, BP)
        mp = tin[:, None] & (pp[None, :] < D)
        qv = tl.load(q_row + pp[None, :], mask=mp, other=0.0).to(QA.dtype.element_ty)
        kv = tl.load(k_row + pp[None, :], mask=mp, other=0.0).to(KA.dtype.element_ty)
        col = pp[None, :] + tl.zeros((BT, BP), dtype=tl.int32)
        qa = tl.where(col == D, hi[:, None], tl.where(col == D + 1, lo[:, None], qv))
        ka = tl.where((col == D) | (col == D + 1), 1.0, kv.to(tl.float32)).to(KA.dtype.element_ty)
        t_out = (T - 1 - t) if REV else t  # REV: rows in reversed order (a causal call then reads j >= t)
        dst = ((b * T + t_out[:, None]) * H + h) * DP + pp[None, :]
        ms = tin[:, None] & (pp[None, :] < DP)
        tl.store(QA + dst, qa, mask=ms)
        tl.store(KA + dst, ka, mask=ms)

    @triton.jit
    def finish(PART, LSEC, LEN, OUT, T, NB, slb, slh, H, BT: tl.constexpr, REV: tl.constexpr):
        bh = tl.program_id(0)
        b = bh // H
        h = bh % H
        n = tl.load(LEN + b).to(tl.float32)
        sink = 0.0
        mix = 0.0
        diag = 0.0
        for i0 in range(0, NB, BT):
            i = i0 + tl.arange(0, BT)
            p = PART + (bh * NB + i) * 3
            ok = i < NB
            sink += tl.sum(tl.load(p, mask=ok, other=0.0), 0)
            mix += tl.sum(tl.load(p + 1, mask=ok, other=0.0), 0)
            diag += tl.sum(tl.load(p + 2, mask=ok, other=0.0), 0)
        h_col = 0.0
        for t0 in range(0, T, BT):
            t = t0 + tl.arange(0, BT)
            ok = (t < T) & (t.to(tl.float32) < n)
            t_in = (T - 1 - t) if REV else t
            c = tl.exp(tl.load(LSEC + b * slb + h * slh + t_in, mask=ok, other=0.0)) / n
            h_col += tl.sum(tl.where(ok & (c > 0), -c * tl.log(tl.where(c > 0, c, 1.0)), 0.0), 0)
        log_n = tl.log(n)
        nan = float("nan")
        tl.store(OUT + bh * 4, sink / n)
        tl.store(OUT + bh * 4 + 1, tl.where(n > 1, mix / tl.maximum(n - 1, 1.0), nan))
        tl.store(OUT + bh * 4 + 2, tl.where(log_n > 0, 1.0 - h_col / tl.maximum(log_n, 1e-30), nan))
        tl.store(OUT + bh * 4 + 3, diag / n)

    return row_stats, finish


def _launch(t: torch.Tensor, **kw):
    return kw if t.is_cuda else {}  # launch settings mean nothing to the interpreter


def augmented_size(d: int) -> int:
    """Head size of the column-sum call: d + 2 fold columns, padded to a multiple of 8."""
    return d + 2 + (-(d + 2)) % 8


def row_stats(q, k, centred, lse, lengths, scale, reverse: bool = False):
    """-> (partial sums (B*H, blocks, 3), q_aug (B, H, T, DP) view, k_aug (B, H, T, DP) view).

    q, centred: (B, H, T, d); k: (B, Hkv, T, d); lse (B, H, T) float32; lengths (B,). With ``reverse``
    the augmented rows are written in reversed position order."""
    B, H, T, d = q.shape
    G = H // k.shape[1]
    DP = augmented_size(d)
    for x in (q, k, centred):
        assert x.stride(-1) == 1, "the last dimension must be contiguous"
    qa = torch.empty(B, T, H, DP, dtype=q.dtype, device=q.device)
    ka = torch.empty(B, T, H, DP, dtype=k.dtype, device=q.device)
    blocks = (T + ROWS - 1) // ROWS
    part = torch.empty(B * H, blocks, 3, dtype=torch.float32, device=q.device)
    lens = lengths.to(device=q.device, dtype=torch.int32)
    _kernels()[0][(B * H, blocks)](
        q, k, centred, lse, lens, qa, ka, part,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        centred.stride(0), centred.stride(1), centred.stride(2), lse.stride(0), lse.stride(1),
        H, G, T, d, DP, float(scale), BT=ROWS, BD=_pow2(d), BP=_pow2(DP), REV=bool(reverse),
        **_launch(q, num_warps=4),
    )
    return part, qa.transpose(1, 2), ka.transpose(1, 2)


def finish(part, lse_cols, lengths, reverse: bool = False):
    """-> (B, H, 4) float32: sink score, mixing score, ColSum concentration, diagonal score.

    ``reverse``: lse_cols comes from the reversed column-sum call (position t at T - 1 - t)."""
    B, H, T = lse_cols.shape
    out = torch.empty(B, H, 4, dtype=torch.float32, device=part.device)
    lens = lengths.to(device=part.device, dtype=torch.int32)
    _kernels()[1][(B * H,)](part, lse_cols, lens, out, T, part.shape[1], lse_cols.stride(0), lse_cols.stride(1),
                            H, BT=128, REV=bool(reverse), **_launch(part, num_warps=4))
    return out
