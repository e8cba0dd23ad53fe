"""One step of the spectral estimate's matrix recurrences, fused: product, update, norms.

``cheb_step(A, X, P, alpha, beta)`` returns, for each matrix b of a batch,

    Y_b = alpha_b * (A_b @ X_b) + beta * X_b - P_b      (P optional)
    ||Y_b||_F^2  and  <Y_b, X_b>_F                       (of Y as stored)

with half-precision A, X, P, Y and float32 accumulation. The Chebyshev recurrence is
T_j+1 = 4 Bm T_j - 2 T_j - T_j-1 (alpha 4, beta -2) and the squarings are S_k+1 = S_k S_k / ||S_k||^2
(alpha 1/||S_k||^2, beta 0, no P); the norms give the traces the estimate needs.

On CUDA with Triton this is one kernel per step: the update and both norms are computed in the product's
epilogue from the tile the kernel already holds, where separate torch calls would read and write every
n x n matrix four more times (the step is bound by memory traffic, not by the product). Elsewhere a
torch version with the same rounding (one rounding of the float32 result to the storage dtype) runs.
``fused=True`` on CPU tensors under ``TRITON_INTERPRET=1`` runs the kernel in Triton's interpreter,
which is how the tests check it without a GPU.
"""

from __future__ import annotations

import warnings
from functools import lru_cache

import torch


def _round_tf32(x: torch.Tensor) -> torch.Tensor:
    """Round to TensorFloat-32 (10 explicit mantissa bits, nearest-even), kept in float32."""
    i = x.float().contiguous().view(torch.int32)
    i = (i + 0x0FFF + ((i >> 13) & 1)) & ~0x1FFF
    return i.view(torch.float32)


class tf32:
    """Context: TF32 tensor cores on (True) or off (False) for float32 products on GPUs."""

    def __init__(self, on: bool):
        self.on = on

    def __enter__(self):
        self.prev = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = self.on

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32 = self.prev


def _torch_step(A, X, P, alpha, beta):
    wide = torch.float64 if A.dtype == torch.float64 else torch.float32
    if A.is_cuda and A.dtype in (torch.float16, torch.bfloat16):
        try:
            prod = torch.bmm(A, X, out_dtype=torch.float32)
        except (TypeError, RuntimeError):  # a torch without bmm(out_dtype=...)
            prod = torch.bmm(A.float(), X.float())
    elif A.dtype == torch.float32 and not A.is_cuda:  # TF32 tensor cores round the operands
        prod = _round_tf32(A) @ _round_tf32(X)
    else:
        prod = A.to(wide) @ X.to(wide)
    y = prod * alpha.to(wide)[:, None, None]
    if beta:
        y = y + beta * X.to(wide)
    if P is not None:
        y = y - P.to(wide)
    Y = y.to(A.dtype)
    yw = Y.to(wide)
    sq = (yw * yw).sum((-2, -1), dtype=torch.float64)
    dot = (yw * X.to(wide)).sum((-2, -1), dtype=torch.float64)
    return Y, sq, dot


