"""Matrix entropy and the top eigenvalues of many Gram matrices from matrix products only.

An exact eigensolver is the slow part of the analysis on a GPU: a 1024 x 1024 symmetric eigenproblem is
memory- and latency-bound (tridiagonalization), while a forward pass is bound by matrix products. This
module gets what the analysis needs from the spectrum of rho = G / tr(G) - the entropy
H = -sum_i lambda_i log lambda_i and the three largest eigenvalues - from batched matrix products:

1. Top eigenpairs by subspace iteration (products of G with a tall, thin block, shifted Cholesky QR in
   float64) and Rayleigh-Ritz in float64 (``width`` pairs). Pairs whose residual ||rho v - theta v|| is
   at most ``tol * theta`` are deflated by projection: rho_d = (I - V V^T) rho (I - V V^T), which stays
   positive semidefinite, written as rho plus a low-rank update and made tile by tile from G
   (``cheb_step.deflated_half``), exactly symmetric, as S = rho_d / ||rho_d||_F in the storage dtype.
   The three largest Ritz values give sigma_1..3^2 and the anisotropy.
2. An upper bound s >= ||rho_d||_2 from repeated squaring: ||rho_d^(2^q)||_F^(2^-q) overestimates the
   largest eigenvalue by at most a factor n^(2^-(q+1)) (1.11 for n = 1024, q = 5; q = 3 measured no faster
   on an H100 and 43 % less accurate on synthetic worst cases).
3. The sum of f(lambda) = -lambda log lambda over the spectrum of rho_d from its Chebyshev moments
   tr T_j(2 rho_d / s - I), j = 0..D, which products of symmetric matrices give exactly: baby steps
   T_2..T_b of the recurrence (tr T_2j = 2 ||T_j||_F^2 - n, tr T_2j+1 = 2 <T_j+1, T_j>_F - tr T_1; T_1 is
   never stored), then giant steps T_g = 2 T_b T_g-b - T_g-2b, g = 2b, 3b, ..., each giving b more moments
   from inner products with the stored T_1..T_b (tr T_g+i = 2 <T_g, T_i>_F - tr T_g-i): 9 products at
   D = 32 (b = 4). The Chebyshev interpolant of -u log u on [0, 1] of degree D then gives
   sum f = s * sum_j c_j mu_j - tr(rho_d) log s.
   Every product is symmetric (polynomials in one matrix), so the fused kernel computes only the tiles on
   and above the diagonal.

Error terms: (a) interpolation: the interpolant of degree D is within E_D ~ 0.45 / D^2 of -u log u on
[0, 1] (1.1e-4 at D = 64, ``interpolation_error``), so the deflated part's entropy is within
s * n * E_D with s <= lambda_(k+1) <= 1 / (k + 1) up to the bound's factor; in practice the signed
errors cancel and the result is far closer. (b) deflation: projecting out Ritz vectors drops the
coupling block between the two subspaces, an error of second order in the Ritz residuals (only
converged pairs are deflated). (c) rounding of the products (``storage``). Tests and
benchmarks/bench_analysis.py --check measure the total against float64 eigenvalues.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from functools import lru_cache

import torch

from mcr_exit.metrics.cheb_step import cheb_step, deflated_half, tf32
from mcr_exit.metrics.subspace_kernels import cholqr, times_block

_TINY = 1e-300
ESTIMATE_MIN_SIZE = 256  # below this Gram size exact eigenvalues cost little anywhere (the analysis's threshold)


@dataclass(frozen=True)
class SpectrumSummary:
    """What the analysis needs from a spectrum, per batch row: (B,) tensors, and (B, 3) for ``top``."""

    total: torch.Tensor  # sum of eigenvalues of G (= ||X||_F^2)
    top: torch.Tensor  # three largest eigenvalues of G, descending
    entropy: torch.Tensor  # -sum p log p, p = eigenvalues / total, nats
    deflated: torch.Tensor  # number of Ritz pairs deflated exactly
    bound: torch.Tensor  # s: upper bound on the largest eigenvalue of the deflated part of rho


@lru_cache(maxsize=16)
def cheb_coefficients(degree: int) -> tuple[float, ...]:
    """Chebyshev coefficients of g(u) = -u log u, u in [0, 1] (x = 2u - 1), interpolated at Lobatto points."""
    D = degree
    fx = []
    for k in range(D + 1):
        u = (math.cos(math.pi * k / D) + 1.0) / 2.0
        fx.append(-u * math.log(u) if u > 0 else 0.0)
    coeffs = []
    for j in range(D + 1):
        acc = sum((0.5 if k in (0, D) else 1.0) * fx[k] * math.cos(math.pi * j * k / D) for k in range(D + 1))
        coeffs.append(acc * (1.0 if j in (0, D) else 2.0) / D)
    return tuple(coeffs)


def interpolation_error(degree: int) -> float:
    """Largest |(-u log u) - interpolant| on [0, 1], on a dense grid (log-spaced near 0)."""
    c = cheb_coefficients(degree)
    u = torch.cat([torch.logspace(-14, -1, 4000, dtype=torch.float64), torch.linspace(0, 1, 20001, dtype=torch.float64)])
    x = 2 * u - 1
    t_prev, t = torch.ones_like(x), x
    p = c[0] * t_prev + c[1] * t
    for j in range(2, degree + 1):
        t_prev, t = t, 2 * x * t - t_prev
        p = p + c[j] * t
    return float((p + torch.xlogy(u, u)).abs().max())


def _sym(A: torch.Tensor) -> torch.Tensor:
    return 0.5 * (A + A.transpose(-1, -2))


def _eigh(C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.linalg.eigh of small symmetric matrices, finishing on the CPU where the GPU's batched Jacobi
    solver gives up (it can, on nearly rank-deficient Gram matrices of strongly compressed layers)."""
    C = torch.nan_to_num(C, nan=0.0, posinf=0.0, neginf=0.0)
    try:
        return torch.linalg.eigh(C)
    except torch.linalg.LinAlgError:
        lam, U = torch.linalg.eigh(C.cpu())
        return lam.to(C.device), U.to(C.device)


