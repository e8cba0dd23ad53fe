"""Bearer API key on every route but /health; 429 from a full queue; 504 on timeouts."""

from __future__ import annotations

import asyncio
import threading

import httpx
import openai
import pytest

from mcr_exit.serving.app import create_app
from mcr_exit.serving.errors import RequestTimeout
from mcr_exit.serving.generation import GenerationRequest
from tests.serving.conftest import build_engine, running_server

MODEL = "tiny-llama"


@pytest.fixture(scope="module")
def auth_server(tiny4, tiny4_profile):
    engine = build_engine(tiny4, tiny4_profile)
    with running_server(create_app(engine, api_key="s3cret")) as url:
        yield url


def test_api_key_required_everywhere_but_health(auth_server):
    url = auth_server
    assert httpx.get(url + "/health").status_code == 200
    assert httpx.get(url + "/health/ready").status_code == 200
    for method, path in (("GET", "/v1/models"), ("GET", "/metrics"), ("POST", "/v1/embeddings"),
                         ("POST", "/v1/completions"), ("POST", "/v1/chat/completions")):
        r = httpx.request(method, url + path, json={"input": "x"})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        r = httpx.request(method, url + path, json={"input": "x"}, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401
    assert httpx.get(url + "/metrics", headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_openai_client_with_and_without_key(auth_server):
    good = openai.OpenAI(base_url=auth_server + "/v1", api_key="s3cret", max_retries=0)
    assert len(good.embeddings.create(model=MODEL, input="hello").data[0].embedding) == 64
    assert good.chat.completions.create(model=MODEL, max_tokens=2,
                                        messages=[{"role": "user", "content": "hi"}]).choices
    bad = openai.OpenAI(base_url=auth_server + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.embeddings.create(model=MODEL, input="hello")


def test_full_queue_is_429_and_slow_request_is_504(tiny4, tiny4_profile):
    engine = build_engine(tiny4, tiny4_profile, max_queue=2, request_timeout_s=1.0)
    release, holding = threading.Event(), threading.Event()

    def hold(_text):  # runs on the worker thread: keeps it busy until the test lets go
        holding.set()
        release.wait(30)

    with running_server(create_app(engine)) as url:
        ids = engine.encode_texts(["hold the worker"])[0]
        blocker = engine.submit_generate(GenerationRequest(prompt_ids=ids, max_tokens=2, temperature=0,
                                                           on_text=hold))
        assert holding.wait(30)
        try:
            queued = engine.submit_generate(GenerationRequest(prompt_ids=ids, max_tokens=1, temperature=0))
            r = httpx.post(url + "/v1/embeddings", json={"input": "waits"}, timeout=30)
            assert r.status_code == 504 and r.json()["error"]["type"] == "timeout_error"
            r = httpx.post(url + "/v1/embeddings", json={"input": "no room"}, timeout=30)
            assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
            client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
            with pytest.raises(openai.RateLimitError):
                client.completions.create(model=MODEL, prompt="hi", max_tokens=2, stream=True)
            assert engine.is_overloaded()
        finally:
            release.set()
        assert blocker.future.result(30).completion_tokens >= 1
        with pytest.raises(RequestTimeout):  # it waited past its deadline: dropped, never run
            queued.future.result(30)
        assert httpx.post(url + "/v1/embeddings", json={"input": "fine again"}).status_code == 200
        metrics = httpx.get(url + "/metrics").text
        assert 'status="429"' in metrics and 'status="504"' in metrics


def test_not_ready_engine_refuses_with_503(tiny4, tiny4_profile):
    from mcr_exit.serving.errors import EngineNotReady

    engine = build_engine(tiny4, tiny4_profile)
    with pytest.raises(EngineNotReady):
        asyncio.run(engine.embed([[1, 2, 3]]))


def test_readiness_follows_warm_up(tiny4, tiny4_profile, monkeypatch):
    import mcr_exit.serving.worker as worker

    gate = threading.Event()
    real_warm_up = worker.warm_up
    monkeypatch.setattr(worker, "warm_up", lambda engine: (gate.wait(30), real_warm_up(engine)))
    engine = build_engine(tiny4, tiny4_profile)
    with running_server(create_app(engine, api_key="k"), wait_engine=False) as url:
        assert httpx.get(url + "/health").json() == {"status": "ok", "ready": False}
        assert httpx.get(url + "/health/ready").status_code == 503
        r = httpx.post(url + "/v1/embeddings", json={"input": "x"}, headers={"Authorization": "Bearer k"})
        assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable"
        gate.set()
        assert engine.wait_ready(60)
        assert httpx.get(url + "/health/ready").status_code == 200
