"""The step scheduler's KV-pool accounting: slots lowest first, all returned, waiting then running, shared
decode steps; and a full pool that makes a request wait and then answers 429 ``kv_cache_full``."""

from __future__ import annotations

import asyncio
import threading
import time

import openai
import pytest
import torch

from mcr_exit.serving.app import create_app
from mcr_exit.serving.errors import Overloaded
from mcr_exit.serving.jobs import GenerationRequest
from mcr_exit.serving.kv_pool import KVPool, LayerShape
from tests.serving.conftest import build_engine, engine_held, running_server, started

MODEL = "tiny-llama"


def test_pool_hands_out_the_lowest_free_slot():
    pool = KVPool([LayerShape(kv_heads=2, head_dim=4)] * 2, n_slots=4, slot_len=8, dtype=torch.float32,
                  device=torch.device("cpu"))
    assert [pool.alloc() for _ in range(4)] == [0, 1, 2, 3] and pool.alloc() is None
    pool.release(2)
    pool.release(0)
    assert pool.n_used == 2 and pool.alloc() == 0 and pool.alloc() == 2 and pool.n_free == 0
    for s in range(4):
        pool.release(s)
    assert pool.n_used == 0 and pool.nbytes == 2 * 2 * 4 * 2 * 8 * 4 * 4  # K and V, 2 layers, float32


def test_slots_lowest_first_shared_decode_and_all_returned(tiny4, tiny4_profile, monkeypatch):
    """3 slots, 8 requests: they wait, run three at a time in the lowest free slots, share decode steps,
    and give every slot back."""
    engine = build_engine(tiny4, tiny4_profile, max_input_tokens=64, max_new_tokens=64, kv_cache_tokens=3 * 128)
    with started(engine):
        pool, sched = engine.stepper.pool, engine.scheduler
        assert pool.n_slots == 3 and engine.startup_report["kv_slots"] == 3
        allocs, batch_rows = [], []
        real_alloc, real_step = pool.alloc, engine.stepper.step

        def alloc():  # on the engine thread: record the free set each hand-out chose from
            free = sorted(pool._free)
            slot = real_alloc()
            allocs.append((slot, free))
            return slot

        def step(B, span):
            batch_rows.append((B, sorted(sched.rows)))
            return real_step(B, span)

        monkeypatch.setattr(pool, "alloc", alloc)
        monkeypatch.setattr(engine.stepper, "step", step)
        prompts = engine.encode_texts([f"request {i} about rivers" for i in range(8)])
        decode_before = engine.metrics.get("mcr_exit_batches_total", kind="decode")
        with engine_held(engine) as holder:  # everything queues behind a held engine thread
            handles = [engine.submit_generate(GenerationRequest(prompt_ids=p, max_tokens=6 + 3 * i, temperature=0))
                       for i, p in enumerate(prompts)]
            assert len(sched.waiting) == 8 and pool.n_used == 1  # the holder runs in slot 0
            assert sched.rows[0].handle is holder
        outs = [h.future.result(60) for h in handles]
        assert all(o.completion_tokens >= 1 for o in outs)
        assert pool.n_used == 0 and pool.n_free == 3 and not sched.rows and not sched.waiting
        assert sorted(pool._free) == [0, 1, 2]
        assert len(allocs) == 9 and all(slot == free[0] for slot, free in allocs)  # holder + 8: lowest each time
        assert max(n for n, _ in batch_rows) == 3  # never more rows than slots ...
        assert all(n == rows[-1] + 1 for n, rows in batch_rows)  # ... and a step spans slots 0..max only
        decode_steps = engine.metrics.get("mcr_exit_batches_total", kind="decode") - decode_before
        decoded = sum(o.completion_tokens - 1 for o in outs)  # the first token comes from the prefill
        assert decode_steps < decoded / 2  # rows shared decode steps
        assert sum(1 for n, _ in batch_rows if n == 3) >= 5


