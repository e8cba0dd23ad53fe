"""The protocol details: a stream's in-band error counted under its status, 405 with Allow, an OpenAPI spec
that says what the server sends, the docs behind the key (or off), and no local path in /v1/models."""

from __future__ import annotations

import re

import httpx
import pytest

from mcr_exit.serving.app import create_app
from tests.serving.conftest import build_engine, running_server

POSTS = ("/v1/embeddings", "/v1/completions", "/v1/chat/completions")
DOCS = ("/docs", "/redoc", "/openapi.json")


def _count(metrics: str, route: str, status: str) -> float:
    m = re.search(rf'mcr_exit_requests_total{{route="{re.escape(route)}",status="{status}"}} (\S+)', metrics)
    return float(m.group(1)) if m else 0.0


def test_error_inside_a_stream_is_counted_under_its_status(tiny4, tiny4_profile, monkeypatch):
    engine = build_engine(tiny4, tiny4_profile)
    with running_server(create_app(engine)) as url:
        def broken_step(B, span):
            raise RuntimeError("a decode step failed")

        monkeypatch.setattr(engine.stepper, "step", broken_step)
        with httpx.stream("POST", url + "/v1/completions", timeout=60,
                          json={"prompt": "hello", "max_tokens": 8, "stream": True}) as r:
            assert r.status_code == 200  # the headers went out before the failure
            events = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert any('"error"' in e and '"server_error"' in e for e in events) and events[-1] == "data: [DONE]"
        metrics = httpx.get(url + "/metrics").text
        assert _count(metrics, "/v1/completions", "500") == 1
        assert _count(metrics, "/v1/completions", "200") == 0


def test_405_keeps_its_allow_header(server):
    for path, method, allowed in (("/v1/embeddings", "GET", "POST"), ("/v1/models", "POST", "GET"),
                                  ("/health", "DELETE", "GET")):
        r = httpx.request(method, server[0] + path)
        assert r.status_code == 405 and r.headers.get("allow") == allowed, (path, r.headers)
        assert r.json()["error"]["code"] == "405"


def test_openapi_lists_the_statuses_the_server_sends(server):
    spec = httpx.get(server[0] + "/openapi.json").json()
    for path in POSTS:
        responses = spec["paths"][path]["post"]["responses"]
        assert "422" not in responses
        assert {"200", "400", "404", "413", "429", "503", "504"} <= set(responses), (path, sorted(responses))
        assert responses["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
        assert "401" not in responses  # this server has no key: it never sends 401
    for path in POSTS[1:]:
        assert "text/event-stream" in spec["paths"][path]["post"]["responses"]["200"]["content"]
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    assert "503" in spec["paths"]["/health/ready"]["get"]["responses"]


@pytest.fixture(scope="module")
def keyed(tiny4, tiny4_profile):
    engine = build_engine(tiny4, tiny4_profile)
    with running_server(create_app(engine, api_key="s3cret")) as url:
        yield url


def test_docs_are_behind_the_key(keyed, server):
    good = {"Authorization": "Bearer s3cret"}
    for path in DOCS:
        assert httpx.get(keyed + path).status_code == 401, path
        assert httpx.get(keyed + path, headers={"Authorization": "Bearer nope"}).status_code == 401, path
        assert httpx.get(keyed + path, headers=good).status_code == 200, path
        assert httpx.get(server[0] + path).status_code == 200, path  # no key on the server: open
    assert httpx.get(keyed + "/v1/nothing").status_code == 401  # nothing is probed without the key
    spec = httpx.get(keyed + "/openapi.json", headers=good).json()
    assert "401" in spec["paths"]["/v1/embeddings"]["post"]["responses"]
    assert spec["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"


def test_docs_can_be_turned_off(tiny4, tiny4_profile):
    engine = build_engine(tiny4, tiny4_profile)
    with running_server(create_app(engine, api_key="k", docs=False)) as url:
        for path in DOCS:
            assert httpx.get(url + path, headers={"Authorization": "Bearer k"}).status_code == 404, path
        assert httpx.get(url + "/v1/models", headers={"Authorization": "Bearer k"}).status_code == 200


def test_models_does_not_reveal_the_profile_path(server, tiny4_profile):
    r = httpx.get(server[0] + "/v1/models")
    profile = r.json()["data"][0]["mcr_exit"]["profile"]
    assert profile["source"] == "phase_profile.json" and len(profile["sha256"]) == 64
    assert str(tiny4_profile.parent) not in r.text and str(tiny4_profile.resolve().parent) not in r.text
