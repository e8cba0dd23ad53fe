"""Embeddings are served while streams generate (CPU), and a generation times out on no progress only:
a stream that keeps producing tokens outlives the stall timeout; a stalled one gets a 504 error."""

from __future__ import annotations

import json
import threading
import time

import httpx
import numpy as np
import openai
import pytest

from mcr_exit.metrics.pooling import pool_hidden
from mcr_exit.models.forward import hidden_at
from mcr_exit.models.tokens import collate
from mcr_exit.serving.app import create_app
from tests.serving.conftest import build_engine, engine_held, on_release, running_server, slow_decode

MODEL = "tiny-llama"
STEP_S = 0.01  # extra cost of each decode step: 190 tokens take >= 1.9 s


@pytest.fixture
def slow_server(tiny4, tiny4_profile, monkeypatch):
    """(url, engine) with decode steps of >= 10 ms, a stall timeout of 1 s and an embedding timeout of 1 s."""
    engine = build_engine(tiny4, tiny4_profile, max_input_tokens=32, max_new_tokens=200, stall_timeout_s=1.0,
                          request_timeout_s=1.0)
    with running_server(create_app(engine)) as url:
        slow_decode(monkeypatch, engine, STEP_S)
        yield url, engine


class Stream(threading.Thread):
    """One streamed completion read by the official client on its own thread."""

    def __init__(self, url: str, prompt: str, max_tokens: int = 190):
        super().__init__(daemon=True)
        self.client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
        self.prompt, self.max_tokens = prompt, max_tokens
        self.first, self.ended = threading.Event(), threading.Event()
        self.text, self.usage, self.finish, self.error = "", None, None, None
        self.started_at = self.ended_at = 0.0

    def run(self):
        self.started_at = time.perf_counter()
        try:
            for c in self.client.completions.create(model=MODEL, prompt=self.prompt, max_tokens=self.max_tokens,
                                                    temperature=0, stream=True,
                                                    stream_options={"include_usage": True}):
                if c.choices:
                    self.text += c.choices[0].text
                    self.finish = c.choices[0].finish_reason or self.finish
                    self.first.set()
                if c.usage:
                    self.usage = c.usage
        except Exception as exc:  # noqa: BLE001 - the test asserts on it
            self.error = exc
        finally:
            self.ended_at = time.perf_counter()
            self.first.set()
            self.ended.set()


def test_embedding_is_not_held_behind_four_streams(slow_server):
    url, engine = slow_server
    streams = [Stream(url, f"stream {i} about rivers") for i in range(4)]
    for s in streams:
        s.start()
    assert all(s.first.wait(60) for s in streams) and not any(s.ended.is_set() for s in streams)
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=30)
    text = "A bee lives in a hive with thousands of others."
    t0 = time.perf_counter()
    resp = client.embeddings.create(model=MODEL, input=text, encoding_format="float")
    latency = time.perf_counter() - t0
    still_running = [not s.ended.is_set() for s in streams]
    for s in streams:
        assert s.ended.wait(60) and s.error is None
    assert all(still_running), "the embedding waited for the streams to finish"
    duration = min(s.ended_at - s.started_at for s in streams)
    assert all(s.usage.completion_tokens == 190 and s.finish == "length" for s in streams)
    assert duration >= 190 * STEP_S and latency < duration / 5, (latency, duration)
    ids, mask = collate(engine.encode_texts([text]), engine.pad_id)
    want = pool_hidden(hidden_at(engine.loaded.adapter, ids, mask, 2), mask, "mean_no_first", normalize=True)
    np.testing.assert_allclose(np.array(resp.data[0].embedding, dtype=np.float32), want[0].numpy(), atol=1e-5)
    assert engine.stepper.pool.n_used == 0


def test_progressing_stream_outlives_the_stall_timeout(slow_server):
    url, engine = slow_server
    s = Stream(url, "a long story about glaciers")
    s.run()  # on this thread
    assert s.error is None and s.finish == "length" and s.usage.completion_tokens == 190
    assert s.ended_at - s.started_at > 1.5 * engine.config.stall_timeout_s  # no total-time cut


def test_stalled_stream_gets_a_timeout_error(slow_server, monkeypatch):
    url, engine = slow_server
    freed = on_release(monkeypatch, engine, engine.stepper.pool.n_slots)
    body = {"model": MODEL, "prompt": "this one stalls", "max_tokens": 190, "temperature": 0, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        first = next(ln for ln in lines if ln)
        assert json.loads(first.removeprefix("data: "))["choices"][0]["finish_reason"] is None
        t0 = time.perf_counter()
        with engine_held(engine):  # the engine thread stops inside another request's callback
            rest = [ln for ln in lines if ln]
            stalled_for = time.perf_counter() - t0
    assert rest[-1] == "data: [DONE]"
    err = json.loads(rest[-2].removeprefix("data: "))["error"]
    assert err["type"] == "timeout_error" and "no new token" in err["message"]
    assert 0.8 <= stalled_for < 5.0  # stall_timeout_s after the last token, which came just before t0
    assert freed.wait(30) and engine.stepper.pool.n_used == 0  # the timed-out request gave its slot back


def test_embedding_batches_fill_while_streams_generate(tiny4, tiny4_profile, monkeypatch):
    """While a sequence generates, inputs that arrive within the batch wait share one forward; with nothing
    generating, each request runs at once."""
    engine = build_engine(tiny4, tiny4_profile, max_input_tokens=32, max_new_tokens=200, embed_batch_wait_s=0.5)
    with running_server(create_app(engine)) as url:
        slow_decode(monkeypatch, engine, STEP_S)

        def batches():
            return engine.metrics.get("mcr_exit_batches_total", kind="embedding")

        def two_requests_apart() -> list[httpx.Response]:
            out = [None, None]

            def send(i: int, text: str) -> None:
                out[i] = httpx.post(url + "/v1/embeddings", json={"model": MODEL, "input": text}, timeout=30)

            threads = [threading.Thread(target=send, args=(i, t)) for i, t in enumerate(("first input", "second input"))]
            for th in threads:
                th.start()
                time.sleep(0.1)
            for th in threads:
                th.join()
            return out

        before = batches()
        alone = two_requests_apart()
        assert all(r.status_code == 200 for r in alone) and batches() == before + 2

        stream = Stream(url, "a long answer", max_tokens=190)
        stream.start()
        assert stream.first.wait(30)
        before = batches()
        shared = two_requests_apart()
        running = not stream.ended.is_set()
        stream.ended.wait(60)
        assert running and stream.error is None
        assert all(r.status_code == 200 for r in shared) and batches() == before + 1
        for a, b in zip(shared, alone):  # batched with each other = each alone
            np.testing.assert_allclose(a.json()["data"][0]["embedding"], b.json()["data"][0]["embedding"], atol=1e-5)
