"""The pure part of `--blocks auto`: which blocks count as stages of the spike."""

from __future__ import annotations

import numpy as np

from mcr_exit.analysis.ablation import SpikeScan, clip_gammas, spike_stages


def _scan(bos, mlp_bos, other=1.0, mlp_other=1.0):
    bos = np.asarray(bos, float)
    return SpikeScan(bos_norm=bos, other_norm=np.full_like(bos, other), bos_max_abs=bos,
                     mlp_bos=np.asarray(mlp_bos, float), mlp_other=np.full(len(mlp_bos), mlp_other))


def test_multi_stage_spike_finds_every_stage():
    # Pythia-like: block 0 and blocks 5-7 build the spike; hidden 8 peaks; block 9 shrinks it.
    bos = [1, 300, 300, 300, 300, 300, 500, 800, 1000, 200, 200]
    mlp = [290, 2, 2, 2, 2, 210, 300, 250, 3, 900]
    assert spike_stages(_scan(bos, mlp)) == [0, 5, 6, 7]
    assert spike_stages(_scan(bos, mlp), exclude=(0,)) == [5, 6, 7]


def test_early_bump_and_uniform_writes_are_not_stages():
    bos = [1, 8, 8, 8, 2, 2, 180, 180]
    mlp = [7, 1, 1, 1, 1, 178, 1]
    assert spike_stages(_scan(bos, mlp)) == [5]
    # a block writing as much into every token is not building a BOS-specific spike
    assert spike_stages(_scan(bos, mlp, mlp_other=100.0)) == []


def test_no_massive_activation_no_stage():
    assert spike_stages(_scan([1, 3, 5, 4], [2, 2, 1])) == []


def test_clip_gammas_span_three_decades():
    g = clip_gammas(20000.0)
    assert len(g) == 7 and g[0] == 10000.0 and abs(g[-1] - 20.0) < 1e-9
    assert all(a > b for a, b in zip(g, g[1:]))
