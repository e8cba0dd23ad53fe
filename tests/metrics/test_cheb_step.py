"""The fused Triton step of the spectral estimate, run by Triton's interpreter on the CPU.

On GPUs the same kernel is compiled; here ``TRITON_INTERPRET=1`` executes its Python body with NumPy, so
the indexing, masking, epilogue and partial sums are checked against the torch version on every CI run.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

from mcr_exit.metrics import cheb_step as cs
from mcr_exit.metrics import subspace_kernels as sk
from mcr_exit.metrics.spectral_estimate import estimate_spectrum

if not sys.platform.startswith("linux"):
    pytest.importorskip("triton")  # Triton ships for Linux only; the dev extras install it there


@pytest.fixture
def interpreted():
    if torch.cuda.is_available():
        pytest.skip("on GPU machines tests/gpu checks the compiled kernel")
    assert os.environ.get("TRITON_INTERPRET") == "1"  # set by tests/conftest.py before Triton is imported


def _pair(B: int, n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(B, n, n, generator=g, dtype=torch.float64)
    A = (M @ M.transpose(1, 2) / (4 * n)).half()
    X = torch.randn(B, n, n, generator=g).half()
    return A, X


@pytest.mark.parametrize("n,blocks", [(100, (32, 32, 32)), (64, (64, 32, 16))])
def test_fused_chebyshev_step_equals_the_torch_step(interpreted, n, blocks):
    A, X = _pair(3, n, seed=n)
    eye = torch.eye(n, dtype=torch.float16)[None]  # batch of one, broadcast (stride 0 in the kernel)
    four = torch.full((3,), 4.0)
    Y, sq, dot = cs.cheb_step(A, X, eye, four, -2.0, fused=True, blocks=blocks)
    Yr, sqr, dotr = cs.cheb_step(A, X, eye, four, -2.0, fused=False)
    # the same float32 sums in another order (absolute error ~1e-6 where terms cancel), then one
    # rounding to float16: one unit in the last place apart at most, plus that float32 error
    ulp = torch.finfo(torch.float16).eps * Yr.float().abs()
    assert ((Y.float() - Yr.float()).abs() <= ulp + 1e-5).all()
    assert (Y != Yr).float().mean() < 0.05
    torch.testing.assert_close(sq, sqr, rtol=1e-5, atol=0)
    torch.testing.assert_close(dot, dotr, rtol=1e-5, atol=1e-3)
    assert torch.isfinite(Y.float()).all()  # every element written (torch.empty holds garbage otherwise)


def test_fused_squaring_step_scales_per_matrix(interpreted):
    A, _ = _pair(2, 80, seed=1)
    alpha = torch.tensor([1.0, 0.25])
    Y, sq, _ = cs.cheb_step(A, A, None, alpha, 0.0, fused=True, blocks=(32, 32, 32))
    ref = (A.float() @ A.float()) * alpha[:, None, None]
    torch.testing.assert_close(Y.float(), ref, rtol=2e-3, atol=1e-4)
    torch.testing.assert_close(sq, (Y.double() ** 2).sum((1, 2)), rtol=1e-6, atol=0)


def _commuting(B: int, n: int, seed: int):
    """S (B, n, n) symmetric PSD in float16, and T = p(S) for a polynomial p: A X is symmetric."""
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(B, n, n, generator=g, dtype=torch.float64)
    S64 = M @ M.transpose(1, 2) / (8 * n)
    T64 = 2 * S64 @ S64 - 3 * S64 + torch.eye(n, dtype=torch.float64)
    return S64.half(), T64.half()


@pytest.mark.parametrize("n,blocks", [(96, (128, 128, 64)), (100, (32, 32, 32)), (128, (64, 64, 32))])
def test_symmetric_step_with_gamma_and_delta_equals_the_torch_step(interpreted, n, blocks):
    """Upper tiles only, mirrored: the same values as the full product up to its float32 rounding, an
    exactly symmetric result, and norms that count each off-diagonal tile twice (delta on the diagonal
    of partial tiles included)."""
    S, T = _commuting(3, n, seed=n)
    alpha, beta, gamma = torch.tensor([4.0, 3.0, 2.0]), torch.tensor([-2.0, -1.5, 0.5]), torch.tensor([-2.0, -1.0, -0.5])
    Y, sq, dot = cs.cheb_step(S, T, S, alpha, beta, gamma=gamma, delta=1.0, symmetric=True, fused=True,
                              blocks=blocks)
    Yr, sqr, dotr = cs.cheb_step(S, T, S, alpha, beta, gamma=gamma, delta=1.0, fused=False)
    assert torch.equal(Y, Y.transpose(1, 2))
    ulp = torch.finfo(torch.float16).eps * Yr.float().abs()
    assert ((Y.float() - Yr.float()).abs() <= 2 * ulp + 1e-4).all()
    torch.testing.assert_close(sq, (Y.double() ** 2).sum((1, 2)), rtol=1e-6, atol=0)
    torch.testing.assert_close(dot, (Y.double() * T.double()).sum((1, 2)), rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(sq, sqr, rtol=1e-3, atol=0)


@pytest.mark.parametrize("n,blocks", [(96, (64, 64, 32)), (100, (32, 32, 32))])
def test_step_epilogue_dots_with_stacked_matrices_and_out(interpreted, n, blocks):
    """The giant steps' epilogue: <Y, D_k> for K stacked matrices (mirror tiles counted twice), Y written
    into a slice of a stacked buffer, the same numbers from the torch version."""
    S, T = _commuting(2, n, seed=n + 1)
    stack = torch.stack([S, T, (S.float() @ T.float()).half()])  # (K, B, n, n), symmetric, commuting
    out = torch.zeros(2, 2, n, n, dtype=torch.float16)
    Y, sq, dot, dots = cs.cheb_step(T, S, None, 2.0, 0.0, delta=-1.0, symmetric=True, fused=True, blocks=blocks,
                                    dots=stack, out=out[1])
    assert Y.data_ptr() == out[1].data_ptr() and torch.equal(out[0], torch.zeros_like(out[0]))
    ref = torch.stack([(Y.double() * D.double()).sum((1, 2)) for D in stack], -1)
    assert dots.shape == (2, 3)
    torch.testing.assert_close(dots, ref, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(dot, ref[:, 0], rtol=1e-5, atol=1e-3)  # X = S is stack[0]
    Yr, sqr, _, dotsr = cs.cheb_step(T, S, None, 2.0, 0.0, delta=-1.0, fused=False, dots=stack)
    torch.testing.assert_close(dotsr, ref, rtol=1e-3, atol=1e-2)
    torch.testing.assert_close(sq, sqr, rtol=1e-3, atol=0)
    with pytest.raises(ValueError, match="dots must be"):
        cs.cheb_step(T, S, None, 2.0, 0.0, symmetric=True, fused=True, blocks=blocks, dots=stack[:, :1])


@pytest.mark.parametrize("n", [96, 128])
def test_deflated_matrix_kernel_equals_the_torch_version(interpreted, n):
    """Y = scale (sym(G) / tr G + [V, -C] [theta V^T - C^T; V^T]) from a float32 Gram matrix whose last bits
    are not symmetric: exactly symmetric, norm and trace of Y as stored, and a norm-only pass."""
    g = torch.Generator().manual_seed(n)
    X = torch.randn(2, n, 3 * n, generator=g)
    G = X @ X.transpose(1, 2)
    G[:, 0, 1] *= 1 + 1e-6  # not symmetric to the last bits, as a float32 product may be
    inv = 1.0 / G.diagonal(dim1=1, dim2=2).sum(-1, dtype=torch.float64)
    rho = 0.5 * (G + G.transpose(1, 2)).double() * inv[:, None, None]
    V = torch.linalg.eigh(rho).eigenvectors[..., -5:]  # the top eigenvectors, as the estimate deflates
    C = rho @ V
    th = (V * C).sum(1)
    L = torch.cat([V, -C], -1)
    R = torch.cat([th[:, :, None] * V.transpose(1, 2) - C.transpose(1, 2), V.transpose(1, 2)], 1)
    scale = torch.tensor([50.0, 200.0], dtype=torch.float64)
    _, nrm2, tr = cs.deflated_half(G, inv, L, R, None, torch.float16, fused=True)
    _, nrm2_r, tr_r = cs.deflated_half(G, inv, L, R, None, torch.float16, fused=False)
    torch.testing.assert_close(nrm2, nrm2_r, rtol=1e-4, atol=0)
    torch.testing.assert_close(tr, tr_r, rtol=1e-4, atol=1e-6)
    Y, sq, tr_y = cs.deflated_half(G, inv, L, R, scale, torch.float16, fused=True)
    Yr, _, _ = cs.deflated_half(G, inv, L, R, scale, torch.float16, fused=False)
    assert torch.equal(Y, Y.transpose(1, 2))
    ulp = torch.finfo(torch.float16).eps * Yr.float().abs()
    assert ((Y.float() - Yr.float()).abs() <= ulp + 1e-5).all()
    torch.testing.assert_close(sq, (Y.double() ** 2).sum((1, 2)), rtol=1e-6, atol=0)
    torch.testing.assert_close(tr_y, Y.double().diagonal(dim1=1, dim2=2).sum(-1), rtol=1e-6, atol=1e-6)
    # the projection removed V: Y V = 0 up to the rounding of Y
    assert (Y.double() @ V).abs().max() < 1e-2 * Y.double().abs().max()


@pytest.mark.parametrize("n,w", [(100, 32), (64, 20)])
def test_block_product_kernel_equals_a_float64_product(interpreted, n, w):
    """G @ Q from a float32 G and a float64 block, written in float64: float32 accuracy (the interpreter
    multiplies in float32; compiled, three TF32 passes get there), masks for n and w off the tile sizes."""
    g = torch.Generator().manual_seed(n)
    G = torch.randn(3, n, n, generator=g)
    Q = torch.randn(3, n, w, generator=g, dtype=torch.float64)
    Y = sk.times_block(G, Q, fused=True)
    ref = G.double() @ Q
    assert Y.dtype == torch.float64 and Y.shape == ref.shape
    assert (Y - ref).abs().max() < 1e-5 * (G.double().abs() @ Q.abs()).max()


def test_the_estimate_through_the_kernel_matches_float64_eigenvalues(interpreted):
    g = torch.Generator().manual_seed(3)
    X = torch.randn(3, 96, 200, generator=g)
    X[1, 0] *= 200  # a massive first row
    X[2] = torch.randn(96, 5, generator=g) @ torch.randn(5, 200, generator=g) + 0.05 * X[2]
    G = X.bfloat16().float() @ X.bfloat16().float().transpose(1, 2)
    ev = torch.linalg.eigvalsh(G.double()).clamp(min=0)
    p = ev / ev.sum(-1, keepdim=True)
    exact = -torch.xlogy(p, p).sum(-1)
    fused = estimate_spectrum(G, storage=torch.float16, fused=True)
    assert (fused.entropy - exact).abs().max() < 1e-3
    plain = estimate_spectrum(G, storage=torch.float16, fused=False)
    assert (fused.entropy - plain.entropy).abs().max() < 1e-5


def test_a_kernel_that_fails_to_build_falls_back_to_torch_once(monkeypatch):
    """Where the fused step is picked automatically (a GPU) and Triton cannot build it, the torch version
    runs instead, with one warning; the other kernels keep running; a forced kernel raises."""
    A, X = _pair(2, 40, seed=5)
    real = cs._kernels

    class Broken:
        def __getitem__(self, grid):
            raise RuntimeError("no kernel for this GPU")

    def broken_step():
        return [Broken(), *real()[1:]]  # the step kernel does not build; the deflation kernel does

    monkeypatch.setattr(cs, "triton_usable", lambda t: True)
    monkeypatch.setattr(cs, "_kernels", broken_step)
    monkeypatch.setattr(cs, "_FAILED", {})
    with pytest.warns(UserWarning, match="kernel 'step' failed"):
        Y, sq, _ = cs.cheb_step(A, X, None, torch.ones(2), 0.0)
    Yr, sqr, _ = cs.cheb_step(A, X, None, torch.ones(2), 0.0, fused=False)
    assert torch.equal(Y, Yr) and torch.equal(sq, sqr)
    assert list(cs._FAILED) == ["step"]
    cs.cheb_step(A, X, None, torch.ones(2), 0.0)  # no second attempt, no second warning
    assert list(cs._FAILED) == ["step"]
    assert cs._run_fused(True, lambda: "kernel", lambda: "torch", "thin") == "kernel"  # others still run
    with pytest.raises(RuntimeError, match="no kernel"):
        cs.cheb_step(A, X, None, torch.ones(2), 0.0, fused=True)


@pytest.mark.parametrize("n,w", [(100, 32), (64, 20)])
def test_cholesky_qr_kernel_equals_the_torch_version(interpreted, n, w):
    """One kernel per batch: Y^T Y, its shifted Cholesky factor and inverse in registers, Q = Y L^-T. The
    same Q as torch's factorization and triangular solve on well-conditioned blocks (columns scaled over
    three orders of magnitude), and finite, orthonormal where independent, on a block with dependent and
    zero columns."""
    g = torch.Generator().manual_seed(n + w)
    Y = torch.randn(3, n, w, generator=g, dtype=torch.float64) * torch.logspace(0, -3, w, dtype=torch.float64)
    Q = sk.cholqr(Y, fused=True)
    torch.testing.assert_close(Q, sk.cholqr(Y, fused=False), rtol=1e-8, atol=1e-10)
    eye = torch.eye(w, dtype=torch.float64)
    assert (Q.transpose(1, 2) @ Q - eye).abs().max() < 1e-6
    Y[1, :, 3] = Y[1, :, 0]  # dependent
    Y[2, :, 5:] = 0.0  # zero columns (the padding of a small block)
    Q = sk.cholqr(Y, fused=True)
    assert torch.isfinite(Q).all()
    assert (Q[2, :, 5:] == 0).all()
    torch.testing.assert_close(Q[2, :, :5].T @ Q[2, :, :5], eye[:5, :5], rtol=0, atol=1e-8)
    torch.testing.assert_close(Q[1, :, :3].T @ Q[1, :, :3], eye[:3, :3], rtol=0, atol=1e-8)
