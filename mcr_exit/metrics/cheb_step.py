"""The fused kernels of the spectral estimate: one recurrence step, and the deflated matrix in half precision.

``cheb_step(A, X, P, alpha, beta, gamma=..., delta=...)`` returns, for each matrix b of a batch,

    Y_b = alpha_b * (A_b @ X_b) + beta * X_b + gamma_b * P_b + delta * I      (P optional; gamma -1 by default)
    ||Y_b||_F^2  and  <Y_b, X_b>_F                                         (of Y as stored)

with half-precision A, X, P, Y and float32 accumulation. The Chebyshev recurrence is
T_j+1 = 4 c S T_j - 2 T_j - T_j-1 (alpha 4c, beta -2) and the squarings are S_k+1 = S_k S_k / ||S_k||^2
(alpha 1/||S_k||^2, beta 0, no P); the norms give the traces the estimate needs. With ``dots`` (K stacked
matrices D_k) it also returns <Y_b, D_k,b>_F: the giant steps' inner products with T_1..T_b.

``symmetric=True`` is for the case the estimate always has: A, X and P are polynomials in one symmetric
matrix, so A X is symmetric too. The kernel then computes only the tiles on and above the diagonal and
writes each one a second time, transposed, below it (44% fewer products at n = 1024), and the result is
exactly symmetric, which the recurrence relies on (an antisymmetric residue would not stay in [-1, 1]).

``deflated_half(G, inv, L, R, scale)`` returns Y = scale * (sym(G) * inv + L @ R) in half precision,
exactly symmetric, with ||Y||^2 and tr Y of Y as stored (``scale`` None: only the float32 sums of the
unrounded matrix, no Y). This is the deflated matrix rho_d = (I - V V^T) rho (I - V V^T) of the estimate,
rho = sym(G) / tr G, written as rho plus a low-rank update, read straight from the float32 Gram matrix.

On CUDA with Triton each is one kernel: the update and the sums are computed in the epilogue from the
tile the kernel already holds, where separate torch calls would read and write every n x n matrix several
more times. Elsewhere torch versions with the same rounding (one rounding of the float32 result to the
storage dtype) run. ``fused=True`` on CPU tensors under ``TRITON_INTERPRET=1`` runs the kernels in
Triton's interpreter, which is how the tests check them without a GPU.
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


def _wide(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _torch_step(A, X, P, alpha, beta, gamma, delta, dots=None, out=None):
    """The step with torch operations; alpha, beta, gamma (B,) tensors."""
    wide = _wide(A.dtype)
    if A.is_cuda and A.dtype in (torch.float16, torch.bfloat16):
        try:
            prod = torch.bmm(A, X, out_dtype=torch.float32)
        except (TypeError, RuntimeError):  # a torch without bmm(out_dtype=...)
            prod = torch.bmm(A.float(), X.float())
    elif A.dtype == torch.float32 and not A.is_cuda:  # TF32 tensor cores round the operands
        prod = _round_tf32(A) @ _round_tf32(X)
    else:
        prod = A.to(wide) @ X.to(wide)
    y = prod * alpha.to(wide)[:, None, None] + beta.to(wide)[:, None, None] * X.to(wide)
    if P is not None:
        y = y + gamma.to(wide)[:, None, None] * P.to(wide)
    if delta:
        y = y + delta * torch.eye(y.shape[-1], dtype=wide, device=y.device)
    Y = y.to(A.dtype) if out is None else out.copy_(y)
    yw = Y.to(wide)
    sq = (yw * yw).sum((-2, -1), dtype=torch.float64)
    dot = (yw * X.to(wide)).sum((-2, -1), dtype=torch.float64)
    if dots is None:
        return Y, sq, dot
    return Y, sq, dot, torch.stack([(yw * d.to(wide)).sum((-2, -1), dtype=torch.float64) for d in dots], -1)


@lru_cache(maxsize=1)
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def step(A, X, P, Y, ALPHA, BETA, GAMMA, PART, PAIRS, DOTS, n, sa, sx, sp, sd, delta, per_matrix,
             HAS_P: tl.constexpr, SYM: tl.constexpr, EVEN: tl.constexpr, K: tl.constexpr,
             BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        t = tl.program_id(0)  # tile t = b * per_matrix + pid
        b = t // per_matrix
        pid = t % per_matrix
        if SYM:  # the tiles on and above the diagonal, from a table of (i, j)
            ti = tl.load(PAIRS + 2 * pid)
            tj = tl.load(PAIRS + 2 * pid + 1)
        else:
            ti = pid // tl.cdiv(n, BN)
            tj = pid % tl.cdiv(n, BN)
        rm = ti * BM + tl.arange(0, BM)
        rn = tj * BN + tl.arange(0, BN)
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
        y = acc * tl.load(ALPHA + b) + tl.load(BETA + b) * xt
        if HAS_P:
            y += tl.load(GAMMA + b) * tl.load(P + b * sp + off, mask=inside, other=0.0).to(tl.float32)
        y += tl.where((rm[:, None] == rn[None, :]) & inside, delta, 0.0)
        if SYM:
            if ti == tj:  # the diagonal tile holds both triangles: make them agree to the last bit
                y = 0.5 * (y + tl.trans(y))
        y_low = y.to(Y.dtype.element_ty)
        tl.store(Y + b * n * n + off, y_low, mask=inside)
        if SYM:
            if ti != tj:  # the mirror image below the diagonal
                tl.store(Y + b * n * n + rn[:, None] * n + rm[None, :], tl.trans(y_low),
                         mask=(rn[:, None] < n) & (rm[None, :] < n))
        yr = y_low.to(tl.float32)
        w = 1.0
        if SYM:
            w = tl.where(ti == tj, 1.0, 2.0)  # an off-diagonal tile stands for itself and its mirror image
        tl.store(PART + (2 + K) * t, w * tl.sum(tl.sum(yr * yr, 1), 0))
        tl.store(PART + (2 + K) * t + 1, w * tl.sum(tl.sum(yr * xt, 1), 0))
        for kk in tl.static_range(K):  # <Y, D_k> for the stacked matrices D (K, B, n, n)
            dk = tl.load(DOTS + kk * sd + b * n * n + off, mask=inside, other=0.0).to(tl.float32)
            tl.store(PART + (2 + K) * t + 2 + kk, w * tl.sum(tl.sum(yr * dk, 1), 0))

    @triton.jit
    def deflate(G, L, R, INV, SCALE, Y, PART, PAIRS, n, r,
                WRITE: tl.constexpr, BM: tl.constexpr, BR: tl.constexpr):
        pid = tl.program_id(0)
        b = tl.program_id(1)
        ti = tl.load(PAIRS + 2 * pid)
        tj = tl.load(PAIRS + 2 * pid + 1)
        rm = ti * BM + tl.arange(0, BM)
        rn = tj * BM + tl.arange(0, BM)
        inside = (rm[:, None] < n) & (rn[None, :] < n)
        g = tl.load(G + b * n * n + rm[:, None] * n + rn[None, :], mask=inside, other=0.0)
        gt = tl.load(G + b * n * n + rn[:, None] * n + rm[None, :], mask=(rn[:, None] < n) & (rm[None, :] < n),
                     other=0.0)
        y = 0.5 * (g + tl.trans(gt)) * tl.load(INV + b)
        rr = tl.arange(0, BR)
        for k in range(0, r, BR):
            kk = k + rr
            lt = tl.load(L + b * n * r + rm[:, None] * r + kk[None, :], mask=(rm[:, None] < n) & (kk[None, :] < r),
                         other=0.0)
            rt = tl.load(R + b * n * r + kk[:, None] * n + rn[None, :], mask=(kk[:, None] < r) & (rn[None, :] < n),
                         other=0.0)
            y += tl.dot(lt, rt, input_precision="tf32x3")
        if ti == tj:
            y = 0.5 * (y + tl.trans(y))
        diag = (rm[:, None] == rn[None, :]) & inside
        w = tl.where(ti == tj, 1.0, 2.0)
        if WRITE:
            y_low = (y * tl.load(SCALE + b)).to(Y.dtype.element_ty)
            tl.store(Y + b * n * n + rm[:, None] * n + rn[None, :], y_low, mask=inside)
            if ti != tj:
                tl.store(Y + b * n * n + rn[:, None] * n + rm[None, :], tl.trans(y_low),
                         mask=(rn[:, None] < n) & (rm[None, :] < n))
            y = y_low.to(tl.float32)
        part = PART + (b * tl.num_programs(0) + pid) * 2
        tl.store(part, w * tl.sum(tl.sum(y * y, 1), 0))
        tl.store(part + 1, tl.sum(tl.sum(tl.where(diag, y, 0.0), 1), 0))

    return step, deflate


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_usable(t: torch.Tensor) -> bool:
    """True where the fused kernels run by default: half precision on CUDA with Triton installed."""
    return t.is_cuda and t.dtype in (torch.float16, torch.bfloat16) and _has_triton()


_FAILED: dict[str, Exception] = {}  # kernel -> why it failed to build or run here (torch from then on)


def _run_fused(auto: bool, fused_call, torch_call, kernel: str):
    """The kernel where it runs; on its first failure where it was picked automatically, a warning and
    torch for that kernel (the estimate's other kernels keep running)."""
    if auto and kernel in _FAILED:
        return torch_call()
    try:
        return fused_call()
    except torch.OutOfMemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - a GPU or Triton the kernel does not build for
        if not auto:
            raise
        _FAILED[kernel] = exc
        warnings.warn(f"the spectral estimate's Triton kernel '{kernel}' failed ({type(exc).__name__}: {exc}); "
                      "using torch operations for it", stacklevel=3)
    return torch_call()


@lru_cache(maxsize=32)
def _pairs(tiles: int, device: torch.device) -> torch.Tensor:
    """(i, j) for the tiles on and above the diagonal of a tiles x tiles grid, row by row, int32 on ``device``."""
    idx = torch.triu_indices(tiles, tiles)
    return idx.T.contiguous().to(torch.int32).to(device)


def _as_batch(v, B: int, device) -> torch.Tensor:
    """A float32 (B,) tensor on ``device``; a Python scalar becomes one by a fill, not a host copy (no sync)."""
    if not torch.is_tensor(v):
        return torch.full((B,), float(v), dtype=torch.float32, device=device)
    return v.to(device=device, dtype=torch.float32).expand(B).contiguous()


def cheb_step(A: torch.Tensor, X: torch.Tensor, P: torch.Tensor | None, alpha: torch.Tensor | float,
              beta: torch.Tensor | float,
              *, gamma: torch.Tensor | float = -1.0, delta: float = 0.0, symmetric: bool = False,
              dots: torch.Tensor | None = None, out: torch.Tensor | None = None,
              fused: bool | None = None, blocks: tuple[int, int, int] = (128, 128, 64), warps: int = 8,
              stages: int = 4):
    """(Y, ||Y||^2, <Y, X>) per matrix; A, X, P (B or 1, n, n) in one dtype, alpha, beta and gamma (B,)
    tensors or scalars, delta a scalar; sums in float64.

    ``dots`` (K, B, n, n), K matrices per batch row stacked in one tensor: also <Y, dots[k]> for each k,
    a fourth output (B, K), computed in the kernel's epilogue from the tile it holds. ``out`` (B, n, n):
    write Y there (a slice of a stacked buffer, so that Y can be a later step's ``dots``).

    A batch dimension of size 1 is broadcast (the identity as P). ``symmetric`` promises that A X is
    symmetric (A and X commuting symmetric matrices): the kernel then computes the upper tiles only and
    mirrors them (the torch version ignores it). ``fused`` None picks the Triton kernel where
    ``triton_usable`` (and falls back to torch, with a warning, if it fails to build), True forces it (CPU
    tensors need ``TRITON_INTERPRET=1``), False the torch version. ``blocks`` are its tile sizes
    (BM, BN, BK), ``warps`` and ``stages`` its launch settings (benchmarks/profile_analysis.py times a few).
    """
    B = max(A.shape[0], X.shape[0])
    n = X.shape[-1]
    alpha = _as_batch(alpha, B, X.device)
    beta = _as_batch(beta, B, X.device)
    gamma = _as_batch(gamma, B, X.device)
    auto = fused is None
    if auto:
        fused = triton_usable(X)

    def torch_call():
        return _torch_step(A.expand(B, n, n), X.expand(B, n, n), None if P is None else P.expand(B, n, n),
                           alpha, beta, gamma, delta, dots, out)

    if not fused:
        return torch_call()
    return _run_fused(auto, lambda: _fused_step(A, X, P, alpha, beta, gamma, delta, symmetric, B, n, blocks,
                                                warps, stages, dots, out), torch_call, "step")


def _launch(X: torch.Tensor, warps: int, stages: int) -> dict:
    return {} if not X.is_cuda else dict(num_warps=warps, num_stages=stages)


def _fused_step(A, X, P, alpha, beta, gamma, delta, symmetric, B, n, blocks, warps, stages, dots=None, out=None):
    BM, BN, BK = blocks
    if symmetric and BM != BN:
        raise ValueError(f"a symmetric step needs square tiles, got {blocks}")
    A, X = A.contiguous(), X.contiguous()
    has_p = P is not None
    P = P.contiguous() if has_p else X
    Y = torch.empty(B, n, n, dtype=X.dtype, device=X.device) if out is None else out
    if not Y.is_contiguous() or Y.shape != (B, n, n) or Y.dtype != X.dtype:
        raise ValueError("out must be a contiguous (B, n, n) tensor in the operands' dtype")
    K = 0 if dots is None else dots.shape[0]
    if K and (not dots.is_contiguous() or dots.shape[1:] != (B, n, n)):
        raise ValueError(f"dots must be a contiguous (K, {B}, {n}, {n}) tensor, got {tuple(dots.shape)}")
    tm, tn = (n + BM - 1) // BM, (n + BN - 1) // BN
    pairs = _pairs(tm, X.device) if symmetric else alpha  # (an unused pointer when not symmetric)
    per_matrix = tm * (tm + 1) // 2 if symmetric else tm * tn
    even = n % BM == 0 and n % BN == 0 and n % BK == 0
    part = torch.empty(B, per_matrix, 2 + K, dtype=torch.float32, device=X.device)
    stride = [0 if t.shape[0] == 1 else n * n for t in (A, X, P)]
    _kernels()[0][(B * per_matrix,)](A, X, P, Y, alpha, beta, gamma, part, pairs, X if dots is None else dots, n,
                                     *stride, B * n * n, float(delta), per_matrix, HAS_P=has_p, SYM=symmetric,
                                     EVEN=even, K=K, BM=BM, BN=BN, BK=BK, **_launch(X, warps, stages))
    sums = part.sum(1, dtype=torch.float64)
    if dots is None:
        return Y, sums[:, 0], sums[:, 1]
    return Y, sums[:, 0], sums[:, 1], sums[:, 2:]


def _torch_deflate(G, inv, L, R, scale, dtype, out=None):
    wide = _wide(dtype)
    Gw = G.to(wide)
    y = 0.5 * (Gw + Gw.transpose(-1, -2)) * inv.to(wide)[:, None, None] + L.to(wide) @ R.to(wide)
    y = 0.5 * (y + y.transpose(-1, -2))
    if scale is not None:
        Y = (y * scale.to(wide)[:, None, None]).to(dtype)
        Y = Y if out is None else out.copy_(Y)
        y = Y.to(wide)
    else:
        Y = None
    sq = (y * y).sum((-2, -1), dtype=torch.float64)
    tr = y.diagonal(dim1=-2, dim2=-1).sum(-1, dtype=torch.float64)
    return Y, sq, tr


def deflated_half(G: torch.Tensor, inv: torch.Tensor, L: torch.Tensor, R: torch.Tensor,
                  scale: torch.Tensor | None, dtype: torch.dtype, *, out: torch.Tensor | None = None,
                  fused: bool | None = None, block: int = 64, warps: int = 4):
    """(Y, ||Y||^2, tr Y): Y = scale * (sym(G) * inv + L @ R) stored in ``dtype`` and exactly symmetric;
    G (B, n, n), inv and scale (B,), L (B, n, r), R (B, r, n). ``scale`` None: no Y, the sums of the
    unrounded matrix (float32 on the kernel's path). ``out``: write Y there (contiguous, (B, n, n),
    ``dtype``). ``fused`` as in ``cheb_step``.
    """
    B, n, _ = G.shape
    auto = fused is None
    if auto:
        fused = G.is_cuda and dtype in (torch.float16, torch.bfloat16) and _has_triton()

    def torch_call():
        return _torch_deflate(G, inv, L, R, scale, dtype, out)

    if not fused:
        return torch_call()

    def fused_call():
        r = L.shape[-1]
        Gc = G.float().contiguous()
        Lc = L.float().contiguous()
        Rc = R.float().contiguous()
        tiles = (n + block - 1) // block
        pairs = _pairs(tiles, G.device)
        count = tiles * (tiles + 1) // 2
        write = scale is not None
        if not write:
            Y = Gc
        elif out is None:
            Y = torch.empty(B, n, n, dtype=dtype, device=G.device)
        elif out.is_contiguous() and out.shape == (B, n, n) and out.dtype == dtype:
            Y = out
        else:
            raise ValueError("out must be a contiguous (B, n, n) tensor in the given dtype")
        sc = _as_batch(scale if write else 1.0, B, G.device)
        part = torch.empty(B, count, 2, dtype=torch.float32, device=G.device)
        _kernels()[1][(count, B)](Gc, Lc, Rc, _as_batch(inv, B, G.device), sc, Y, part, pairs, n, r,
                                  WRITE=write, BM=block, BR=32, **_launch(G, warps, 1))
        sums = part.sum(1, dtype=torch.float64)
        return (Y if write else None), sums[:, 0], sums[:, 1]

    return _run_fused(auto, fused_call, torch_call, "deflate")
