"""Spectral metrics against closed forms, the SVD reference, and the paper's bounds."""

from __future__ import annotations

import math

import pytest
import torch

from mcr_exit.metrics.spectral import spectral_stats


def test_rank_one_matrix_has_zero_entropy_and_full_anisotropy():
    u = torch.randn(12, 1, dtype=torch.float64)
    v = torch.randn(1, 32, dtype=torch.float64)
    s = spectral_stats(u @ v)
    assert s.entropy.item() == pytest.approx(0.0, abs=1e-9)
    assert s.anisotropy.item() == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("r,d", [(4, 16), (8, 8), (6, 64)])
def test_orthogonal_rows_of_equal_norm_give_log_r(r, d):
    q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))
    X = 3.0 * q[:r]
    s = spectral_stats(X)
    assert s.entropy.item() == pytest.approx(math.log(r), rel=1e-9)
    assert s.entropy_norm.item() == pytest.approx(1.0, rel=1e-9)
    assert s.anisotropy.item() == pytest.approx(1.0 / r, rel=1e-9)


def test_matches_svd_reference():
    X = torch.randn(20, 48, dtype=torch.float64)
    X[0] *= 40
    sv = torch.linalg.svdvals(X) ** 2
    p = sv / sv.sum()
    ref_h = -(p * p.log()).sum()
    s = spectral_stats(X)
    assert s.entropy.item() == pytest.approx(ref_h.item(), rel=1e-9)
    assert s.sigma1_sq.item() == pytest.approx(sv[0].item(), rel=1e-9)
    assert s.bos_norm.item() == pytest.approx(X[0].norm().item(), rel=1e-12)
    assert s.other_norm.item() == pytest.approx(X[1:].norm(dim=1).mean().item(), rel=1e-12)


@pytest.mark.parametrize("seed", range(8))
def test_bounds_never_exceed_measured_values(seed):
    g = torch.Generator().manual_seed(seed)
    T, d = (30, 16) if seed % 2 else (10, 64)
    X = torch.randn(T, d, generator=g, dtype=torch.float64)
    X[0] *= [1, 5, 50, 500][seed % 4]  # from no massive activation to a dominant one
    X[1:] += 0.3 * X[0] / X[0].norm() * (seed % 3)  # some alignment with x_0
    s = spectral_stats(X)
    tol = 1e-9
    assert s.sigma1_sq >= s.sigma1_sq_bound * (1 - tol)  # Theorem 1
    assert s.sigma1_sq_bound >= s.sigma1_sq_bound_weak
    assert s.anisotropy >= s.anisotropy_bound - tol  # Corollary 2
    assert s.anisotropy_bound >= s.anisotropy_bound_weak - tol
    assert s.dominance >= s.dominance_bound * (1 - tol)
    assert s.entropy <= s.entropy_bound + tol
    assert s.entropy_bound <= s.entropy_bound_weak + tol
    assert 0.0 <= s.alpha.item() <= 1.0


def test_bounds_are_tight_for_a_massive_row():
    X = torch.randn(16, 32, dtype=torch.float64)
    X[0] = 0
    X[0, 3] = 1e4
    s = spectral_stats(X)
    assert s.anisotropy.item() == pytest.approx(s.anisotropy_bound.item(), abs=1e-6)
    assert s.entropy.item() == pytest.approx(s.entropy_bound.item(), abs=5e-3)


def test_padding_never_enters():
    X = torch.randn(2, 10, 24, dtype=torch.float64)
    X[1, 6:] = 1e6  # garbage in the padded rows of prompt 1
    lengths = torch.tensor([10, 6])
    batched = spectral_stats(X, lengths)
    alone = spectral_stats(X[1, :6])
    for key, val in alone.as_dict().items():
        torch.testing.assert_close(batched.as_dict()[key][1], val[0], msg=key)
    assert batched.entropy_norm[1].item() == pytest.approx(alone.entropy.item() / math.log(6))
