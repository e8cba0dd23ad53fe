"""Decode steps that carry embedding inputs (serving/fused_step.py), on the CPU where the fused forward runs
eagerly (a GPU captures the same forward as a graph):

- one fused forward gives the plain decode step's logits and KV writes, and ``hidden_at``'s hidden[k] for
  the packed inputs, for every family and for k = 0, a middle layer and L;
- through the engine, embeddings asked for while sequences generate ride in the decode steps (inputs of
  another layer, or too long to carry, still go to the embedding lane), their vectors equal ``hidden_at`` +
  pooling, and the generated tokens still equal transformers ``generate``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading

import numpy as np
import pytest
import torch

from mcr_exit.metrics.pooling import pool_hidden
from mcr_exit.models import from_objects
from mcr_exit.models.forward import hidden_at
from mcr_exit.models.tokens import collate
from mcr_exit.serving import Engine, EngineConfig
from mcr_exit.serving.engine import eos_ids_of
from mcr_exit.serving.fused_step import FusedStep
from mcr_exit.serving.jobs import GenerationRequest
from tests.serving.conftest import greedy_reference
from tests.serving.test_generate_equality import make_prompts
from tests.tiny import FAMILIES, build_tiny_model

PROMPTS = [[1, 5, 7, 9, 11], [1, 4, 4], [1, 8, 9, 10, 3, 2, 6, 12, 13, 14, 15]]  # > Gemma 3's window of 8
INPUTS = [[1, 3, 5, 7], [1, 2], [1, 9, 8, 7, 6, 5, 4, 3, 2, 11, 12], [1]]


def _engine(tokenizer, family, n_layers=4, **config):
    loaded = from_objects(build_tiny_model(family, len(tokenizer), n_layers=n_layers), tokenizer,
                          name=f"tiny-{family}")
    cfg = EngineConfig(warmup=False, max_input_tokens=64, max_new_tokens=64, kv_cache_tokens=12 * 128, **config)
    return loaded, Engine(loaded, None, cfg, embedding_layer=2)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_fused_forward_equals_the_decode_step_and_hidden_at(tokenizer, family):
    loaded, engine = _engine(tokenizer, family)
    engine._build_pool()
    st = engine.stepper
    slots, next_tokens = [0, 1, 2], torch.tensor([3, 4, 5])
    L = loaded.n_layers
    for k in (0, 2, L):
        with torch.inference_mode():
            st.prefill(PROMPTS, slots)
            st.feed(slots, next_tokens, [len(p) for p in PROMPTS])
            want_logits = st.step(3, 16).clone()
            want_k = [t.clone() for t in st.pool.k]
            want_v = [t.clone() for t in st.pool.v]
            st.prefill(PROMPTS, slots)
            st.feed(slots, next_tokens, [len(p) for p in PROMPTS])
            fused = FusedStep(st, layer=k, max_tokens=64, graphs=False)
            E, index, mask = fused.load(INPUTS)
            assert E == 64 and index.shape == mask.shape == (4, 11)
            logits, packed = fused.run(3, 16, E)
            ids, m = collate(INPUTS, engine.pad_id)
            want_h = hidden_at(loaded.adapter, ids, m, k)
        torch.testing.assert_close(logits, want_logits, atol=2e-5, rtol=1e-4)
        for a, b in zip(st.pool.k + st.pool.v, want_k + want_v):
            torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)  # same KV for the decode rows, none for inputs
        for r, x in enumerate(INPUTS):
            torch.testing.assert_close(packed[index[r, : len(x)]], want_h[r, : len(x)], atol=2e-5, rtol=1e-4)


def test_packing_fills_the_smallest_bucket_and_marks_each_input(tokenizer):
    _, engine = _engine(tokenizer, "llama")
    engine._build_pool()
    fused = FusedStep(engine.stepper, layer=2, max_tokens=300, graphs=False)
    assert fused.buckets == [64, 128, 192, 256, 300]
    assert fused.fits(300) and not fused.fits(301)
    E, index, mask = fused.load([[5] * 70, [6] * 3])
    assert E == 128
    assert index[0, :70].tolist() == list(range(70)) and index[1, :3].tolist() == [70, 71, 72]
    assert mask.sum(1).tolist() == [70, 3]
    assert fused.seg[:74].tolist() == [0] * 70 + [1] * 3 + [-1]
    assert fused.pos[68:74].tolist() == [68, 69, 0, 1, 2, 0]


def _slow(monkeypatch, engine, seconds):
    """Every decode step (plain or fused) takes at least ``seconds``: the sequences are still running when
    the embeddings arrive."""
    pause = threading.Event()
    for obj, name in ((engine.stepper, "step"), (engine.scheduler.fused, "run")):
        real = getattr(obj, name)

        def slowed(*args, _real=real, **kwargs):
            pause.wait(seconds)
            return _real(*args, **kwargs)

        monkeypatch.setattr(obj, name, slowed)


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
def test_embeddings_ride_in_decode_steps_and_both_stay_exact(tokenizer, family, monkeypatch):
    loaded, engine = _engine(tokenizer, family, fuse_embeddings="on", fused_embed_tokens=24)
    prompts = make_prompts(engine, 12)
    refs = greedy_reference(loaded, prompts, 40, eos_ids_of(loaded.model, tokenizer))
    texts = ["A bee lives in a hive.", "3 + 5 = 8", "The quick brown fox jumps over the lazy dog."]
    long_text = " ".join(["rivers run to the sea"] * 2)  # longer than 24 tokens: not carried
    assert 24 < len(engine.encode_texts([long_text])[0]) <= 64

    async def run():
        await engine.astart()
        _slow(monkeypatch, engine, 0.01)
        try:
            gens = [asyncio.ensure_future(engine.generate(GenerationRequest(prompt_ids=p, max_tokens=40,
                                                                            temperature=0))) for p in prompts]
            while not engine.scheduler.rows:
                await asyncio.sleep(0.005)
            embs = await asyncio.gather(
                *(engine.embed(engine.encode_texts([t]), pooling=pooling)
                  for t in texts for pooling in ("mean_no_first", "last")),
                engine.embed(engine.encode_texts([long_text])),
                engine.embed(engine.encode_texts(texts[:1]), layer=1))
            running = bool(engine.scheduler.rows)
            return await asyncio.gather(*gens), embs, running
        finally:
            await engine.astop()

    outs, embs, running = asyncio.run(run())
    assert running, "the sequences ended before the embeddings were served"
    assert engine.startup_report["fused_embeddings"].startswith("eager")
    fused_batches = engine.metrics.get("mcr_exit_batches_total", kind="fused")
    lane_batches = engine.metrics.get("mcr_exit_batches_total", kind="embedding")
    assert fused_batches >= 1 and lane_batches >= 2  # the long input and the other layer went to the lane
    for out, ref in zip(outs, refs):
        assert out.token_ids == ref[: len(out.token_ids)] and len(out.token_ids) == min(40, len(ref))
    asked = [(t, p, 2) for t in texts for p in ("mean_no_first", "last")]
    asked += [(long_text, "mean_no_first", 2), (texts[0], "mean_no_first", 1)]
    for (text, pooling, k), res in zip(asked, embs):
        ids, mask = collate(engine.encode_texts([text]), engine.pad_id)
        want = pool_hidden(hidden_at(loaded.adapter, ids, mask, k), mask, pooling, normalize=True)[0]
        assert res.layer == k
        np.testing.assert_allclose(res.vectors[0], want.numpy(), atol=2e-5, rtol=1e-4)
    assert engine.scheduler.queued_tokens == 0 and engine.stepper.pool.n_used == 0


def test_off_and_auto_the_default_on_the_cpu_leave_embeddings_to_their_lane(tokenizer):
    assert EngineConfig().fuse_embeddings == "auto"  # fused where decode steps replay CUDA graphs: a GPU
    for setting in ({"fuse_embeddings": "off"}, {}, {"fuse_embeddings": "auto"}):
        _, engine = _engine(tokenizer, "llama", **setting)

        async def run(engine=engine):
            await engine.astart()
            await engine.astop()

        asyncio.run(run())
        assert engine.scheduler.fused is None and engine.startup_report["fused_embeddings"] == "off"


def test_a_fused_forward_through_the_compiled_blocks_equals_the_eager_one(tokenizer):
    """What a GPU captures: the blocks compiled for the decode steps (torch.compile), called through the
    fused step's wrappers, with the embedding inputs leaving after block k. The engine's warm-up compiles
    the fused path for every batch size: later steps of other sizes and spans compile nothing more."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    loaded, engine = _engine(tokenizer, "gemma3", n_layers=6, fuse_embeddings="on")  # sliding and full layers
    engine._build_pool()
    st = engine.stepper
    eager_fused = FusedStep(st, layer=2, max_tokens=1024, graphs=False)

    def one(fused, B, inputs, span=16):
        with torch.inference_mode():
            st.prefill(PROMPTS, [0, 1, 2])
            st.feed([0, 1, 2], torch.tensor([3, 4, 5]), [len(p) for p in PROMPTS])
            E, index, mask = fused.load(inputs)
            logits, packed = fused.run(B, span, E)
            return logits.clone(), packed[index].clone(), mask

    cases = [(3, INPUTS, 16), (2, INPUTS[:2], 16), (3, [INPUTS[2]] * 30, 64), (1, INPUTS[1:], 32)]
    eager = [one(eager_fused, *c) for c in cases]
    st.enable_compile()
    engine.config = dataclasses.replace(engine.config, warmup=True)
    with torch.inference_mode():
        engine._set_up_fused_steps()  # its warm-up compiles the fused path
    fused = engine.scheduler.fused
    assert fused.layer == 2 and fused.buckets == [64, 128, 192, 256, 384, 512, 768, 1024]
    compiled_at_warm_up = dict(counters["stats"])
    compiled = [one(fused, *c) for c in cases]
    assert dict(counters["stats"]) == compiled_at_warm_up, "a fused step compiled again after the warm-up"
    for (la, ha, ma), (lb, hb, mb) in zip(eager, compiled):
        torch.testing.assert_close(lb, la, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(hb * mb[..., None], ha * ma[..., None], rtol=1e-4, atol=1e-4)
    assert all(m._compiled_call_impl is None for m, _ in st.compiled)  # switched off after each step


def test_a_fused_step_that_fails_fails_its_embeddings_and_sequences_and_serving_goes_on(tokenizer, monkeypatch):
    loaded, engine = _engine(tokenizer, "llama", fuse_embeddings="on")
    texts = ["A bee lives in a hive.", "3 + 5 = 8"]

    async def run():
        await engine.astart()
        _slow(monkeypatch, engine, 0.01)
        fused, real = engine.scheduler.fused, engine.scheduler.fused.run
        calls = []

        def broken(*args, **kwargs):
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("a device error in a fused step")
            return real(*args, **kwargs)

        monkeypatch.setattr(fused, "run", broken)
        try:
            prompt = engine.encode_texts(["Rivers flow into the sea"])[0]
            gen = asyncio.ensure_future(engine.generate(GenerationRequest(prompt_ids=prompt, max_tokens=40,
                                                                          temperature=0)))
            while not engine.scheduler.rows:
                await asyncio.sleep(0.005)
            first = await asyncio.gather(engine.embed(engine.encode_texts(texts)), return_exceptions=True)
            gen_result = await asyncio.gather(gen, return_exceptions=True)
            # serving goes on: a new sequence, and embeddings carried by its decode steps
            gen2 = asyncio.ensure_future(engine.generate(GenerationRequest(prompt_ids=prompt, max_tokens=40,
                                                                           temperature=0)))
            while not engine.scheduler.rows:
                await asyncio.sleep(0.005)
            again = await engine.embed(engine.encode_texts(texts))
            return first[0], gen_result[0], again, await gen2
        finally:
            await engine.astop()

    first, gen_result, again, out = asyncio.run(run())
    assert isinstance(first, RuntimeError) and "fused step" in str(first)
    assert isinstance(gen_result, RuntimeError)
    assert again.vectors.shape == (2, loaded.model.config.hidden_size) and len(out.token_ids) > 0
    assert engine.metrics.get("mcr_exit_batches_total", kind="fused") >= 1
    assert engine.scheduler.queued_tokens == 0 and engine.stepper.pool.n_used == 0


def test_token_buckets_bound_the_padding():
    from mcr_exit.serving.fused_step import token_buckets

    assert token_buckets(1024) == [64, 128, 192, 256, 384, 512, 768, 1024]
    assert token_buckets(50) == [50] and token_buckets(100) == [64, 100]
    for top in (300, 1024, 4096, 5000):
        b = token_buckets(top)
        assert b == sorted(set(b)) and b[-1] == top
        for n in range(129, top + 1, 7):  # a pack of n tokens runs as the smallest bucket that holds it
            assert next(x for x in b if x >= n) <= 1.5 * n


def test_warm_up_captures_the_full_batch_shapes_shortest_spans_first(tokenizer):
    _, engine = _engine(tokenizer, "llama")
    engine._build_pool()
    st = engine.stepper
    st.span_buckets = [128, 256, 512]  # as a pool of 512-token slots has them
    fused = FusedStep(st, layer=2, max_tokens=300, graphs=False)
    keys = fused.full_batch_keys(limit=10)
    assert {B for B, _, _ in keys} == {st.batch_buckets[-1]}
    assert {span for _, span, _ in keys} == set(st.span_buckets[:2])  # 10 graphs: two spans of 5 buckets
    assert sorted(E for _, _, E in keys) == sorted(fused.buckets * 2)
    assert keys == sorted(keys, reverse=True)  # largest first
    assert len(fused.full_batch_keys(limit=3)) == 3  # fewer graphs than buckets: the shortest span only
    assert {span for _, span, _ in fused.full_batch_keys(limit=3)} == {st.span_buckets[0]}


def test_metrics_say_how_long_steps_took_and_what_they_carried(tokenizer, monkeypatch):
    loaded, engine = _engine(tokenizer, "llama", fuse_embeddings="on")
    engine.start()
    try:
        assert engine.wait_ready(60)
        _slow(monkeypatch, engine, 0.05)

        async def run():
            gen = asyncio.ensure_future(engine.generate(GenerationRequest(prompt_ids=PROMPTS[0], max_tokens=12)))
            await asyncio.sleep(0.2)
            await engine.embed(INPUTS[:2])
            return await gen

        asyncio.run(run())
    finally:
        engine.stop()
    m = engine.metrics
    fused = m.get("mcr_exit_batches_total", kind="fused")
    assert fused >= 1 and m.get("mcr_exit_step_seconds_total", kind="fused") >= 0.05 * fused
    assert m.get("mcr_exit_step_seconds_total", kind="decode") >= 0.05  # the plain steps were slowed too
    assert m.get("mcr_exit_step_seconds_total", kind="prefill") > 0
    carried = m.get("mcr_exit_fused_tokens_total", kind="carried")
    assert carried == sum(len(x) for x in INPUTS[:2])  # both inputs rode in one step
    assert m.get("mcr_exit_fused_tokens_total", kind="bucket") == 64
    assert "mcr_exit_device_wait_seconds_total" in m.render()


def test_a_step_takes_its_inputs_from_the_front_whatever_the_queue_holds():
    from collections import deque

    from mcr_exit.serving.jobs import EmbedJob, take_packed

    def job(*lengths, layer=2):
        return EmbedJob(ids=[[1] * n for n in lengths], layer=layer, pooling="mean", normalize=True,
                        deadline=float("inf"))

    fits = lambda j, i: j.layer == 2  # noqa: E731 - inputs of layer 2 ride in decode steps
    other, a, b = job(5, layer=1), job(40, 40, 50), job(*([50] * 10_000))
    pieces = deque([(other, 0), *((a, i) for i in range(3)), *((b, i) for i in range(10_000))])
    seen = []
    real_fits = fits
    fits = lambda j, i: seen.append(1) or real_fits(j, i)  # noqa: E731 - counts the inputs looked at
    batch, left, dropped = take_packed(pieces, fits=fits, max_tokens=128, max_rows=64, look_ahead=4)
    assert [(j is a, i) for j, i in batch] == [(True, 0), (True, 1)]  # 50 more tokens would pass 128
    assert left is pieces and dropped == 0
    assert len(seen) < 40  # the 10,000 inputs behind were not all looked at
    assert list(pieces)[:3] == [(other, 0), (a, 2), (b, 0)]  # what was passed over keeps its place
    assert len(pieces) == 1 + 1 + 10_000


def test_the_blocks_run_eagerly_or_compiled_for_static_shapes_give_the_same_step(tokenizer):
    """``FusedStep.compile`` (what ``bench_fused_step.py --fused-compile`` times): the blocks eagerly, or compiled
    again for each step shape, give the step of the shared compiled modules; each mode switches off after it."""
    torch._dynamo.reset()
    loaded, engine = _engine(tokenizer, "llama", n_layers=3, fuse_embeddings="on")
    engine._build_pool()
    st = engine.stepper
    fused = FusedStep(st, layer=2, max_tokens=64, graphs=False)

    def one(mode):
        fused.compile = mode
        with torch.inference_mode():
            st.prefill(PROMPTS, [0, 1, 2])
            st.feed([0, 1, 2], torch.tensor([3, 4, 5]), [len(p) for p in PROMPTS])
            E, index, mask = fused.load(INPUTS[:2])
            logits, packed = fused.run(3, 16, E)
            return logits.clone(), (packed[index] * mask[..., None]).clone()

    eager = one("eager")
    st.enable_compile()
    for mode in ("shared", "static"):
        logits, hidden = one(mode)
        torch.testing.assert_close(logits, eager[0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(hidden, eager[1], rtol=1e-4, atol=1e-4)
        assert all(m._compiled_call_impl is None for m, _ in st.compiled)
    assert fused._static is not None and fused._static is not st.compiled
