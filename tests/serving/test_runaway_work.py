"""No work that nobody waits for: per-request budgets, text refused by length before the tokenizer, the
tokenizer off the event loop, a gone client's embedding batches skipped, a refused request's jobs cancelled."""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import httpx
import pytest

import mcr_exit.serving.inputs as inputs_module
from mcr_exit.serving.app import create_app
from mcr_exit.serving.inputs import MAX_CHARS_PER_TOKEN
from mcr_exit.serving.jobs import GenerationRequest
from tests.serving.conftest import build_engine, engine_held, running_server, slow_decode, submissions

LIMIT = 64  # the module server's max_input_tokens


@pytest.fixture
def tokenized(monkeypatch, server):
    """The texts that reach the tokenizer, as (number of texts, longest text) per call."""
    calls, real = [], inputs_module.encode_prompts
    tokenizer = server[1].loaded.tokenizer

    def record(tok, texts, *args, **kwargs):
        calls.append((len(texts), max(len(t) for t in texts)))
        return real(tok, texts, *args, **kwargs)

    def record_chat(messages, *args, **kwargs):
        calls.append((len(messages), max(len(m["content"]) for m in messages)))
        return real_chat(messages, *args, **kwargs)

    monkeypatch.setattr(inputs_module, "encode_prompts", record)
    real_chat = tokenizer.apply_chat_template
    monkeypatch.setattr(tokenizer, "apply_chat_template", record_chat)
    return calls