def _svqb(Y: torch.Tensor, rcond: float = 1e-14) -> torch.Tensor:
    """Orthonormal basis of each column space of Y (B, n, w), float64; dependent directions become zero columns.

    SVQB (Stathopoulos and Wu): Y^T Y = U diag(l) U^T, basis = Y U diag(l)^(-1/2). Only a w x w
    eigenproblem (batched Jacobi on GPUs for w <= 32), no tall QR factorization.
    """
    for _ in range(2):
        C = _sym(Y.transpose(-1, -2) @ Y)
        lam, U = _eigh(C)
        good = lam > rcond * lam[..., -1:].clamp(min=_TINY)
        scale = torch.where(good, lam.clamp(min=_TINY).rsqrt(), torch.zeros_like(lam))
        Y = Y @ (U * scale[..., None, :])
    return Y


def _storage(device: torch.device, storage) -> torch.dtype:
    if storage is not None:
        return storage
    return torch.float16 if device.type == "cuda" else torch.float64


@lru_cache(maxsize=16)
def _coefficients_on(degree: int, device: torch.device) -> torch.Tensor:
    return torch.tensor(cheb_coefficients(degree), dtype=torch.float64).to(device)


@lru_cache(maxsize=16)
def _start_block(n: int, w: int, seed: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The fixed orthonormal start block of the subspace iteration (kept on the device between calls)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, w, generator=gen, dtype=torch.float64)).Q.to(device, dtype)


def _top_block(G: torch.Tensor, Q: torch.Tensor, *, iterations: int, fused) -> tuple[torch.Tensor]:
    """Step 1's subspace iteration: ``iterations`` products with G, each orthonormalized (float64)."""
    with tf32(False):
        for _ in range(iterations):
            Q = cholqr(times_block(G, Q, fused=fused), fused=fused)
    return (Q,)


