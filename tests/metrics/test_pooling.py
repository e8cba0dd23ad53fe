"""The pooling that skips every massive activation (mean_no_massive) against mean_no_first."""

from __future__ import annotations

import pytest
import torch

from mcr_exit.metrics.pooling import pool_hidden


def _rows():
    """Two right-padded rows: row 0 with a spike at position 3 (a delimiter, say) and a large but not
    massive token at position 1; row 1 with a spike at position 0, then padding."""
    torch.manual_seed(0)
    h = torch.randn(2, 6, 8)
    h[0] = h[0] / h[0].norm(dim=-1, keepdim=True)  # unit norms
    h[0, 3] *= 500.0
    h[0, 1] *= 9.0  # ratio 9 to the median: below the rule's 10
    h[1, :4] = h[1, :4] / h[1, :4].norm(dim=-1, keepdim=True)
    h[1, 0] *= 1000.0
    h[1, 4:] = 1e4  # padding
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    return h, mask


def test_every_massive_token_is_left_out_wherever_it_sits():
    h, mask = _rows()
    out = pool_hidden(h, mask, "mean_no_massive")
    assert torch.allclose(out[0], h[0, [0, 1, 2, 4, 5]].mean(0), atol=1e-6)  # the spike at 3 out, 9x kept
    assert torch.allclose(out[1], h[1, 1:4].mean(0), atol=1e-6)
    first = pool_hidden(h, mask, "mean_no_first")
    assert torch.allclose(first[1], out[1], atol=1e-6)  # the spike at position 0: the same vector
    assert first[0].norm() > 50 * out[0].norm()  # mean_no_first keeps the delimiter's spike


def test_the_rule_threshold_is_a_parameter():
    h, mask = _rows()
    strict = pool_hidden(h, mask, "mean_no_massive", massive_ratio=5.0)
    assert torch.allclose(strict[0], h[0, [0, 2, 4, 5]].mean(0), atol=1e-6)  # the 9x token goes too


def test_batched_equals_unbatched_and_short_rows_keep_their_median_token():
    h, mask = _rows()
    both = pool_hidden(h, mask, "mean_no_massive")
    alone = pool_hidden(h[1:, :4], mask[1:, :4], "mean_no_massive")
    assert torch.allclose(both[1], alone[0], atol=1e-6)
    one = torch.randn(1, 1, 8)
    assert torch.allclose(pool_hidden(one, torch.ones(1, 1), "mean_no_massive"), one[:, 0])
    two = torch.stack([torch.ones(8) * 100, torch.ones(8)])[None]  # two tokens: the lower median is the small one
    assert torch.allclose(pool_hidden(two, torch.ones(1, 2), "mean_no_massive"), two[:, 1])


@pytest.mark.parametrize("pooling", ["mean_no_first", "mean_no_massive", "mean", "last"])
def test_every_pooling_is_finite_and_normalizes(pooling):
    h, mask = _rows()
    out = pool_hidden(h, mask, pooling, normalize=True)
    assert torch.isfinite(out).all() and torch.allclose(out.norm(dim=-1), torch.ones(2))
