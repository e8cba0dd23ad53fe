"""Hostile bodies get a 400 (never a 500), and the keep-alive connection stays usable after it.

The bodies are raw JSON bytes (a lone surrogate is legal JSON, ``"\\ud800"``, but no valid text), sent
on one http.client connection, each followed by a request on the same socket.
"""

from __future__ import annotations

import http.client
import json
from urllib.parse import urlsplit

import httpx
import pytest

CHAT = "/v1/chat/completions"
BIG_INT = b"1" + b"0" * 400  # an integer JSON allows and no float holds


def _chat(content: bytes) -> bytes:
    return b'{"max_tokens": 2, "messages": [{"role": "user", "content": ' + content + b"}]}"


HOSTILE = [  # (route, raw body, the param the error names)
    ("/v1/embeddings", b'{"input": "\\ud800"}', "input"),
    ("/v1/embeddings", b'{"input": ["fine", "a\\udfffb"]}', "input"),
    ("/v1/embeddings", b'{"input": "x", "model": "\\ud800"}', "model"),
    ("/v1/completions", b'{"prompt": "\\ud800", "max_tokens": 2}', "prompt"),
    ("/v1/completions", b'{"prompt": "hi", "stop": ["\\ud800"]}', "stop"),
    (CHAT, _chat(b'"\\ud800"'), "messages.0.content"),
    (CHAT, _chat(b'[{"type": "text", "text": "\\ud800"}]'), "messages.0.content.0.text"),
    ("/v1/completions", b'{"prompt": "hi", "seed": 18446744073709551616}', "seed"),
    ("/v1/completions", b'{"prompt": "hi", "seed": -1}', "seed"),
    (CHAT, b'{"messages": [{"role": "user", "content": "hi"}], "seed": 9223372036854775808}', "seed"),
    ("/v1/completions", b'{"prompt": "hi", "temperature": ' + BIG_INT + b"}", "temperature"),
    ("/v1/completions", b'{"prompt": "hi", "temperature": NaN}', "temperature"),
    ("/v1/completions", b'{"prompt": "hi", "top_p": Infinity}', "top_p"),
    ("/v1/completions", b'{"prompt": "hi", "n": 2.0}', "n"),
    ("/v1/completions", b'{"prompt": "hi", "n": 1.5}', "n"),
    (CHAT, _chat(b'[{"type": "text", "text": 123}]'), "messages.0.content"),
    (CHAT, _chat(b'[{"type": "text", "text": null}]'), "messages.0.content"),
    (CHAT, _chat(b'[{"type": "text", "text": ["a", "b"]}]'), "messages.0.content"),
    (CHAT, _chat(b'[{"type": "text"}]'), "messages.0.content"),
    (CHAT, _chat(b'["just a string"]'), "messages.0.content"),
    (CHAT, _chat(b'[{"text": "no type"}]'), "messages.0.content"),
]


@pytest.fixture(scope="module")
def conn(server):
    parts = urlsplit(server[0])
    c = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    yield c
    c.close()


@pytest.mark.parametrize("route, body, param", HOSTILE, ids=[f"{r}:{b[:60]!r}" for r, b, _ in HOSTILE])
def test_hostile_body_is_400_and_the_connection_lives_on(conn, route, body, param):
    conn.request("POST", route, body=body, headers={"content-type": "application/json"})
    r = conn.getresponse()
    data = r.read()
    assert r.status == 400, data
    err = json.loads(data)["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param, err
    sock = conn.sock
    assert sock is not None, "the server closed the connection after the 400"
    conn.request("GET", "/health")  # the next request on the same connection
    r = conn.getresponse()
    assert r.status == 200 and json.loads(r.read())["status"] == "ok"
    assert conn.sock is sock  # reused, not reconnected


def test_tiny_temperature_is_greedy(server):
    """1e-300 (a float32 0) is below the greedy threshold: the same tokens as temperature 0, no NaN."""
    url = server[0] + "/v1/completions"
    out = {}
    for t in (0, 1e-300, 1e-5):
        r = httpx.post(url, json={"prompt": "The cat", "max_tokens": 8, "temperature": t}, timeout=60)
        assert r.status_code == 200, r.text
        out[t] = r.json()["choices"][0]["text"]
    assert out[1e-300] == out[0] == out[1e-5]


def test_n_one_as_a_float_is_accepted(server):
    r = httpx.post(server[0] + "/v1/completions", json={"prompt": "hi", "max_tokens": 2, "n": 1.0}, timeout=60)
    assert r.status_code == 200 and len(r.json()["choices"]) == 1


def test_chat_content_parts_keep_their_text(server):
    body = {"max_tokens": 2, "temperature": 0, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "hello "}, {"type": "image_url", "image_url": {"url": "x"}},
        {"type": "text", "text": "there"}]}]}
    parts = httpx.post(server[0] + CHAT, json=body, timeout=60)
    plain = httpx.post(server[0] + CHAT, json={**body, "messages": [{"role": "user", "content": "hello there"}]},
                       timeout=60)
    assert parts.status_code == plain.status_code == 200
    assert parts.json()["usage"] == plain.json()["usage"]


def test_over_long_chat_does_not_suggest_truncate(server):
    for content in ("word " * 200, "x" * 70 * 64):  # too many tokens; too many characters to tokenize
        r = httpx.post(server[0] + CHAT, json={"messages": [{"role": "user", "content": content}]}, timeout=60)
        assert r.status_code == 400
        err = r.json()["error"]
        assert err["param"] == "messages" and "truncate" not in err["message"], err
