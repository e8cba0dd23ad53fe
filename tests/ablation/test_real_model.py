"""End to end on the built-in SmolLM2-135M: ablating the `auto` block removes the massive activation,
lifts the entropy valley and drops the later sink rates (paper Figure 4)."""

from __future__ import annotations

import numpy as np
import pytest

from mcr_exit.analysis.ablation import Variant, find_spike_blocks, run_variant
from mcr_exit.data import load_prompts
from mcr_exit.models.tokens import encode_prompts, resolve_bos


@pytest.fixture(scope="module")
def prompt_ids(real_model):
    texts = load_prompts(None).texts[:6]
    return encode_prompts(real_model.tokenizer, texts, resolve_bos(real_model.tokenizer), 160).ids


def test_auto_ablation_removes_spike_compression_and_sinks(real_model, prompt_ids):
    blocks, log = find_spike_blocks(real_model, prompt_ids)
    assert 11 in blocks and max(blocks) == 11, log
    spike = max(blocks) + 1
    base = run_variant(real_model, prompt_ids, Variant(name="baseline", kind="baseline"))
    abl = run_variant(real_model, prompt_ids, Variant(name="ablate", kind="ablate", blocks=tuple(blocks)))
    b, a = base.table, abl.table
    assert b["norm_ratio"][spike] > 10 * a["norm_ratio"][spike]
    assert b["norm_ratio"][spike] > 50 and a["norm_ratio"][spike] < 5
    assert b["entropy"][spike] < 0.2 and a["entropy"][spike] > 1.0  # the valley is lifted
    later = slice(spike + 2, 26)  # blocks after the spike
    assert np.nanmean(b["sink_rate"][later]) > 0.6
    assert np.nanmean(a["sink_rate"][later]) < 0.2
    # positions before the ablated block are untouched
    np.testing.assert_allclose(a["bos_norm"][:spike], b["bos_norm"][:spike], rtol=1e-5)
    assert abl.loss > base.loss  # the model needs its sink
    for j in range(real_model.n_layers):
        assert not real_model.adapter.mlp_residual(j)._forward_hooks
