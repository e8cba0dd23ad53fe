"""The subspace iteration's kernels of the spectral estimate: the block product and Cholesky QR.

``times_block(G, Q)``: G @ Q for a float32 Gram matrix and a float64 block, float32-accurate, float64 out.
``cholqr(Y)``: an orthonormal basis of each block's columns by shifted Cholesky QR in float64.

On CUDA with Triton each is one kernel (the Cholesky QR's two products stay cuBLAS float64 products);
elsewhere torch versions run. ``fused=True`` on CPU tensors under ``TRITON_INTERPRET=1`` runs the kernels
in Triton's interpreter, which is how the tests check them without a GPU. Launch, fallback and the
one-warning rule are shared with ``cheb_step``.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from mcr_exit.metrics.cheb_step import _has_triton, _launch, _run_fused


@lru_cache(maxsize=1)
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def thin(G, Q, Y, n, w, BM: tl.constexpr, BK: tl.constexpr, BW: tl.constexpr):
        pid = tl.program_id(0)
        b = tl.program_id(1)
        rm = pid * BM + tl.arange(0, BM)
        rk = tl.arange(0, BK)
        rw = tl.arange(0, BW)
        acc = tl.zeros((BM, BW), dtype=tl.float32)
        for k in range(0, n, BK):
            kk = k + rk
            g = tl.load(G + b * n * n + rm[:, None] * n + kk[None, :], mask=(rm[:, None] < n) & (kk[None, :] < n),
                        other=0.0)
            q = tl.load(Q + b * n * w + kk[:, None] * w + rw[None, :], mask=(kk[:, None] < n) & (rw[None, :] < w),
                        other=0.0).to(tl.float32)
            acc = tl.dot(g, q, acc, input_precision="tf32x3")
        tl.store(Y + b * n * w + rm[:, None] * w + rw[None, :], acc.to(tl.float64),
                 mask=(rm[:, None] < n) & (rw[None, :] < w))

    @triton.jit
    def cholinv(C, X, w, BW: tl.constexpr):
        b = tl.program_id(0)
        rw = tl.arange(0, BW)
        eye = rw[:, None] == rw[None, :]
        inside = (rw[:, None] < w) & (rw[None, :] < w)
        c = tl.load(C + b * w * w + rw[:, None] * w + rw[None, :], mask=inside, other=0.0)
        c = 0.5 * (c + tl.trans(c))
        shift = tl.maximum(1e-14 * tl.sum(tl.sum(tl.where(eye, c, 0.0), 1), 0), 1e-300)
        c = c + tl.where(eye, shift, 0.0)
        L = tl.zeros((BW, BW), dtype=tl.float64)
        for k in range(BW):  # Cholesky, column by column; a pivot below the shift (rounding) is the shift
            ck = tl.sum(tl.where(rw[None, :] == k, c, 0.0), 1)
            d = tl.sqrt(tl.maximum(tl.sum(tl.where(rw == k, ck, 0.0), 0), shift))
            low = tl.where(rw > k, ck / d, 0.0)
            L = tl.where(rw[None, :] == k, (low + tl.where(rw == k, d, 0.0))[:, None], L)
            c = c - low[:, None] * low[None, :]
        x = tl.zeros((BW, BW), dtype=tl.float64)
        for k in range(BW):  # L^-1, row by row (forward substitution)
            lk = tl.sum(tl.where(rw[:, None] == k, L, 0.0), 0)
            lkk = tl.sum(tl.where(rw == k, lk, 0.0), 0)
            acc = tl.sum(tl.where(rw[:, None] < k, lk[:, None] * x, 0.0), 0)
            x = tl.where(rw[:, None] == k, ((tl.where(rw == k, 1.0, 0.0) - acc) / lkk)[None, :], x)
        bad = tl.sum(tl.sum(tl.where((x == x) & (tl.abs(x) < 1e300), 0.0, 1.0), 1), 0)
        x = tl.where(bad > 0, 0.0, x)  # a failed factorization (non-finite input) loses its block
        tl.store(X + b * w * w + rw[:, None] * w + rw[None, :], x, mask=inside)


    return thin, cholinv


def times_block(G: torch.Tensor, Q: torch.Tensor, *, fused: bool | None = None, block: int = 64,
                warps: int = 4, stages: int = 3) -> torch.Tensor:
    """G @ Q in float64 for a float32 (or float64) G (B, n, n) and a float64 block Q (B, n, w).

    The subspace iteration's product. On GPUs one kernel reads G once and Q as float64, and multiplies
    in three TF32 passes (``input_precision="tf32x3"``: float32 accuracy on tensor cores), where torch
    would convert Q to float32, multiply on CUDA cores and convert the result back. ``fused`` as in
    ``cheb_step`` (auto: float32 G on CUDA with Triton).
    """
    B, n, w = Q.shape
    auto = fused is None
    if auto:
        fused = G.dtype == torch.float32 and G.is_cuda and _has_triton()

    def torch_call():
        if G.dtype == torch.float64:
            return G @ Q
        return (G @ Q.to(G.dtype)).double()

    if not fused:
        return torch_call()

    def fused_call():
        Gc, Qc = G.float().contiguous(), Q.double().contiguous()
        Y = torch.empty(B, n, w, dtype=torch.float64, device=G.device)
        bw = max(16, 1 << (w - 1).bit_length())
        _kernels()[0][((n + block - 1) // block, B)](Gc, Qc, Y, n, w, BM=block, BK=32, BW=bw,
                                                      **_launch(G, warps, stages))
        return Y

    return _run_fused(auto, fused_call, torch_call, "thin")


def _torch_cholqr(Y: torch.Tensor) -> torch.Tensor:
    C = Y.transpose(-1, -2) @ Y
    w = C.shape[-1]
    eye = torch.eye(w, dtype=C.dtype, device=C.device)
    shift = 1e-14 * C.diagonal(dim1=-2, dim2=-1).sum(-1).clamp(min=1e-300)
    L = torch.linalg.cholesky_ex(C + shift[:, None, None] * eye).L
    L_inv = torch.linalg.solve_triangular(L, eye.expand_as(L), upper=False)
    return torch.nan_to_num(Y @ L_inv.transpose(-1, -2), nan=0.0, posinf=0.0, neginf=0.0)  # a failed factorization loses its block


def cholqr(Y: torch.Tensor, *, fused: bool | None = None, warps: int = 4) -> torch.Tensor:
    """Orthonormal columns spanning each Y (B, n, w), float64, by shifted Cholesky QR: C = Y^T Y + shift I
    = L L^T, Q = Y L^-T, with shift = 1e-14 tr C so that dependent columns keep it defined.

    On GPUs the w x w part (shift, Cholesky factor, its inverse) is one kernel with a program per matrix,
    in registers, where torch takes ~8 small launches (the batched factorization, a triangular solve that
    alone is slower than the whole kernel, clean-ups); the two products stay cuBLAS float64 products.
    Where rounding makes a pivot fall below the shift the kernel takes the shift (torch's factorization
    fails there and the block becomes zeros); either way the estimate's final basis comes from an exact
    SVQB. w <= 64. ``fused`` as in ``cheb_step`` (auto: CUDA with Triton).
    """
    B, n, w = Y.shape
    auto = fused is None
    if auto:
        fused = Y.is_cuda and _has_triton() and w <= 64

    def torch_call():
        return _torch_cholqr(Y)

    if not fused:
        return torch_call()

    def fused_call():
        C = (Y.transpose(-1, -2) @ Y).contiguous()
        X = torch.empty_like(C)
        _kernels()[1][(B,)](C, X, w, BW=max(16, 1 << (w - 1).bit_length()), **_launch(Y, warps, 1))
        return Y @ X.transpose(-1, -2)

    return _run_fused(auto, fused_call, torch_call, "cholinv")
