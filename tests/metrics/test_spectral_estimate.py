"""The matrix-product estimate of entropy and top eigenvalues against exact float64 eigenvalues."""

from __future__ import annotations

import math

import pytest
import torch

from mcr_exit.metrics.spectral import _terms_from_gram, finish_spectral, spectral_stats, spectral_terms
from mcr_exit.metrics.spectral_estimate import estimate_spectrum, interpolation_error


def _exact(G: torch.Tensor):
    ev = torch.linalg.eigvalsh(G.double()).clamp(min=0)
    p = ev / ev.sum(-1, keepdim=True)
    return -torch.xlogy(p, p).sum(-1), ev.flip(-1)[:, :3]


def _hidden_like(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """(6, n, d) bf16-rounded matrices shaped like hidden states: noise, a massive first row, a mean
    shift, power-law spectra (exponents 0.5 and 1) and a low-rank matrix plus noise."""
    g = torch.Generator().manual_seed(seed)
    out = [torch.randn(n, d, generator=g)]
    X = torch.randn(n, d, generator=g)
    X[0] *= 300
    out.append(X)
    out.append(torch.randn(n, d, generator=g) + 3 * torch.randn(d, generator=g))
    U = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64)).Q.float()
    for e in (0.5, 1.0):
        out.append((U * torch.arange(1, n + 1.0) ** -e) @ torch.randn(n, d, generator=g) / math.sqrt(d))
    out.append(torch.randn(n, 6, generator=g) @ torch.randn(6, d, generator=g) + 0.05 * torch.randn(n, d, generator=g))
    return torch.stack(out).bfloat16()


def test_interpolation_error_shrinks_as_one_over_degree_squared():
    errs = {D: interpolation_error(D) for D in (16, 32, 64)}
    assert errs[64] < 1.2e-4
    assert 3.0 < errs[32] / errs[64] < 5.0 and 3.0 < errs[16] / errs[32] < 5.0


@pytest.mark.parametrize("storage", [torch.float64, torch.float16])
def test_entropy_and_top_eigenvalues_match_float64_eigenvalues(storage):
    X = _hidden_like(320, 640).float()
    G = X @ X.transpose(1, 2)
    H, top = _exact(G)
    est = estimate_spectrum(G, storage=storage)
    assert (est.entropy - H).abs().max() < 1e-3
    assert torch.allclose(est.top, top, rtol=1e-3)
    assert torch.allclose(est.total, G.double().diagonal(dim1=-2, dim2=-1).sum(-1), rtol=1e-6)
    assert int(est.deflated[1]) >= 1  # the massive direction is deflated exactly


def test_a_low_degree_interpolant_is_caught_by_the_same_check():
    X = _hidden_like(320, 640).float()
    G = X @ X.transpose(1, 2)
    H, _ = _exact(G)
    est = estimate_spectrum(G, degree=2, width=1, iterations=1)
    assert (est.entropy - H).abs().max() > 1e-2


def test_closed_forms_zero_matrix_rank_one_and_padding():
    n = 300
    u = torch.randn(n, 1, dtype=torch.float64)
    rank1 = u @ u.T
    eye = torch.eye(n, dtype=torch.float64)
    padded = torch.zeros(n, n, dtype=torch.float64)
    padded[:200, :200] = torch.eye(200, dtype=torch.float64)  # 100 padding rows and columns
    est = estimate_spectrum(torch.stack([torch.zeros(n, n, dtype=torch.float64), rank1, eye, padded]))
    assert torch.isfinite(est.entropy).all()
    assert est.entropy[0] == 0.0
    assert est.entropy[1] == pytest.approx(0.0, abs=1e-6)
    assert est.entropy[2] == pytest.approx(math.log(n), abs=1e-3)
    assert est.entropy[3] == pytest.approx(math.log(200), abs=1e-3)


def test_finish_spectral_from_a_summary_equals_the_exact_path_except_entropy_rounding():
    X = _hidden_like(300, 400)
    lengths = torch.tensor([300, 250, 300, 280, 300, 300])
    terms, gram = spectral_terms(X, lengths)
    exact = spectral_stats(X, lengths)
    est = finish_spectral(terms, estimate_spectrum(gram))
    for key, val in exact.as_dict().items():
        tol = 1e-3 if key in ("entropy", "entropy_norm", "sigma2_sq", "sigma3_sq") else 1e-6
        got = est.as_dict()[key]
        assert torch.allclose(got, val, rtol=tol, atol=tol if "entropy" in key else 0, equal_nan=True), key


def test_terms_read_off_a_float32_gram_equal_the_float64_terms():
    X = _hidden_like(64, 96)
    lengths = torch.tensor([64, 40, 64, 10, 64, 64])
    valid = torch.arange(64)[None, :] < lengths[:, None]
    ref, gram_ref = spectral_terms(X, lengths)
    got, gram = _terms_from_gram(X, lengths, valid, torch.float64)
    for key in ref:
        assert torch.allclose(got[key], ref[key], rtol=1e-5, equal_nan=True), key
    assert torch.allclose(gram.double(), gram_ref, rtol=1e-5, atol=1e-3)


def test_graph_cache_captures_repeated_shapes_keeps_two_per_phase_and_replays_on_new_inputs(monkeypatch):
    """The CUDA-graph bookkeeping of the estimate, on the CPU with a stand-in for the graph (replay reruns
    the captured function on its static inputs, into its static outputs, as a CUDA graph does): a shape
    is captured on its second call in a row, replayed on new inputs after that, two shapes per phase
    are kept, and every result equals the eager estimate."""
    from mcr_exit.metrics import spectral_estimate as se

    class Replayable:
        def __init__(self, fn, static, options):
            self.fn, self.static, self.options = fn, static, options
            self.out = fn(*static, **options)
            self.replays = 0

        def replay(self):
            for o, new in zip(self.out, self.fn(*self.static, **self.options)):
                o.copy_(new)
            self.replays += 1

    def capture(fn, static, options):
        g = Replayable(fn, static, options)
        return g, g.out

    for name, value in (("_GRAPHS", {}), ("_LAST", {}), ("_STATIC", {}), ("_GRAPHS_FAILED", [])):
        monkeypatch.setattr(se, name, value)
    monkeypatch.setattr(se, "_capture", capture)
    monkeypatch.setattr(se, "_use_graphs", lambda G, graphs: graphs is not False)  # on CPU tensors too
    X = _hidden_like(300, 400).float()
    G = X @ X.transpose(1, 2)
    calls = [G[:4], 2 * G[:4], 3 * G[:4], G[:2], G[:2], 5 * G[:4], G[:3], G[:3], G[:3]]
    for i, g in enumerate(calls):
        got = estimate_spectrum(g, storage=torch.float16)
        ref = estimate_spectrum(g, storage=torch.float16, graphs=False)
        torch.testing.assert_close(got.entropy, ref.entropy, rtol=0, atol=1e-12, msg=f"call {i}")
        torch.testing.assert_close(got.top, ref.top, rtol=0, atol=0, msg=f"call {i}")
        if i == 1:  # the second call of a shape is captured
            assert len(se._GRAPHS) == 2
    kept = sorted((key[0][0], key[1][0][0]) for key in se._GRAPHS)
    # shape 2 is out: the least recently used when 3 was captured (4 was replayed after 2's capture)
    assert kept == [("rest", 3), ("rest", 4), ("top", 3), ("top", 4)]
    assert all(entry[0].replays >= 1 for entry in se._GRAPHS.values())  # the third call of 3 replayed
