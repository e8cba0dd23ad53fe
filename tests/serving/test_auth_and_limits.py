"""Bearer API key on every route but /health; 429 from full queues; 504 when an embedding takes too long."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from mcr_exit.serving.app import create_app
from mcr_exit.serving.jobs import GenerationRequest
from tests.serving.conftest import build_engine, engine_held, running_server, submissions

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


def test_full_queues_are_429_and_slow_embedding_is_504(tiny4, tiny4_profile, monkeypatch):
    engine = build_engine(tiny4, tiny4_profile, max_queue=2, max_queue_tokens=12, request_timeout_s=1.0)
    with running_server(create_app(engine)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        ids = engine.encode_texts(["hold the engine"])[0]
        with engine_held(engine):  # both lanes stop
            queued = [engine.submit_generate(GenerationRequest(prompt_ids=ids, max_tokens=1, temperature=0))
                      for _ in range(2)]
            with pytest.raises(openai.RateLimitError) as e:  # 2 generations wait: the third is refused
                client.completions.create(model=MODEL, prompt="hi", max_tokens=2, stream=True)
            assert e.value.body["code"] == "queue_full" and engine.is_overloaded()
            # the embedding lane takes this one and waits for the forward lock: 504 after 1 s in total
            r = httpx.post(url + "/v1/embeddings", json={"input": "waits"}, timeout=30)
            assert r.status_code == 504 and r.json()["error"]["type"] == "timeout_error"
            queued_embedding = submissions(monkeypatch, engine, 1)
            with ThreadPoolExecutor(1) as pool:  # this one (6 tokens) stays in the queue (12 at most) ...
                fills = pool.submit(httpx.post, url + "/v1/embeddings", json={"input": "fills"},
                                    timeout=30)
                assert queued_embedding.wait(30) and engine.scheduler.queued_tokens > 0
                r = httpx.post(url + "/v1/embeddings", json={"input": "no room"}, timeout=30)  # 6 + 8 > 12
                assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"  # ... so this is 429
                assert fills.result(30).status_code == 504
        for q in queued:  # once the engine runs again, the waiting requests complete
            assert q.future.result(30).completion_tokens == 1
        assert engine.stepper.pool.n_used == 0
        assert httpx.post(url + "/v1/embeddings", json={"input": "fine again"}).status_code == 200
        assert engine.scheduler.queued_tokens == 0
        metrics = httpx.get(url + "/metrics").text
        assert 'status="429"' in metrics and 'status="504"' in metrics


def test_not_ready_engine_refuses_with_503(tiny4, tiny4_profile):
    from mcr_exit.serving.errors import EngineNotReady

    engine = build_engine(tiny4, tiny4_profile)
    with pytest.raises(EngineNotReady):
        asyncio.run(engine.embed([[1, 2, 3]]))


def test_readiness_follows_warm_up(tiny4, tiny4_profile, monkeypatch):
    from mcr_exit.serving.engine import Engine

    gate = threading.Event()
    real_warm_up = Engine._warm_up
    monkeypatch.setattr(Engine, "_warm_up", lambda self: (gate.wait(30), real_warm_up(self)))
    engine = build_engine(tiny4, tiny4_profile)
    with running_server(create_app(engine, api_key="k"), wait_engine=False) as url:
        assert httpx.get(url + "/health").json() == {"status": "ok", "ready": False}
        assert httpx.get(url + "/health/ready").status_code == 503
        r = httpx.post(url + "/v1/embeddings", json={"input": "x"}, headers={"Authorization": "Bearer k"})
        assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable"
        gate.set()
        assert engine.wait_ready(60)
        assert httpx.get(url + "/health/ready").status_code == 200
