"""The real server on loopback, driven by the official openai client: embeddings, completions, chat, streams."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from mcr_exit.models.forward import hidden_at
from mcr_exit.models.tokens import collate
from mcr_exit.metrics.pooling import pool_hidden
from mcr_exit.serving.engine import eos_ids_of
from tests.serving.conftest import engine_held, greedy_reference, submissions

MODEL = "tiny-llama"


def reference(engine, ids, layer, pooling="mean_no_first", normalize=True):
    """What the analysis side sees: hidden[layer] by the one early-exit path, pooled the same way."""
    x, mask = collate(ids, engine.pad_id)
    return pool_hidden(hidden_at(engine.loaded.adapter, x, mask, layer), mask, pooling, normalize=normalize).numpy()


def vectors(resp):
    return np.array([d.embedding for d in sorted(resp.data, key=lambda d: d.index)], dtype=np.float32)


def test_embeddings_float_equal_analysis_hidden_state(client, server):
    engine = server[1]
    texts = ["The quick brown fox", "Rivers flow into the sea; glaciers carve valleys."]
    resp = client.embeddings.create(model=MODEL, input=texts, encoding_format="float")
    assert resp.model == MODEL and resp.object == "list" and len(resp.data) == 2
    ids = engine.encode_texts(texts)
    assert ids[0][0] == engine.bos.token_id  # BOS prepended exactly as the analysis does
    assert resp.usage.prompt_tokens == sum(map(len, ids)) == resp.usage.total_tokens
    np.testing.assert_allclose(vectors(resp), reference(engine, ids, 2), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(vectors(resp), axis=1), 1.0, atol=1e-5)


def test_base64_default_matches_float(client):
    f = client.embeddings.create(model=MODEL, input="A bee lives in a hive", encoding_format="float")
    b = client.embeddings.create(model=MODEL, input="A bee lives in a hive")  # the client asks for base64
    np.testing.assert_allclose(vectors(b), vectors(f), atol=0)


def test_raw_base64_is_little_endian_float32(server):
    r = httpx.post(server[0] + "/v1/embeddings", json={"input": "hello", "encoding_format": "base64"})
    import base64

    vec = np.frombuffer(base64.b64decode(r.json()["data"][0]["embedding"]), dtype="<f4")
    assert vec.shape == (64,) and abs(np.linalg.norm(vec) - 1) < 1e-5


def test_token_id_inputs_like_langchain(client, server):
    engine = server[1]
    resp = client.embeddings.create(model=MODEL, input=[[40, 41, 42], [50, 51]], encoding_format="float")
    ids = [[engine.bos.token_id, 40, 41, 42], [engine.bos.token_id, 50, 51]]
    np.testing.assert_allclose(vectors(resp), reference(engine, ids, 2), atol=1e-5)
    single = client.embeddings.create(model=MODEL, input=[40, 41, 42], encoding_format="float")
    np.testing.assert_allclose(vectors(single)[0], vectors(resp)[0], atol=1e-6)


def test_layer_pooling_and_normalize_options(client, server):
    engine = server[1]
    ids = engine.encode_texts(["def add(a, b): return a + b"])
    resp = client.embeddings.create(model=MODEL, input="def add(a, b): return a + b", encoding_format="float",
                                    extra_body={"layer": 4, "pooling": "last", "normalize": False})
    np.testing.assert_allclose(vectors(resp), reference(engine, ids, 4, "last", False), atol=1e-5)
    assert abs(np.linalg.norm(vectors(resp)) - 1) > 1e-3


def test_completion_greedy_and_seeded(client):
    a = client.completions.create(model=MODEL, prompt="The quick brown", max_tokens=6, temperature=0)
    b = client.completions.create(model=MODEL, prompt="The quick brown", max_tokens=6, temperature=0)
    assert a.choices[0].text == b.choices[0].text
    assert a.usage.completion_tokens <= 6 and a.choices[0].finish_reason in ("stop", "length")
    s1 = client.completions.create(model=MODEL, prompt="Tom has", max_tokens=8, temperature=1.0, top_p=0.9, seed=7)
    s2 = client.completions.create(model=MODEL, prompt="Tom has", max_tokens=8, temperature=1.0, top_p=0.9, seed=7)
    assert s1.choices[0].text == s2.choices[0].text


def test_stop_string_cuts_the_text(client):
    full = client.completions.create(model=MODEL, prompt="Rivers flow", max_tokens=12, temperature=0)
    text = full.choices[0].text
    stop = text[3:5] if len(text) >= 5 else None
    if stop is None or not stop.strip():
        pytest.skip("greedy text too short to pick a stop string")
    cut = client.completions.create(model=MODEL, prompt="Rivers flow", max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].text == text[: text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_chat_completion(client, server):
    engine = server[1]
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "How many apples?"}]
    r = client.chat.completions.create(model=MODEL, max_tokens=5, temperature=0, messages=msgs)
    ids = engine.encode_chat(msgs)  # what the route tokenizes; the reference is transformers' generate
    want = greedy_reference(engine.loaded, [ids], 5, eos_ids_of(engine.loaded.model, engine.loaded.tokenizer))[0]
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == engine.loaded.tokenizer.decode(want, skip_special_tokens=True)
    assert r.usage.completion_tokens == len(want) and r.usage.prompt_tokens == len(ids)
    assert r.choices[0].finish_reason == ("length" if len(want) == 5 else "stop")


def test_streaming_equals_non_streaming(client):
    kw = dict(model=MODEL, prompt="A bee lives", max_tokens=10, temperature=0)
    whole = client.completions.create(**kw).choices[0].text
    chunks = list(client.completions.create(stream=True, **kw))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    msgs = [{"role": "user", "content": "Hello there"}]
    chat_whole = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, temperature=0)
    stream = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    parts = list(stream)
    assert parts[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in parts if p.choices) == \
        chat_whole.choices[0].message.content
    assert parts[-1].usage.completion_tokens == chat_whole.usage.completion_tokens


def test_sse_wire_format_ends_with_done(server):
    with httpx.stream("POST", server[0] + "/v1/completions", timeout=60,
                      json={"prompt": "hi", "max_tokens": 3, "temperature": 0, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert all(ln.startswith("data: ") for ln in lines) and lines[-1] == "data: [DONE]"


def test_models_health_and_metrics(client, server):
    url, engine = server
    m = client.models.list().data[0]
    assert m.id == MODEL
    info = httpx.get(url + "/v1/models").json()["data"][0]["mcr_exit"]
    assert info["embedding_layer"] == 2 and info["n_layers"] == 4 and info["phases"]["found"] is True
    assert len(info["profile"]["sha256"]) == 64 and info["profile"]["source"].endswith("phase_profile.json")
    assert httpx.get(url + "/health").json() == {"status": "ok", "ready": True}
    assert httpx.get(url + "/health/ready").status_code == 200
    text = httpx.get(url + "/metrics").text
    for name in ("mcr_exit_requests_total", "mcr_exit_request_seconds_bucket", "mcr_exit_queue_depth",
                 "mcr_exit_tokens_total", 'mcr_exit_blocks_executed_total{kind="embedding"}'):
        assert name in text


def test_many_concurrent_clients(client, server, monkeypatch):
    """24 embedding and 8 completion clients at once, queued while the engine is held: the embeddings run
    in at most 2 forward batches (the lane may have taken the first request before it blocked), the
    completions share prefills and decode steps; every result equals its unbatched reference."""
    from concurrent.futures import ThreadPoolExecutor

    engine = server[1]
    texts = [f"prompt number {i} about rivers and bees" for i in range(24)]
    ids = [engine.encode_texts([t])[0] for t in texts]
    expected = np.concatenate([reference(engine, [x], 2) for x in ids])  # one input per forward
    eos = eos_ids_of(engine.loaded.model, engine.loaded.tokenizer)
    greedy = greedy_reference(engine.loaded, ids[:8], 4, eos)
    before = {kind: engine.metrics.get("mcr_exit_batches_total", kind=kind) for kind in ("embedding", "prefill",
                                                                                           "decode")}

    def embed(i):
        return vectors(client.embeddings.create(model=MODEL, input=texts[i], encoding_format="float"))[0]

    def complete(i):
        return client.completions.create(model=MODEL, prompt=texts[i], max_tokens=4, temperature=0).choices[0].text

    all_queued = submissions(monkeypatch, engine, 32)
    with ThreadPoolExecutor(32) as pool:
        with engine_held(engine):
            got = [pool.submit(embed, i) for i in range(24)]
            gens = [pool.submit(complete, i) for i in range(8)]
            assert all_queued.wait(60)
        got, gens = [f.result(60) for f in got], [f.result(60) for f in gens]
    np.testing.assert_allclose(np.stack(got), expected, atol=1e-5)  # batching changes nothing
    assert gens == [engine.loaded.tokenizer.decode(g, skip_special_tokens=True) for g in greedy]
    delta = {k: engine.metrics.get("mcr_exit_batches_total", kind=k) - v for k, v in before.items()}
    # 8 KV slots, the holder in one: its prefill, 7 prompts in one prefill, the 8th when the holder is done
    assert delta["embedding"] <= 2 and delta["prefill"] <= 3
    assert delta["decode"] <= 8  # 27 decoded tokens (8 x 3 and the holder's 3) in at most 8 shared steps
    assert engine.stepper.pool.n_used == 0 and not engine.scheduler.rows
