import numpy as np
import pytest

from mcr_exit.metrics.correlation import delta_correlation, fisher_z_mean


def test_delta_correlation_sign_and_lag():
    b = np.array([1, 1, 1, 100, 100, 100, 50, 10.0])
    e = -np.log(b)
    assert delta_correlation(b, e) == pytest.approx(-1.0, abs=0.1)
    s = np.concatenate([[0.0], (b[:-1] > 10).astype(float)])  # sink rate follows one layer later
    assert delta_correlation(b, s, lag=1) > 0.9
    assert np.isnan(delta_correlation([1, 1, 1], [1, 2, 3]))


def test_fisher_z_mean():
    r, sd = fisher_z_mean([0.5, 0.5, 0.5])
    assert r == pytest.approx(0.5)
    assert sd == pytest.approx(0.0)
    assert fisher_z_mean([0.9, 0.1])[0] == pytest.approx(np.tanh((np.arctanh(0.9) + np.arctanh(0.1)) / 2))
