"""Served embeddings run only the first k blocks and equal the analysis side's hidden[k], pooled alike."""

from __future__ import annotations

import asyncio
from contextlib import contextmanager

import pytest
import torch

from mcr_exit.models import from_objects
from mcr_exit.models.forward import hidden_at
from mcr_exit.models.tokens import collate
from mcr_exit.serving import Engine, EngineConfig
from mcr_exit.metrics.pooling import pool_hidden


@contextmanager
def block_call_counter(adapter):
    """Count forward calls per block; hooks removed in finally."""
    counts = [0] * adapter.n_layers
    handles = [b.register_forward_hook(lambda *_a, i=i: counts.__setitem__(i, counts[i] + 1))
               for i, b in enumerate(adapter.blocks)]
    try:
        yield counts
    finally:
        for h in handles:
            h.remove()


async def _embed(engine, texts, counter_of=None, **kw):
    """Embed on a started engine; with ``counter_of``, count block calls of the request only (the start
    runs one full-depth probe forward to size the KV pool)."""
    await engine.astart()
    try:
        if counter_of is None:
            return await engine.embed(engine.encode_texts(texts), **kw)
        with block_call_counter(counter_of) as counts:
            await engine.embed(engine.encode_texts(texts), **kw)
        return counts
    finally:
        await engine.astop()


def test_later_blocks_are_never_called(tiny4):
    engine = Engine(tiny4, None, EngineConfig(warmup=False), embedding_layer=2)
    counts = asyncio.run(_embed(engine, ["one prompt", "and another prompt"], tiny4.adapter))
    assert counts == [1, 1, 0, 0]  # one batch; blocks 3 and 4 (0-based 2, 3) skipped
    assert engine.metrics.get("mcr_exit_blocks_executed_total", kind="embedding") == 2


def test_layer_zero_runs_no_block_and_full_depth_runs_all(tiny4):
    engine = Engine(tiny4, None, EngineConfig(warmup=False), embedding_layer=0)
    assert asyncio.run(_embed(engine, ["x y z"], tiny4.adapter)) == [0, 0, 0, 0]
    counts = asyncio.run(_embed(engine, ["x y z"], tiny4.adapter, layer=4))
    assert counts == [1, 1, 1, 1]


@pytest.mark.parametrize("pooling", ["mean_no_first", "mean_no_massive", "mean", "last"])
def test_equal_to_hidden_at_for_every_family(tiny_models, tokenizer, family, pooling):
    loaded = from_objects(tiny_models[family], tokenizer, name=f"tiny-{family}")
    k = loaded.n_layers - 1
    engine = Engine(loaded, None, EngineConfig(warmup=False, max_batch_tokens=16), embedding_layer=k)
    texts = ["The quick brown fox jumps over the lazy dog.", "3 + 5 = 8", "def add(a, b):"]
    got = asyncio.run(_embed(engine, texts, pooling=pooling)).vectors
    for text, vec in zip(texts, got):  # unbatched reference: right padding keeps batches exact
        ids, mask = collate(engine.encode_texts([text]), engine.pad_id)
        ref = pool_hidden(hidden_at(loaded.adapter, ids, mask, k), mask, pooling, normalize=True)[0]
        torch.testing.assert_close(torch.from_numpy(vec), ref, atol=1e-5, rtol=1e-4)


def test_mean_pool_skips_position_zero():
    h = torch.zeros(2, 3, 2)
    h[:, 0] = 1000.0  # a massive activation at position 0
    h[0, 1], h[0, 2], h[1, 1] = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), torch.tensor([2.0, 2.0])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    out = pool_hidden(h, mask, "mean_no_first", normalize=False)
    torch.testing.assert_close(out, torch.tensor([[0.5, 0.5], [2.0, 2.0]]))
    every = pool_hidden(h, mask, "mean", normalize=False)  # position 0 counted
    torch.testing.assert_close(every, torch.tensor([[1001 / 3, 1001 / 3], [501.0, 501.0]]))
    single = pool_hidden(h[:1, :1], mask[:1, :1], "mean_no_first", normalize=False)
    torch.testing.assert_close(single, torch.tensor([[1000.0, 1000.0]]))  # one token: keep it
    last = pool_hidden(h, mask, "last", normalize=True)
    torch.testing.assert_close(last.norm(dim=1), torch.ones(2))


def test_the_profile_s_massive_activation_rule_reaches_the_pooling(tiny4, tmp_path):
    """mean_no_massive uses the rule stored in the profile (massive_activations.rule), not a constant."""
    import json

    from mcr_exit.serving.profile_source import load_profile_source
    from tests.serving.conftest import make_profile

    path = make_profile(tmp_path / "p.json", name="tiny", model_type="llama", n_layers=4, hidden_size=64, k=2)
    doc = json.loads(path.read_text())
    doc["massive_activations"] = {"rule": {"threshold": 1.05}}
    path.write_text(json.dumps(doc))
    engine = Engine(tiny4, load_profile_source(str(path)), EngineConfig(warmup=False))
    assert engine.config.massive_ratio == 1.05
    texts = ["The quick brown fox jumps over the lazy dog.", "3 + 5 = 8"]
    got = asyncio.run(_embed(engine, texts, pooling="mean_no_massive")).vectors
    for text, vec in zip(texts, got):
        ids, mask = collate(engine.encode_texts([text]), engine.pad_id)
        h = hidden_at(tiny4.adapter, ids, mask, 2)
        strict = pool_hidden(h, mask, "mean_no_massive", normalize=True, massive_ratio=1.05)[0]
        default = pool_hidden(h, mask, "mean_no_massive", normalize=True)[0]
        torch.testing.assert_close(torch.from_numpy(vec), strict, atol=1e-5, rtol=1e-4)
        assert not torch.allclose(strict, default, atol=1e-4)  # the strict rule left tokens out
