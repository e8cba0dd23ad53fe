"""Attention statistics on matrices with known answers."""

from __future__ import annotations

import math

import pytest
import torch

from mcr_exit.metrics.attention import HeadStatsAccumulator, attention_head_stats, summarize_heads


def _sink(T):
    A = torch.zeros(1, 1, T, T)
    A[..., 0] = 1.0
    return A


def _uniform(T):
    return torch.tril(torch.ones(T, T)) / torch.arange(1, T + 1)[:, None]


def test_all_mass_on_column_zero_is_a_perfect_sink():
    s = attention_head_stats(_sink(9))
    assert s.sink_score.item() == pytest.approx(1.0)
    assert s.mixing_score.item() == pytest.approx(0.0, abs=1e-7)
    assert s.colsum_concentration.item() == pytest.approx(1.0)
    assert s.svi.item() == pytest.approx(1.0)
    assert summarize_heads(s, 0.3)["sink_rate"].item() == 1.0


def test_uniform_causal_attention_mixes_fully():
    T = 12
    s = attention_head_stats(_uniform(T)[None, None])
    assert s.mixing_score.item() == pytest.approx(1.0, abs=1e-6)
    assert s.sink_score.item() == pytest.approx(sum(1 / (t + 1) for t in range(T)) / T, rel=1e-6)


def test_identity_head():
    T = 8
    s = attention_head_stats(torch.eye(T)[None, None])
    assert s.diag_score.item() == pytest.approx((T - 1) / T)
    assert s.sink_score.item() == pytest.approx(1 / T)
    assert s.b_plus_d.item() == pytest.approx(1.0)
    assert s.colsum_concentration.item() == pytest.approx(0.0, abs=1e-6)


def test_colsum_concentration_lower_bound_from_the_paper():
    """C >= C_min(c0) when the non-BOS mass is spread uniformly (App. B.2)."""
    T = 16
    for w in (0.2, 0.5, 0.9):
        A = (1 - w) * _uniform(T)
        A[:, 0] += w
        s = attention_head_stats(A[None, None])
        c0 = s.sink_score.item()
        cmin = 1 + (c0 * math.log(c0) + (1 - c0) * math.log((1 - c0) / (T - 1))) / math.log(T)
        assert s.colsum_concentration.item() >= cmin - 1e-6


def test_sink_rate_counts_heads_at_or_above_tau():
    A = torch.stack([_sink(6)[0, 0], _uniform(6), torch.eye(6)])[None]
    s = attention_head_stats(A)
    assert summarize_heads(s, 0.3)["sink_rate"].item() == pytest.approx(2 / 3)  # sink, uniform (0.41)
    assert summarize_heads(s, 1.0)["sink_rate"].item() == pytest.approx(1 / 3)


def test_chunked_accumulation_equals_one_shot_and_ignores_padding():
    torch.manual_seed(0)
    B, H, T = 2, 3, 10
    logits = torch.randn(B, H, T, T)
    logits = logits.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
    A = logits.softmax(-1)
    lengths = torch.tensor([10, 7])
    one = attention_head_stats(A, lengths)
    acc = HeadStatsAccumulator(lengths, H, T)
    for q0 in range(0, T, 3):
        acc.add(A[:, :, q0 : q0 + 3], q0)
    chunked = acc.result()
    for key in ("sink_score", "mixing_score", "colsum_concentration", "diag_score"):
        torch.testing.assert_close(getattr(chunked, key), getattr(one, key))
    # prompt 1 alone (its first 7 rows renormalized are already causal rows over real keys)
    alone = attention_head_stats(A[1:, :, :7, :7], torch.tensor([7]))
    torch.testing.assert_close(one.sink_score[1], alone.sink_score[0])
    torch.testing.assert_close(one.mixing_score[1], alone.mixing_score[0])
