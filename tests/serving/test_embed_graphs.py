"""Embedding batches through the graph buckets (serving/embed_graphs.py), checked on the CPU with the
padded function a graph would capture run eagerly: rows and positions padded to their bucket, the 0/1
mask turned into the decode steps' 4-D mask, and still the vectors of ``hidden_at`` + pooling."""

from __future__ import annotations

import asyncio

import pytest
import torch

from mcr_exit.metrics.pooling import pool_hidden
from mcr_exit.models import from_objects
from mcr_exit.models.forward import hidden_at
from mcr_exit.models.tokens import collate
from mcr_exit.serving import Engine, EngineConfig
from mcr_exit.serving import embed_graphs
from mcr_exit.serving.embed_graphs import EmbedGraphs

TEXTS = ["The quick brown fox jumps over the lazy dog.", "3 + 5 = 8", "def add(a, b):\n    return a + b"]


@pytest.mark.parametrize("pooling", ["mean_no_first", "last"])
def test_bucketed_batches_equal_hidden_at_for_every_family(tiny_models, tokenizer, family, pooling):
    loaded = from_objects(tiny_models[family], tokenizer, name=f"tiny-{family}")
    k = loaded.n_layers - 1
    engine = Engine(loaded, None, EngineConfig(warmup=False), embedding_layer=k)

    async def run():
        await engine.astart()
        try:
            graphs = engine.scheduler.embed_graphs = EmbedGraphs(engine.stepper, max_batch_tokens=8192,
                                                                 graphs=False)
            first = await engine.embed(engine.encode_texts(TEXTS), pooling=pooling)  # bucket met once: eager
            assert not graphs.entries
            second = await engine.embed(engine.encode_texts(TEXTS), pooling=pooling)  # from the bucket
            [(rows, positions, layer)] = graphs.entries
            assert rows == 8 and positions % 32 == 0 and layer == k
            return first.vectors, second.vectors
        finally:
            await engine.astop()

    eager, bucketed = asyncio.run(run())
    for text, a, b in zip(TEXTS, eager, bucketed):
        ids, mask = collate(engine.encode_texts([text]), engine.pad_id)
        ref = pool_hidden(hidden_at(loaded.adapter, ids, mask, k), mask, pooling, normalize=True)[0]
        torch.testing.assert_close(torch.from_numpy(a), ref, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(torch.from_numpy(b), ref, atol=1e-5, rtol=1e-4)


def test_buckets_are_bounded_and_the_least_recently_used_goes(tiny4, monkeypatch):
    engine = Engine(tiny4, None, EngineConfig(warmup=False), embedding_layer=2)
    graphs = EmbedGraphs(engine.stepper, max_batch_tokens=512, graphs=False)  # at most 640 padded tokens
    monkeypatch.setattr(embed_graphs, "MAX_GRAPHS", 2)

    def batch(rows, positions):
        ids = torch.ones((rows, positions), dtype=torch.long)
        return ids, torch.ones_like(ids)

    assert graphs.bucket(3, 33) == (8, 64) and graphs.bucket(8, 32) == (8, 32)
    assert graphs.hidden(*batch(17, 40), 2) is None and not graphs.seen  # 24 x 64 > 640: always eager
    for shape in [(2, 5), (2, 5), (3, 31), (3, 31), (1, 2)]:
        graphs.hidden(*batch(*shape), 2)
    assert list(graphs.entries) == [(8, 32, 2)]  # one bucket for all three shapes, met five times
    graphs.hidden(*batch(1, 40), 2)
    graphs.hidden(*batch(1, 40), 2)
    graphs.hidden(*batch(1, 1), 1)
    graphs.hidden(*batch(1, 1), 1)
    assert list(graphs.entries) == [(8, 64, 2), (8, 32, 1)]
    out = graphs.hidden(*batch(2, 3), 1)
    assert out.shape == (2, 3, tiny4.model.config.hidden_size)


def test_buckets_are_bounded_by_the_bytes_their_outputs_hold(tiny4, monkeypatch):
    engine = Engine(tiny4, None, EngineConfig(warmup=False), embedding_layer=2)
    graphs = EmbedGraphs(engine.stepper, max_batch_tokens=4096, graphs=False)
    d = tiny4.model.config.hidden_size
    per_token = d * engine.stepper.dtype.itemsize + 16
    monkeypatch.setattr(embed_graphs, "MAX_OUTPUT_BYTES", 8 * 64 * per_token + 16 * 32 * per_token)

    def twice(rows, positions):
        ids = torch.ones((rows, positions), dtype=torch.long)
        for _ in range(2):
            graphs.hidden(ids, torch.ones_like(ids), 2)

    twice(8, 64)
    twice(16, 32)
    assert list(graphs.entries) == [(8, 64, 2), (16, 32, 2)]
    assert graphs.held_bytes == embed_graphs.MAX_OUTPUT_BYTES  # exactly full: both kept
    twice(8, 32)  # one more byte than the budget leaves: the least recently used goes
    assert list(graphs.entries) == [(16, 32, 2), (8, 32, 2)]
    assert graphs.held_bytes == (16 * 32 + 8 * 32) * per_token
    twice(32, 64)  # alone larger than the budget: kept alone
    assert list(graphs.entries) == [(32, 64, 2)]
    assert graphs.held_bytes == 32 * 64 * per_token


def test_mode_only_on_a_gpu_and_by_size(tiny4, monkeypatch):
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert embed_graphs.mode("on", tiny4.model, cpu) is None
    assert embed_graphs.mode("auto", tiny4.model, gpu) == "idle"
    assert embed_graphs.mode("on", tiny4.model, gpu) == "always"
    assert embed_graphs.mode("off", tiny4.model, gpu) is None
    monkeypatch.setattr(embed_graphs, "AUTO_MAX_PARAMETERS", 10)  # a "large" model: auto leaves it eager
    assert embed_graphs.mode("auto", tiny4.model, gpu) is None and embed_graphs.mode("on", tiny4.model, gpu) == "always"


@pytest.mark.parametrize("always", [False, True])
def test_beside_generation_batches_run_eagerly_unless_always(tiny4, always):
    from mcr_exit.serving.jobs import EmbedJob

    engine = Engine(tiny4, None, EngineConfig(warmup=False), embedding_layer=2)
    sched = engine.scheduler
    graphs = sched.embed_graphs = EmbedGraphs(engine.stepper, max_batch_tokens=8192, graphs=False, always=always)
    sched.rows[0] = object()  # a sequence generating
    ids = engine.encode_texts(TEXTS)
    for _ in range(3):
        job = EmbedJob(ids=ids, layer=2, pooling="mean", normalize=True, deadline=float("inf"))
        sched._run_embed([(job, i) for i in range(len(ids))], queued=False)
        assert job.future.result().shape == (len(TEXTS), tiny4.model.config.hidden_size)
    assert bool(graphs.entries) == always
    sched.rows.clear()  # generation over: the bucket path from the second batch on
    for _ in range(2):
        job = EmbedJob(ids=ids, layer=2, pooling="mean", normalize=True, deadline=float("inf"))
        sched._run_embed([(job, i) for i in range(len(ids))], queued=False)
    assert graphs.entries


def test_a_bad_setting_is_a_config_error():
    from mcr_exit.errors import ConfigError

    with pytest.raises(ConfigError, match="--embed-cuda-graphs"):
        EngineConfig(embed_cuda_graphs="sometimes")


def test_captures_while_serving_are_counted_in_the_metrics(tiny4):
    """A bucket captured while serving shows in /metrics (kind "embedding"), with its seconds; a bucket met
    once or replayed adds nothing. (The CPU runs the padded function eagerly: the capture is counted as a
    GPU would count it, by ``EmbedGraphs.captured`` and ``capture_seconds``.)"""

    class Counted(EmbedGraphs):
        def _make(self, key):
            entry = super()._make(key)
            self.captured += 1
            self.capture_seconds += 0.25
            return entry

    engine = Engine(tiny4, None, EngineConfig(warmup=False), embedding_layer=2)

    async def run():
        await engine.astart()
        try:
            engine.scheduler.embed_graphs = Counted(engine.stepper, max_batch_tokens=8192, graphs=False)
            counts = []
            for _ in range(3):  # met once (eager), captured, replayed
                await engine.embed(engine.encode_texts(TEXTS))
                counts.append((engine.metrics.get("mcr_exit_cuda_graph_captures_total", kind="embedding"),
                               engine.metrics.get("mcr_exit_cuda_graph_capture_seconds_total", kind="embedding")))
            return counts, engine.metrics.render()
        finally:
            await engine.astop()

    counts, text = asyncio.run(run())
    assert counts == [(0, 0), (1, 0.25), (1, 0.25)]
    assert 'mcr_exit_cuda_graph_captures_total{kind="embedding"} 1' in text
