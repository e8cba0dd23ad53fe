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


def test_fisher_intervals_and_pooling():
    import math

    from mcr_exit.metrics.correlation import fisher_z_interval, fisher_z_pooled

    lo, hi = fisher_z_interval(0.5, 28)
    assert lo < 0.5 < hi and math.isclose(math.atanh(hi) - math.atanh(0.5), 1.959964 / 5, rel_tol=1e-6)
    assert all(math.isnan(v) for v in fisher_z_interval(0.5, 3))
    r, lo2, hi2 = fisher_z_pooled([0.5, 0.5], [28, 28])
    assert math.isclose(r, 0.5) and lo < lo2 < 0.5 < hi2 < hi  # two models: a narrower interval
    r, _, _ = fisher_z_pooled([-0.9, -0.3], [103, 13])  # weighted toward the model with more pairs
    assert -0.9 < r < math.tanh((math.atanh(-0.9) + math.atanh(-0.3)) / 2)
    assert math.isnan(fisher_z_pooled([float("nan")], [10])[0])