@lru_cache(maxsize=1)
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def step(A, X, P, Y, ALPHA, PART, n, sa, sx, sp, beta,
             HAS_P: tl.constexpr, EVEN: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        pid = tl.program_id(0)
        b = tl.program_id(1)
        tiles_n = tl.cdiv(n, BN)
        rm = (pid // tiles_n) * BM + tl.arange(0, BM)
        rn = (pid % tiles_n) * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        a_ptr = A + b * sa + rm[:, None] * n + rk[None, :]
        x_ptr = X + b * sx + rk[:, None] * n + rn[None, :]
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k in range(0, n, BK):
            if EVEN:  # n a multiple of every tile size: no masks, so loads pipeline freely
                a = tl.load(a_ptr)
                x = tl.load(x_ptr)
            else:
                kk = k + rk
                a = tl.load(a_ptr, mask=(rm[:, None] < n) & (kk[None, :] < n), other=0.0)
                x = tl.load(x_ptr, mask=(kk[:, None] < n) & (rn[None, :] < n), other=0.0)
            acc = tl.dot(a, x, acc)
            a_ptr += BK
            x_ptr += BK * n
        inside = (rm[:, None] < n) & (rn[None, :] < n)
        off = rm[:, None] * n + rn[None, :]
        xt = tl.load(X + b * sx + off, mask=inside, other=0.0).to(tl.float32)
        y = acc * tl.load(ALPHA + b) + beta * xt
        if HAS_P:
            y -= tl.load(P + b * sp + off, mask=inside, other=0.0).to(tl.float32)
        y_low = y.to(Y.dtype.element_ty)
        tl.store(Y + b * n * n + off, y_low, mask=inside)
        yr = y_low.to(tl.float32)
        part = PART + (b * tl.num_programs(0) + pid) * 2
        tl.store(part, tl.sum(tl.sum(yr * yr, 1), 0))
        tl.store(part + 1, tl.sum(tl.sum(yr * xt, 1), 0))

    return step


def triton_usable(t: torch.Tensor) -> bool:
    """True where the fused kernel runs by default: half precision on CUDA with Triton installed."""
    if not (t.is_cuda and t.dtype in (torch.float16, torch.bfloat16)):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def cheb_step(A: torch.Tensor, X: torch.Tensor, P: torch.Tensor | None, alpha: torch.Tensor, beta: float,
              *, fused: bool | None = None, blocks: tuple[int, int, int] = (128, 128, 64), warps: int = 8,
              stages: int = 4):
    """(Y, ||Y||^2, <Y, X>) per matrix; A, X, P (B or 1, n, n) in one dtype, alpha (B,); sums in float64.

    A batch dimension of size 1 is broadcast (the identity as P). ``fused`` None picks the Triton kernel
    where ``triton_usable`` (and falls back to torch, with a warning, if it fails to build), True forces
    it (CPU tensors need ``TRITON_INTERPRET=1``), False the torch version. ``blocks`` are its tile sizes
    (BM, BN, BK), ``warps`` and ``stages`` its launch settings (benchmarks/profile_analysis.py times a few).
    """
    B = max(A.shape[0], X.shape[0])
    n = X.shape[-1]
    auto = fused is None
    if auto:
        fused = triton_usable(X) and not _FAILED
    if fused:
        try:
            return _fused_step(A, X, P, alpha, beta, B, n, blocks, warps, stages)
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - a GPU or Triton the kernel does not build for
            if not auto:
                raise
            _FAILED.append(exc)
            warnings.warn(f"the fused Triton step failed ({type(exc).__name__}: {exc}); using torch operations",
                          stacklevel=2)
    return _torch_step(A.expand(B, n, n), X.expand(B, n, n), None if P is None else P.expand(B, n, n),
                       alpha.expand(B), beta)


_FAILED: list[Exception] = []  # set once the kernel has failed to build or run here


def _fused_step(A, X, P, alpha, beta, B, n, blocks, warps, stages):
    BM, BN, BK = blocks
    A, X = A.contiguous(), X.contiguous()
    has_p = P is not None
    P = P.contiguous() if has_p else X
    Y = torch.empty(B, n, n, dtype=X.dtype, device=X.device)
    tiles = ((n + BM - 1) // BM) * ((n + BN - 1) // BN)
    part = torch.empty(B, tiles, 2, dtype=torch.float32, device=X.device)
    stride = [0 if t.shape[0] == 1 else n * n for t in (A, X, P)]
    interpreted = not X.is_cuda
    _kernel()[(tiles, B)](A, X, P, Y, alpha.to(torch.float32).expand(B).contiguous(), part, n, *stride,
                          float(beta), HAS_P=has_p, EVEN=n % BM == 0 and n % BN == 0 and n % BK == 0,
                          BM=BM, BN=BN, BK=BK,
                          **({} if interpreted else dict(num_warps=warps, num_stages=stages)))
    sums = part.sum(1, dtype=torch.float64)
    return Y, sums[:, 0], sums[:, 1]
