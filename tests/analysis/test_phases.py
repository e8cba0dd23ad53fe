"""Phase detection on synthetic profiles shaped like real ones."""

from __future__ import annotations

import numpy as np

from mcr_exit.analysis.phases import detect_phases, recommend_embedding_layer


def _profile(L=30, onset=12, end=29, bump=(3, 9)):
    ratio = np.full(L + 1, 1.2)
    ratio[bump[0] : bump[1] + 1] = 8.5  # the early bump, like SmolLM2's
    ratio[onset:end] = np.linspace(180, 40, end - onset)
    ratio[end:] = [12, 7][: L + 1 - end]
    ent = np.where(ratio > 20, 0.01, 0.5)
    ent[bump[0] : bump[1] + 1] = 0.25
    sink = np.zeros(L)
    sink[bump[0] : bump[1] + 1] = 0.35
    sink[onset:end] = 0.95
    bos = ratio * 100
    return dict(bos_norm=bos, norm_ratio=ratio, entropy=ent * 5, entropy_norm=ent, sink_rate=sink,
                c=ratio**2 / 50, alpha=np.full(L + 1, 0.2))


def test_main_onset_not_the_early_bump():
    p = detect_phases(**_profile())
    assert p.found
    assert p.compress_start == p.massive_activation_layer == p.entropy_valley_layer == p.sink_surge_layer == 12
    assert p.refine_start == 29
    assert p.carrier == "norm"
    assert p.corr_bos_entropy < -0.5 and p.corr_bos_sink_lag1 > 0.5
    k, _ = recommend_embedding_layer(p)
    assert 12 <= k < 29
    assert p.fractions()["compress_start"] == 12 / 30


def test_alignment_carrier():
    prof = _profile()
    prof["c"] = np.full(31, 0.05)
    prof["alpha"] = np.full(31, 0.9)
    assert detect_phases(**prof).carrier == "alignment"


def test_no_massive_activation():
    L = 4
    p = detect_phases(bos_norm=np.ones(L + 1), norm_ratio=np.full(L + 1, 1.1), entropy=np.ones(L + 1),
                      entropy_norm=np.full(L + 1, 0.5), sink_rate=np.zeros(L), c=np.ones(L + 1),
                      alpha=np.zeros(L + 1))
    assert not p.found and "no massive activation" in p.note and p.compress_start is None
    assert recommend_embedding_layer(p)[0] == 2
