"""Every bad input gets an OpenAI-style error with the right 4xx, and the server stays up."""

from __future__ import annotations

import httpx
import openai
import pytest

MODEL = "tiny-llama"


def _error(r: httpx.Response, status: int, param: str | None = "any") -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param != "any":
        assert err["param"] == param
    return err


@pytest.mark.parametrize("body, param", [
    ({"input": ""}, "input"),
    ({"input": "   "}, "input"),
    ({"input": []}, "input"),
    ({"input": ["fine", ""]}, "input"),
    ({"input": [[]]}, "input"),
    ({"input": 123}, "input"),
    ({"input": [1.5, 2]}, "any"),
    ({"input": {"text": "x"}}, "any"),
    ({"input": ["a", 1]}, "any"),
    ({"input": [[1, 2], "a"]}, "any"),
    ({"input": [10**9]}, "input"),
    ({"input": [-1]}, "input"),
    ({"input": "x", "layer": 5}, "layer"),
    ({"input": "x", "layer": -1}, "layer"),
    ({"input": "x", "layer": "two"}, "layer"),
    ({"input": "x", "encoding_format": "int8"}, "encoding_format"),
    ({"input": "x", "pooling": "max"}, "pooling"),
    ({"input": "x", "dimensions": 3}, "dimensions"),
    ({"input": ["x"] * 9}, "input"),
    ({"input": "word " * 200}, "input"),
    ({}, "input"),
])
def test_bad_embedding_requests_are_400(server, body, param):
    _error(httpx.post(server[0] + "/v1/embeddings", json=body), 400, param)


def test_truncate_on_request_accepts_long_input(server):
    r = httpx.post(server[0] + "/v1/embeddings", json={"input": "word " * 200, "truncate": True})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 64


@pytest.mark.parametrize("route, body, param", [
    ("/v1/completions", {"prompt": "hi", "max_tokens": -1}, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 10**6}, "max_tokens"),
    ("/v1/completions", {"prompt": "", "max_tokens": 3}, "prompt"),
    ("/v1/completions", {"prompt": "hi", "temperature": -0.5}, "temperature"),
    ("/v1/completions", {"prompt": "hi", "top_p": 0}, "top_p"),
    ("/v1/completions", {"prompt": "hi", "n": 2}, "n"),
    ("/v1/completions", {"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ("/v1/completions", {"prompt": [], "max_tokens": 3}, "prompt"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": "ten"}, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": -1, "stream": True}, "max_tokens"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": ""}]}, "messages.0.content"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, "any"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": -3}, "max_tokens"),
])
def test_bad_generation_requests_are_400(server, route, body, param):
    _error(httpx.post(server[0] + route, json=body), 400, param)


def test_unknown_model_is_404(client, server):
    with pytest.raises(openai.NotFoundError) as e:
        client.embeddings.create(model="gpt-4o", input="hello")
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    _error(httpx.post(server[0] + "/v1/chat/completions",
                      json={"model": "nope", "messages": [{"role": "user", "content": "x"}]}), 404, "model")


def test_openai_client_sees_bad_request_errors(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=-1)
    assert e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model=MODEL, input="x", extra_body={"layer": 99})


def test_malformed_json_oversized_body_and_unknown_route(server):
    url = server[0]
    _error(httpx.post(url + "/v1/embeddings", content=b"{not json", headers={"content-type": "application/json"}),
           400)
    _error(httpx.post(url + "/v1/embeddings", json={"input": "x" * 70_000}), 413)

    def chunks():
        for _ in range(70):
            yield b"x" * 1024

    _error(httpx.post(url + "/v1/embeddings", content=chunks()), 413)
    _error(httpx.get(url + "/v1/nothing"), 404)
    _error(httpx.get(url + "/v1/embeddings"), 405)


def test_server_stays_up_after_bad_input(client):
    assert client.embeddings.create(model=MODEL, input="still alive").data[0].embedding
    assert httpx.get(str(client.base_url).replace("/v1/", "/health")).status_code == 200
