"""The metric registry: every statistic the kernels produce has exactly one registered name, and the
registry itself loads without torch."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch

from mcr_exit.metrics import registry
from mcr_exit.metrics.attention import AttentionStats, summarize_heads
from mcr_exit.metrics.massive import TOP_TOKEN_STATISTICS
from mcr_exit.metrics.spectral import SpectralStats


def test_hidden_names_are_the_spectral_and_top_token_statistics():
    spectral = {f.name for f in dataclasses.fields(SpectralStats)}
    assert set(registry.HIDDEN_METRICS) == spectral | set(TOP_TOKEN_STATISTICS)


def test_attention_and_head_names_are_the_attention_statistics():
    stats = AttentionStats(**{f.name: torch.rand(2, 3) for f in dataclasses.fields(AttentionStats)})
    assert set(registry.ATTENTION_METRICS) == set(summarize_heads(stats, 0.3))
    assert set(registry.HEAD_METRICS) == {f.name for f in dataclasses.fields(AttentionStats)}


def test_keys_are_prefixed_unique_and_explained():
    keys = [m.key for kind in registry.KINDS for m in registry.REGISTRY[kind].values()]
    assert len(keys) == len(set(keys))
    assert all(k.split("/", 1)[0] in registry.KINDS for k in keys)
    for symbol in ("M", "R", "c", "alpha"):
        m = registry.metric("hidden", symbol)
        assert m.label and m.label != symbol and m.description
    assert registry.mlflow_key("summary", "loss", scope="baseline") == "summary/baseline/loss"


def test_an_unregistered_name_is_an_error_not_a_silent_drop():
    with pytest.raises(KeyError, match="not a registered hidden metric"):
        registry.keyed("hidden", {"entropy": 1.0, "entropyy": 2.0})


def test_the_layer_table_refuses_a_statistic_the_registry_lacks():
    import numpy as np

    from mcr_exit.analysis.collect import LayerStatistics
    from mcr_exit.analysis.profile import layer_table

    hidden = {k: np.zeros((1, 3)) for k in registry.HIDDEN_METRICS}
    hidden["new_metric"] = np.zeros((1, 3))
    stats = LayerStatistics(n_layers=2, n_heads=1, lengths=np.array([4]), hidden=hidden,
                            attention={k: np.zeros((1, 2)) for k in registry.ATTENTION_METRICS})
    with pytest.raises(KeyError, match="new_metric"):
        layer_table(stats)


def test_registry_imports_no_torch():
    code = "import sys, mcr_exit.metrics.registry; assert 'torch' not in sys.modules, 'torch loaded'"
    subprocess.run([sys.executable, "-c", code], check=True)