@pytest.mark.parametrize("route, body, param", [
    ("/v1/embeddings", {"input": "x" * (LIMIT * MAX_CHARS_PER_TOKEN + 1)}, "input"),
    ("/v1/embeddings", {"input": ["fine", "y" * (LIMIT * MAX_CHARS_PER_TOKEN + 1)]}, "input"),
    ("/v1/completions", {"prompt": "z" * (LIMIT * MAX_CHARS_PER_TOKEN + 1)}, "prompt"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "w" * (LIMIT * MAX_CHARS_PER_TOKEN)},
                                           {"role": "user", "content": "w"}]}, "messages"),
    ("/v1/completions", {"prompt": ["p"] * 17}, "prompt"),  # --max-prompts 16
    ("/v1/completions", {"prompt": [[1, 2]] * 17}, "prompt"),
    ("/v1/embeddings", {"input": ["i"] * 9}, "input"),  # --max-inputs 8
])
def test_oversized_requests_are_refused_before_tokenizing(server, tokenized, route, body, param):
    r = httpx.post(server[0] + route, json=body, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert tokenized == []


def test_truncate_tokenizes_only_a_prefix_and_keeps_the_same_tokens(server, tokenized):
    url = server[0] + "/v1/embeddings"
    short = httpx.post(url, json={"input": "word " * 100, "truncate": True}, timeout=60).json()
    long = httpx.post(url, json={"input": "word " * 5000, "truncate": True}, timeout=60).json()
    assert short["usage"]["prompt_tokens"] == long["usage"]["prompt_tokens"] == LIMIT
    assert short["data"][0]["embedding"] == pytest.approx(long["data"][0]["embedding"], abs=1e-6)
    assert max(n for _, n in tokenized) <= LIMIT * MAX_CHARS_PER_TOKEN  # never the 25,000 characters


def test_health_answers_while_a_text_is_tokenized(server, monkeypatch):
    inside, release = threading.Event(), threading.Event()
    real = inputs_module.encode_prompts

    def slow(*args, **kwargs):
        inside.set()
        release.wait(30)  # a tokenizer busy with a huge text
        return real(*args, **kwargs)

    monkeypatch.setattr(inputs_module, "encode_prompts", slow)
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(httpx.post, server[0] + "/v1/embeddings", json={"input": "big"}, timeout=60)
        try:
            assert inside.wait(30)
            t0 = time.perf_counter()
            health = httpx.get(server[0] + "/health", timeout=5)
            assert health.status_code == 200 and time.perf_counter() - t0 < 2
        finally:
            release.set()
        assert pending.result(60).status_code == 200


def test_request_token_budget(tiny4, tiny4_profile):
    engine = build_engine(tiny4, tiny4_profile, max_request_tokens=20)
    with running_server(create_app(engine)) as url:
        ids = [[5, 6, 7, 8, 9, 10, 11]] * 3  # 3 x (7 + BOS?) tokens > 20
        r = httpx.post(url + "/v1/embeddings", json={"input": ids}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["code"] == "request_too_large", r.text
        assert httpx.post(url + "/v1/embeddings", json={"input": ids[:2]}, timeout=60).status_code == 200


def test_a_gone_client_gets_no_more_batches_and_blocks_nobody(tiny4, tiny4_profile, monkeypatch):
    engine = build_engine(tiny4, tiny4_profile, max_batch_size=1)  # one input per batch
    sched = engine.scheduler
    with running_server(create_app(engine)) as url:
        inside, gate, jobs = threading.Event(), threading.Event(), []
        real_run, real_submit = sched._launch_embed, sched.submit_embed

        def run_embed(batch):
            if batch[0][0] in jobs and not inside.is_set():
                inside.set()
                gate.wait(30)  # the first batch of the job is slow; its client gives up meanwhile
            return real_run(batch)

        def submit(job):
            jobs.append(job)
            real_submit(job)

        monkeypatch.setattr(sched, "_launch_embed", run_embed)
        monkeypatch.setattr(sched, "submit_embed", submit)
        before = engine.metrics.get("mcr_exit_batches_total", kind="embedding")
        body = json.dumps({"input": [f"input number {i}" for i in range(6)]}).encode()
        parts = urlsplit(url)
        with socket.create_connection((parts.hostname, parts.port), timeout=10) as s:
            s.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            assert inside.wait(30)
        try:
            assert jobs[0].cancelled.wait(10), "the server did not notice the client leave"
        finally:
            gate.set()
        r = httpx.post(url + "/v1/embeddings", json={"input": "another client"}, timeout=10)
        assert r.status_code == 200
        # the gone client's first batch ran (it was under way); its 5 others never did
        assert engine.metrics.get("mcr_exit_batches_total", kind="embedding") == before + 2
        assert sched.queued_tokens == 0 and not sched.pieces
        assert 'status="499"' in httpx.get(url + "/metrics").text


def test_a_refused_completion_leaves_nothing_queued(tiny4, tiny4_profile):
    engine = build_engine(tiny4, tiny4_profile, max_queue=3, max_prompts=3)
    with running_server(create_app(engine)) as url:
        prompt_tokens = engine.metrics.get("mcr_exit_tokens_total", kind="prompt")
        hold_ids = engine.encode_texts(["hold the engine"])[0]
        other = engine.encode_texts(["queued before"])[0]
        with engine_held(engine):
            direct = engine.submit_generate(GenerationRequest(prompt_ids=other, max_tokens=1, temperature=0))
            r = httpx.post(url + "/v1/completions", json={"prompt": ["a b", "c d", "e f"], "max_tokens": 4},
                           timeout=30)  # 2 of 3 fit the queue (3 places, 1 taken): 429 for the request
            assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
            waiting = list(engine.scheduler.waiting)
            assert len(waiting) == 3 and [h.cancelled.is_set() for h in waiting] == [False, True, True]
        assert direct.future.result(30).completion_tokens == 1
        assert not engine.scheduler.waiting and engine.stepper.pool.n_used == 0
        # only the held and the direct prompt were ever prefilled
        assert engine.metrics.get("mcr_exit_tokens_total", kind="prompt") == prompt_tokens + len(hold_ids) + len(other)


def test_a_gone_client_frees_its_generation(tiny4, tiny4_profile, monkeypatch):
    engine = build_engine(tiny4, tiny4_profile)
    with running_server(create_app(engine)) as url:
        slow_decode(monkeypatch, engine, 0.2)  # 60 tokens would take 12 s
        monkeypatch.setattr(engine.scheduler, "eos_ids", set())  # and none ends early
        queued = submissions(monkeypatch, engine, 1)
        handles, real = [], engine.scheduler.submit_generation
        monkeypatch.setattr(engine.scheduler, "submit_generation", lambda h: (handles.append(h), real(h)))
        body = json.dumps({"prompt": "a long answer", "max_tokens": 60, "temperature": 0}).encode()
        parts = urlsplit(url)
        with socket.create_connection((parts.hostname, parts.port), timeout=10) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            assert queued.wait(30)
        out = handles[0].future.result(10)  # the client left: the sequence stops, its KV slot is freed
        assert out.finish_reason == "abort" and out.completion_tokens < 60
        assert engine.stepper.pool.n_used == 0