def test_full_pool_waits_then_429(tiny4, tiny4_profile):
    """One slot, held by a generation that runs on: the next request waits queue_timeout_s, then 429."""
    engine = build_engine(tiny4, tiny4_profile, max_input_tokens=32, max_new_tokens=200, kv_cache_tokens=232,
                          queue_timeout_s=0.5)
    with running_server(create_app(engine)) as url:
        assert engine.stepper.pool.n_slots == 1
        pace = threading.Event()  # never set: each token waits 20 ms
        ids = engine.encode_texts(["the long one"])[0]
        long_one = engine.submit_generate(GenerationRequest(
            prompt_ids=ids, max_tokens=190, temperature=0, on_text=lambda _t: pace.wait(0.02)))  # >= 20 ms/token
        try:
            client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=30)
            t0 = time.perf_counter()
            with pytest.raises(openai.RateLimitError) as e:
                client.completions.create(model=MODEL, prompt="wait for me", max_tokens=4, temperature=0)
            waited = time.perf_counter() - t0
            assert e.value.body["code"] == "kv_cache_full" and e.value.status_code == 429
            assert 0.5 <= waited < 3.0 and not long_one.future.done()  # it waited, the slot stayed busy

            async def engine_level():
                req = GenerationRequest(prompt_ids=ids, max_tokens=2, temperature=0)
                with pytest.raises(Overloaded) as exc:
                    await engine.generate(req)
                return exc.value.code

            assert asyncio.run(engine_level()) == "kv_cache_full" and not long_one.future.done()
        finally:
            long_one.cancel()
        assert long_one.future.result(30).finish_reason == "abort"
        assert engine.stepper.pool.n_used == 0
        r = client.completions.create(model=MODEL, prompt="now there is room", max_tokens=3, temperature=0)
        assert r.usage.completion_tokens >= 1


def test_models_reports_limits_and_kv_cache(server):
    import httpx

    url, engine = server
    info = httpx.get(url + "/v1/models").json()["data"][0]["mcr_exit"]
    assert info["limits"] == {"context_tokens": 128, "max_input_tokens": 64, "max_new_tokens": 64,
                              "embedding_timeout_s": 120.0, "generation_stall_timeout_s": 60.0,
                              "kv_slot_wait_s": 30.0}
    kv = info["kv_cache"]
    assert kv["kv_slots"] == 8 and kv["kv_slot_tokens"] == 128 == engine.context_len
    assert kv["kv_cache_bytes"] == 8 * 128 * kv["kv_bytes_per_token"] == engine.stepper.pool.nbytes


def test_generation_works_without_warm_up(tiny4, tiny4_profile):
    """Decode steps do not depend on the warm-up having run (warmup=False serves from the first request)."""
    engine = build_engine(tiny4, tiny4_profile, warmup=False, max_input_tokens=32, max_new_tokens=8)

    async def go():
        await engine.astart()
        try:
            ids = engine.encode_texts(["hello there"])[0]
            return await engine.generate(GenerationRequest(prompt_ids=ids, max_tokens=5, temperature=0))
        finally:
            await engine.astop()

    out = asyncio.run(go())
    assert out.completion_tokens >= 1 and out.finish_reason in ("length", "stop")


def test_a_step_that_fails_for_good_ends_generation_with_a_clear_503(tiny4, tiny4_profile, monkeypatch):
    """A decode step raises and so does the reset of the KV slots after it (a device error that stays):
    the running request gets the step's error at once, the generation lane ends in order instead of
    dying half-way with requests left hanging, and every later request gets 503 with the reason, as
    /health/ready ("failed") tells a load balancer."""
    import httpx

    engine = build_engine(tiny4, tiny4_profile, max_input_tokens=32, max_new_tokens=16)
    with running_server(create_app(engine)) as url:
        def client():  # a connection each: the server closes one after an unexpected error
            return openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=30)

        assert client().completions.create(model=MODEL, prompt="fine", max_tokens=3, temperature=0).choices

        def broken(*args, **kwargs):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

        monkeypatch.setattr(engine.stepper, "step", broken)
        monkeypatch.setattr(engine.stepper, "park", broken)
        t0 = time.perf_counter()
        with pytest.raises(openai.InternalServerError) as first:
            client().completions.create(model=MODEL, prompt="hello there", max_tokens=8, temperature=0)
        assert first.value.status_code == 500 and time.perf_counter() - t0 < 10
        with pytest.raises(openai.InternalServerError) as later:
            client().completions.create(model=MODEL, prompt="and now?", max_tokens=8, temperature=0)
        assert later.value.status_code == 503
        message = later.value.body["message"]
        assert "the engine failed" in message and "illegal memory access" in message and "restart" in message
        ready = httpx.get(url + "/health/ready")
        assert ready.status_code == 503 and ready.json()["status"] == "failed"
        assert engine.has_failed() and engine.stepper.pool.n_used == 0
        with pytest.raises(openai.InternalServerError) as emb:
            client().embeddings.create(model=MODEL, input=["and embeddings?"])
        assert emb.value.status_code == 503 and emb.value.body["message"] == message