def baby_steps(degree: int) -> int:
    """b: how many Chebyshev matrices T_1..T_b the moments of degree D are made from (the fewest products,
    b - 1 baby steps and ceil(D / b) - 2 giant steps; the smallest such b, which stores the fewest)."""
    best = (degree, 1)
    for b in range(2, degree // 2 + 1):
        best = min(best, (b - 1 + max(0, -(-degree // b) - 2), b))
    return best[1] if degree > 2 else 1


def _remainder(G, inv, left, right, *, degree: int, squarings: int, sd: torch.dtype, fused):
    """Steps 2-3: the deflated matrix, the bound s and sum f(lambda) over its spectrum; (h_rest, s), (B,)."""
    B, n = G.shape[0], G.shape[-1]
    b = baby_steps(degree)
    babies = torch.empty(b, B, n, n, dtype=sd, device=G.device)  # S (standing for T_1), T_2, ..., T_b
    _, nrm2, _ = deflated_half(G, inv, left, right, None, sd, fused=fused)
    nrm = nrm2.sqrt().clamp(min=_TINY)
    # S = rho_d / ||rho_d||, as stored: every later quantity is a function of this matrix, so its own
    # norm and trace (not rho_d's) enter the sums
    S, sq, tr_s = deflated_half(G, inv, left, right, 1.0 / nrm, sd, out=babies[0], fused=fused)
    tr_d = nrm * tr_s
    log_scale = torch.log(nrm)
    sq = sq.clamp(min=_TINY)
    sq_s = sq

    with tf32(sd == torch.float32):
        # 2. s >= ||rho_d||_2 by repeated squaring. S_k+1 = S_k S_k / ||S_k||^2 stays in range; with
        #    rho_d^(2^k) = exp(log_scale) S_k, log_scale doubles and gains log ||S_k||^2 at each step
        Sk = S
        for _ in range(squarings):
            Sk, sq_next, _ = cheb_step(Sk, Sk, None, 1.0 / sq, 0.0, symmetric=True, fused=fused)
            log_scale = 2 * log_scale + torch.log(sq)
            sq = sq_next.clamp(min=_TINY)
        del Sk
        s = (torch.exp((log_scale + 0.5 * torch.log(sq)) / 2**squarings) * 1.02).clamp(min=_TINY)

        # 3. Chebyshev moments mu_j = tr T_j(A) of A = 2 Bm - I, Bm = rho_d / s = c S (c = ||rho_d|| / s,
        #    spectrum in [0, 1)), j = 0..D. T_1 = 2c S - I is never stored (its norm and trace follow from
        #    S's). Baby steps T_2 = 8c^2 S^2 - 8c S + I, T_j+1 = 4c S T_j - 2 T_j - T_j-1 up to T_b give
        #    mu up to 2b from their norms and neighbour products (tr T_2j = 2 ||T_j||^2 - n,
        #    tr T_2j+1 = 2 <T_j+1, T_j> - tr T_1). Giant steps T_g = 2 T_b T_g-b - T_g-2b (g = 2b, 3b, ...)
        #    give mu_g+1..mu_g+b from <T_g, T_i>, i = 1..b (tr T_g+i = 2 <T_g, T_i> - tr T_g-i), computed in
        #    the product's epilogue: D = 32 takes 9 products where the plain recurrence takes 15.
        c = nrm / s
        tr1 = 2 * c * tr_s - n
        sq1 = 4 * c * c * sq_s - 4 * c * tr_s + n  # ||T_1||^2
        mu: list = [None] * (degree + 1)
        mu[:3] = [torch.full_like(s, float(n)), tr1, 2 * sq1 - n]
        if b >= 2:
            _, sq_j, dot_s = cheb_step(S, S, None, 8 * c * c, -8 * c, delta=1.0, symmetric=True, out=babies[1],
                                       fused=fused)
            mu[3:5] = [2 * (2 * c * dot_s - mu[2]) - tr1, 2 * sq_j - n]  # <T_2, T_1> = 2c <T_2, S> - tr T_2
            for j in range(2, b):  # T_j+1 from T_j and T_j-1 (T_1 as P = S with gamma -2c, delta 1)
                P, gamma, delta = (S, -2 * c, 1.0) if j == 2 else (babies[j - 2], -1.0, 0.0)
                _, sq_j, dot_j = cheb_step(S, babies[j - 1], P, 4 * c, -2.0, gamma=gamma, delta=delta,
                                           symmetric=True, out=babies[j], fused=fused)
                mu[2 * j + 1 : 2 * j + 3] = [2 * dot_j - tr1, 2 * sq_j - n]
            Tb, prev, cur = babies[b - 1], None, babies[b - 1]  # T_b, T_g-2b (None: I), T_g-b
            g = 2 * b
            while g < degree:
                k = min(b, degree - g)  # the moments g+1..g+k still missing
                T_g, _, _, dots = cheb_step(Tb, cur, prev, 2.0, 0.0, gamma=-1.0, delta=-1.0 if prev is None else 0.0,
                                            symmetric=True, dots=babies[:k], fused=fused)
                for i in range(1, k + 1):
                    d_i = 2 * c * dots[:, 0] - mu[g] if i == 1 else dots[:, i - 1]  # <T_g, T_1> from <T_g, S>
                    mu[g + i] = 2 * d_i - mu[g - i]
                prev, cur, g = cur, T_g, g + b
            del Tb, prev, cur
        del S, babies
    mu = torch.stack(mu, -1)
    h_rest = s * (mu * _coefficients_on(degree, G.device)).sum(-1) - tr_d * torch.log(s)
    return h_rest, s


# CUDA graphs of the two phases of the estimate that have no host synchronization. The estimate launches
# ~1,600 small kernels per chunk; launched one by one from Python they cost more host time than the
# kernels take on the GPU, and they compete for the interpreter with the forward pass's launches. A
# phase is captured when the same shapes come in two eager calls in a row (the first compiles the
# kernels) and replayed whenever they come again. Each graph holds its working memory, so only the
# GRAPH_SHAPES most recently used shapes keep one (the full chunk and the last, smaller one of a run);
# prompts of many lengths simply run eagerly. Inputs are copied into the graph's own tensors; the outputs
# are cloned out. Any failure to capture turns graphs off for the process, with one warning.
GRAPH_SHAPES = 2
_GRAPHS: dict = {}  # (phase, shapes) key -> (graph, static inputs, outputs), least recently used first
_LAST: dict = {}  # (phase, device) -> key of its last eager call
_STATIC: dict = {}  # shape -> the persistent input tensor, as many as graphs
_GRAPHS_FAILED: list = []


def _use_graphs(G: torch.Tensor, graphs: bool | None) -> bool:
    if graphs is not None:
        return graphs and G.is_cuda
    return G.is_cuda and not _GRAPHS_FAILED and not torch.cuda.is_current_stream_capturing()


def _static_input(G: torch.Tensor) -> torch.Tensor:
    """G copied into a persistent tensor of its shape (so that captured graphs can read it)."""
    key = (tuple(G.shape), G.dtype, G.device)
    with torch.inference_mode():  # the graphs' tensors are inference tensors, whatever mode the caller is in
        buf = _STATIC.pop(key, None)
        if buf is None:
            mine = [k for k in _STATIC if k[2] == G.device]  # GRAPH_SHAPES per device
            for k in mine[: max(0, len(mine) - GRAPH_SHAPES + 1)]:  # (a graph holding an evicted buffer copies)
                del _STATIC[k]
            buf = torch.empty_like(G)
        _STATIC[key] = buf  # most recently used last
        buf.copy_(G)
    return buf


def _capture(fn, static: tuple, options: dict):
    """(graph, outputs): ``fn`` on the static inputs, captured beside the forward pass, which the analysis
    keeps running meanwhile on its own thread (``models.cuda_graph.capture``)."""
    from mcr_exit.models.cuda_graph import capture

    return capture(fn, static, options)


def _graphed(key, fn, inputs: tuple, use: bool, **options) -> tuple:
    if not use:
        return fn(*inputs, **options)
    phase = (key[0], inputs[0].device)  # a model on several GPUs: each device has its own graphs
    key = (key, tuple(tuple(x.shape) for x in inputs), inputs[0].device)
    entry = _GRAPHS.pop(key, None)
    if entry is None:
        if _LAST.get(phase) != key:
            _LAST[phase] = key
            return fn(*inputs, **options)
        try:
            with torch.inference_mode():
                shared = {b.data_ptr() for b in _STATIC.values()}
                static = tuple(x if x.data_ptr() in shared else x.clone() for x in inputs)
                graph, out = _capture(fn, static, options)
        except Exception as exc:  # noqa: BLE001 - a library call that cannot be captured here
            _GRAPHS_FAILED.append(exc)
            warnings.warn(f"CUDA graphs of the spectral estimate are off ({type(exc).__name__}: {exc})", stacklevel=3)
            return fn(*inputs, **options)
        entry = (graph, static, out)
        same_phase = [k for k in _GRAPHS if (k[0][0], k[2]) == phase]
        for k in same_phase[: max(0, len(same_phase) - GRAPH_SHAPES + 1)]:  # least recently used out
            del _GRAPHS[k]
    _GRAPHS[key] = entry  # most recently used last
    graph, static, out = entry
    with torch.inference_mode():
        for dst, src in zip(static, inputs):
            if dst.data_ptr() != src.data_ptr():
                dst.copy_(src)
        graph.replay()
    return tuple(o.clone() for o in out)  # clones made outside inference mode are ordinary tensors there


def estimate_spectrum(
    gram: torch.Tensor,
    *,
    width: int = 32,
    iterations: int = 16,
    degree: int = 32,
    squarings: int = 5,
    tol: float = 1e-3,
    storage: torch.dtype | None = None,
    seed: int = 0,
    fused: bool | None = None,
    graphs: bool | None = None,
) -> SpectrumSummary:
    """Entropy and the three largest eigenvalues of each PSD matrix in ``gram`` (B, n, n).

    Args:
        width: Ritz pairs computed by subspace iteration (the converged ones are deflated).
        iterations: subspace iterations, each a product with rho and an orthonormalization.
        degree: even degree D of the Chebyshev interpolant (``baby_steps``: 9 products of n x n matrices
            at D = 32, 13 at D = 64).
        squarings: squarings of rho_d for the bound s.
        tol: a Ritz pair is deflated when its residual is at most tol * theta.
        storage: dtype of the n x n matrices of steps 2-3: float16 (default on GPUs: tensor cores,
            float32 accumulation), float32 (TF32 tensor cores) or float64 (default on CPUs).
        fused: the Triton kernels of ``cheb_step`` (None: where they run).
        graphs: replay the synchronization-free phases as CUDA graphs (None: on GPUs).
    """
    if gram.is_cuda and gram.device != torch.device("cuda", torch.cuda.current_device()):
        with torch.cuda.device(gram.device):  # Triton kernels and graphs run on the current device
            return estimate_spectrum(gram, width=width, iterations=iterations, degree=degree, squarings=squarings,
                                     tol=tol, storage=storage, seed=seed, fused=fused, graphs=graphs)
    if gram.dim() == 2:
        gram = gram.unsqueeze(0)
    B, n, _ = gram.shape
    if degree < 2 or degree % 2:
        raise ValueError(f"degree must be even and >= 2, got {degree}")
    f64, dev = torch.float64, gram.device
    sd = _storage(dev, storage)
    wd = torch.float64 if sd == torch.float64 else torch.float32  # working dtype of the Gram matrix and thin blocks
    total = gram.diagonal(dim1=-2, dim2=-1).sum(-1, dtype=f64)
    inv = 1.0 / total.clamp(min=_TINY)
    G = gram.to(wd)  # rho = sym(G) / tr G; nothing n x n is made from it but the deflated matrix below

    with tf32(False):
        # 1. top eigenpairs: subspace iteration (products of G with a float64 block, float32-accurate;
        #    the scale of G does not matter to it; orthonormalized in float64), then Rayleigh-Ritz in
        #    float64 from one more product. Float32 products are as accurate as the float32 Gram matrix
        #    itself; errors in rho V only couple the deflated subspace to the rest, which moves the
        #    remaining eigenvalues at second order (a float64 product measured no difference). The
        #    deflated matrix below is made exactly symmetric, tile by tile.
        w = min(width, n)
        use_graphs = _use_graphs(G, graphs)
        if use_graphs:  # one persistent copy of the input that both captured phases read
            G = _static_input(G)
        Q0 = _start_block(n, w, seed, dev, f64).expand(B, n, w).contiguous()
        (Q,) = _graphed(("top", B, n, w, G.dtype, iterations, fused), _top_block, (G, Q0), use_graphs,
                        iterations=iterations, fused=fused)
        Q = _svqb(Q)
        RQ = times_block(G, Q, fused=fused) * inv[:, None, None]
        theta, W = _eigh(_sym(Q.transpose(-1, -2) @ RQ))
        theta, W = theta.flip(-1), W.flip(-1)
        V, C = Q @ W, RQ @ W  # Ritz vectors and rho V
        residual = torch.linalg.vector_norm(C - V * theta[:, None, :], dim=-2)
        real = torch.linalg.vector_norm(V, dim=-2) > 0.5  # not a zero column of a dependent block
        keep = real & (theta > 0) & (residual <= tol * theta)
        top_all = theta.clamp(min=0) * real
        th = top_all * keep
        V, C = V * keep[:, None, :], C * keep[:, None, :]
        # rho_d = (I - VV^T) rho (I - VV^T) = rho + [V, -C] [theta V^T - C^T; V^T]  (V^T rho V = diag(theta)),
        # made tile by tile from G in one pass for its norm and one that writes it, scaled, in ``sd``
        left = torch.cat([V, -C], -1)
        right = torch.cat([th[:, :, None] * V.transpose(-1, -2) - C.transpose(-1, -2), V.transpose(-1, -2)], -2)
    del RQ, C, V
    h_rest, s = _graphed(("rest", B, n, w, G.dtype, sd, degree, squarings, fused), _remainder,
                         (G, inv, left, right), use_graphs, degree=degree, squarings=squarings, sd=sd, fused=fused)
    del G, left, right
    # a remainder below 1e-12 (relative to the trace) is rounding: its entropy is under n * 3e-11; with
    # all n pairs deflated there is no remainder
    h_rest = torch.where((s > 1e-12) & (keep.sum(-1) < n), h_rest, torch.zeros_like(h_rest))
    entropy = -torch.xlogy(th, th).sum(-1) + h_rest
    entropy = torch.where(total > 0, entropy, torch.zeros_like(entropy))
    top = torch.zeros(B, 3, dtype=f64, device=dev)
    k3 = min(3, w)
    top[:, :k3] = top_all[:, :k3] * total[:, None]
    return SpectrumSummary(total=total, top=top, entropy=entropy, deflated=keep.sum(-1), bound=s)
