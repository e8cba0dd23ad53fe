"""The hook path on tiny models of every family: hidden states, early exit, streamed attention statistics."""

from __future__ import annotations

import pytest
import torch

from mcr_exit.metrics.attention import attention_head_stats
from mcr_exit.models.attention_stats import collect_attention_stats
from mcr_exit.models.forward import hidden_at, run_blocks
from mcr_exit.models.tokens import collate

PROMPTS = [
    [2, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20],
    [2, 30, 31, 32, 33, 34, 35],
    [2, 40, 41, 42, 43, 44, 45, 46, 47, 48],
]


def _batch(prompts=PROMPTS):
    return collate(prompts, pad_id=0)


def _collect(loaded, ids, mask):
    hidden, attn = {}, {}
    with collect_attention_stats(loaded.adapter, mask.sum(1), lambda j, s: attn.__setitem__(j, s)):
        final = run_blocks(loaded.adapter, ids, mask, lambda i, h: hidden.__setitem__(i, h.clone()))
    return hidden, attn, final


def test_hidden_states_follow_the_index_convention(tiny_loaded):
    ids, mask = _batch()
    hidden, _, final = _collect(tiny_loaded, ids, mask)
    L = tiny_loaded.n_layers
    assert sorted(hidden) == list(range(L + 1))
    with torch.no_grad():
        ref = tiny_loaded.adapter.backbone(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    for i in range(L):  # transformers' hidden_states[i], i < L, are raw block outputs
        torch.testing.assert_close(hidden[i], ref.hidden_states[i])
    # hidden[L] is the raw last block output: the final norm of it is transformers' last hidden state
    with torch.no_grad():
        normed = tiny_loaded.adapter.ln_final(hidden[L])
    torch.testing.assert_close(normed, ref.last_hidden_state)
    torch.testing.assert_close(final, ref.last_hidden_state)
    assert not torch.allclose(hidden[L], ref.last_hidden_state)


def test_streamed_attention_statistics_equal_eager_output_attentions(tiny_loaded):
    ids, mask = _batch()
    _, attn, _ = _collect(tiny_loaded, ids, mask)
    model = tiny_loaded.model
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            ref = tiny_loaded.adapter.backbone(input_ids=ids, attention_mask=mask, output_attentions=True)
    finally:
        model.set_attn_implementation(previous)
    assert model.config._attn_implementation == previous
    lengths = mask.sum(1)
    assert sorted(attn) == list(range(tiny_loaded.n_layers))
    for j, probs in enumerate(ref.attentions):
        want = attention_head_stats(probs.double(), lengths)
        got = attn[j]
        for key in ("sink_score", "mixing_score", "colsum_concentration", "diag_score"):
            torch.testing.assert_close(getattr(got, key).double(), getattr(want, key), atol=1e-5, rtol=1e-5)


def test_streamed_statistics_do_not_change_the_model_output(tiny_loaded):
    ids, mask = _batch()
    _, _, final = _collect(tiny_loaded, ids, mask)
    with torch.no_grad():
        ref = tiny_loaded.adapter.backbone(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(final[real], ref[real], atol=1e-5, rtol=1e-4)


def test_batched_equals_unbatched(tiny_loaded):
    ids, mask = _batch()
    hidden, attn, _ = _collect(tiny_loaded, ids, mask)
    for b, prompt in enumerate(PROMPTS):
        one_ids, one_mask = _batch([prompt])
        h1, a1, _ = _collect(tiny_loaded, one_ids, one_mask)
        n = len(prompt)
        for i in h1:
            torch.testing.assert_close(hidden[i][b, :n], h1[i][0], atol=1e-5, rtol=1e-4)
        for j in a1:
            torch.testing.assert_close(attn[j].sink_score[b], a1[j].sink_score[0], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(attn[j].mixing_score[b], a1[j].mixing_score[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("k", [0, 1, 2])
def test_early_exit_runs_only_the_first_k_blocks(tiny_loaded, k):
    ids, mask = _batch()
    calls = []
    handles = [
        block.register_forward_hook(lambda m, a, o, j=j: calls.append(j))
        for j, block in enumerate(tiny_loaded.adapter.blocks)
    ]
    try:
        h = hidden_at(tiny_loaded.adapter, ids, mask, k)
    finally:
        for hd in handles:
            hd.remove()
    assert calls == list(range(k))  # blocks k.. never completed a forward
    full, _, _ = _collect(tiny_loaded, ids, mask)
    torch.testing.assert_close(h, full[k])


def test_hooks_are_removed_after_the_pass(tiny_loaded):
    ids, mask = _batch()
    before = [(len(b._forward_hooks), len(b._forward_pre_hooks)) for b in tiny_loaded.adapter.blocks]
    hidden_at(tiny_loaded.adapter, ids, mask, 1)
    with pytest.raises(RuntimeError):  # an error inside a hook still removes every hook
        run_blocks(tiny_loaded.adapter, ids, mask, lambda i, h: (_ for _ in ()).throw(RuntimeError("boom")))
    after = [(len(b._forward_hooks), len(b._forward_pre_hooks)) for b in tiny_loaded.adapter.blocks]
    assert after == before


def test_fused_statistics_equal_the_chunked_softmax(tiny_models, tokenizer):
    """The normalizer-based path (flash attention on GPUs) computes the same statistics."""
    from mcr_exit.models import from_objects

    for family in ("llama", "qwen2", "gpt_neox", "gpt2"):  # plain causal attention (gemma3 has windows)
        loaded = from_objects(tiny_models[family], tokenizer)
        ids, mask = _batch()
        got = {}
        for method in ("chunked", "fused"):
            stats, hidden = {}, {}
            with collect_attention_stats(loaded.adapter, mask.sum(1), lambda j, s: stats.__setitem__(j, s),
                                         method=method):
                run_blocks(loaded.adapter, ids, mask, lambda i, h: hidden.__setitem__(i, h.clone()))
            got[method] = (stats, hidden)
        for j in got["chunked"][0]:
            for key in ("sink_score", "mixing_score", "colsum_concentration", "diag_score"):
                torch.testing.assert_close(getattr(got["fused"][0][j], key), getattr(got["chunked"][0][j], key),
                                           atol=2e-5, rtol=1e-4, msg=f"{family} block {j} {key}")
        real = mask.bool()
        for i in got["chunked"][1]:
            torch.testing.assert_close(got["fused"][1][i][real], got["chunked"][1][i][real], atol=1e-4, rtol=1e-4)


def test_cpu_pool_spectral_backend_equals_device(tiny_loaded, monkeypatch):
    """The benchmark-only thread-pool backend (benchmarks/spectral_backends.py), registered from outside."""
    import pathlib
    import sys

    import numpy as np

    from mcr_exit.analysis.collect import REDUCERS, collect_statistics

    monkeypatch.syspath_prepend(str(pathlib.Path(__file__).resolve().parents[2] / "benchmarks"))
    assert "cpu-pool" not in REDUCERS  # not part of the package
    monkeypatch.setattr("mcr_exit.analysis.collect.REDUCERS", dict(REDUCERS))
    sys.modules.pop("spectral_backends", None)
    import spectral_backends  # noqa: F401

    ids = [p for p in PROMPTS]
    a = collect_statistics(tiny_loaded, ids, spectral_backend="device")
    b = collect_statistics(tiny_loaded, ids, spectral_backend="cpu-pool")
    a1 = collect_statistics(tiny_loaded, ids, spectral_backend="device", max_batch=1)
    c = collect_statistics(tiny_loaded, ids, spectral_backend="cpu-pool", max_batch=1)  # batches in flight
    for key in ("entropy", "anisotropy", "norm_ratio", "entropy_bound"):
        np.testing.assert_allclose(a.hidden[key], b.hidden[key], rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(a1.hidden[key], c.hidden[key], rtol=1e-9, atol=1e-12)


def test_estimate_spectral_backend_matches_exact_eigenvalues(tiny_loaded, monkeypatch):
    """The GPU default, forced on the CPU for tiny Gram matrices: same statistics, entropy within 1e-3."""
    import numpy as np

    from mcr_exit.analysis import collect
    from mcr_exit.analysis.collect import collect_statistics

    monkeypatch.setattr(collect, "ESTIMATE_MIN_SIZE", 0)
    ids = [p for p in PROMPTS]
    a = collect_statistics(tiny_loaded, ids, spectral_backend="device")
    b = collect_statistics(tiny_loaded, ids, spectral_backend="estimate", spectral_options={"chunk": 5})
    assert np.abs(a.hidden["entropy"] - b.hidden["entropy"]).max() < 1e-3
    # one prompt per batch: chunks of Gram matrices span batches, and batches are read out once their
    # chunk is estimated (a chunk larger than everything waits for the end)
    for chunk in (5, 10_000):
        done = []
        c = collect_statistics(tiny_loaded, ids, max_batch=1, spectral_backend="estimate",
                               spectral_options={"chunk": chunk}, progress=done.append)
        assert sum(done) == len(ids) and not np.isnan(c.hidden["entropy"]).any()
        np.testing.assert_allclose(c.hidden["entropy"], b.hidden["entropy"], atol=1e-6)  # batching: float32
        np.testing.assert_allclose(c.attention["sink_score"], a.attention["sink_score"], atol=1e-6)
    assert np.abs(a.final_normed["entropy"] - b.final_normed["entropy"]).max() < 1e-3
    for key in ("anisotropy", "norm_ratio", "sigma1_sq", "alpha", "entropy_bound"):
        np.testing.assert_allclose(a.hidden[key], b.hidden[key], rtol=1e-6, atol=1e-9)


def test_spectra_choice_resolves_by_device():
    import pytest

    from mcr_exit.analysis.collect import spectral_backend_for

    assert spectral_backend_for("auto", "cpu") == "device"
    assert spectral_backend_for("auto", "cuda") == "estimate"
    assert spectral_backend_for("exact", "cuda") == "device"
    assert spectral_backend_for("estimate", "cpu") == "estimate"
    with pytest.raises(ValueError, match="unknown spectra method"):
        spectral_backend_for("fast", "cpu")
