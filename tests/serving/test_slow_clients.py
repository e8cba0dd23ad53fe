"""Slow clients: a connection that does not deliver its request within the read timeout is closed, with
either of uvicorn's HTTP parsers; a slow *response* is not cut by it."""

from __future__ import annotations

import json
import socket
import threading
import time
from urllib.parse import urlsplit

import httpx
import pytest

from mcr_exit.serving.app import create_app
from tests.serving.conftest import build_engine, running_server

READ_TIMEOUT = 1.0
BODY_HEAD = (b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
             b"Content-Length: 100\r\n\r\n")
HALF_SENT = {  # what each slow client sends before it stalls
    "nothing": b"",
    "half a request line": b"POST /v1/embe",
    "half the headers": b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Le",
    "a tenth of the body": BODY_HEAD + b'{"input": ',
    "a whole request, then half the next": b"GET /health HTTP/1.1\r\nHost: x\r\n\r\nGET /hea",
}


@pytest.fixture(scope="module", params=["httptools", "h11"])
def slow_server(request, tiny4, tiny4_profile):
    engine = build_engine(tiny4, tiny4_profile)
    with running_server(create_app(engine), read_timeout=READ_TIMEOUT, http=request.param) as url:
        parts = urlsplit(url)
        yield url, (parts.hostname, parts.port), engine


def _closed_after(sock: socket.socket, limit: float) -> tuple[float, bytes]:
    """Seconds until the server closes ``sock`` (reading whatever it sends), or ``limit`` if it does not."""
    t0, got = time.monotonic(), b""
    sock.settimeout(0.25)
    while time.monotonic() - t0 < limit:
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            continue
        except ConnectionResetError:
            break
        if not chunk:
            break
        got += chunk
    return time.monotonic() - t0, got


def test_half_sent_requests_are_closed(slow_server):
    _, addr, _ = slow_server
    socks = {}
    for name, data in HALF_SENT.items():  # all at once: the deadlines run side by side
        s = socket.create_connection(addr, timeout=5)
        if data:
            s.sendall(data)
        socks[name] = s
    t0 = time.monotonic()
    try:
        for name, s in socks.items():
            _, got = _closed_after(s, 6 * READ_TIMEOUT)
            assert time.monotonic() - t0 < 4 * READ_TIMEOUT, f"{name}: still open"
            if name.startswith("a whole request"):
                assert got.startswith(b"HTTP/1.1 200")  # the whole request was answered first
    finally:
        for s in socks.values():
            s.close()
    assert httpx.get(slow_server[0] + "/health", timeout=5).status_code == 200  # the server is fine


def test_a_slow_but_steady_client_and_a_slow_response_are_not_cut(slow_server, monkeypatch):
    url, addr, engine = slow_server
    body = b'{"input": "sent in two pieces"}'
    with socket.create_connection(addr, timeout=10) as s:
        s.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body[:10])
        time.sleep(READ_TIMEOUT / 3)  # a pause well inside the deadline
        s.sendall(body[10:])
        s.settimeout(10)
        assert s.recv(65536).startswith(b"HTTP/1.1 200")
    real_run, pause = engine.scheduler._launch_embed, threading.Event()

    def slow_run(batch):
        pause.wait(2 * READ_TIMEOUT)  # never set: the answer takes twice the read timeout
        return real_run(batch)

    monkeypatch.setattr(engine.scheduler, "_launch_embed", slow_run)
    t0 = time.monotonic()
    r = httpx.post(url + "/v1/embeddings", json={"input": "a slow answer"}, timeout=30)
    assert r.status_code == 200 and time.monotonic() - t0 > 2 * READ_TIMEOUT


def test_oversized_headers_are_refused(slow_server):
    _, addr, _ = slow_server
    with socket.create_connection(addr, timeout=10) as s:
        try:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: " + b"a" * 200_000 + b"\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed while we were still sending: refused
        else:
            elapsed, got = _closed_after(s, 6 * READ_TIMEOUT)
            assert elapsed < 4 * READ_TIMEOUT and not got.startswith(b"HTTP/1.1 200"), got[:80]


def test_a_large_body_read_with_its_head_is_not_a_large_head(slow_server):
    """Small headers and a 200 kB body sent at once (one read for the server): the head cap does not count
    the body, so the request reaches the app (which answers it: the input is too long), not the head cap."""
    _, addr, _ = slow_server
    body = json.dumps({"input": "word " * 40_000}).encode()
    assert len(body) > 2 * 64 * 1024
    with socket.create_connection(addr, timeout=10) as s:
        s.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        s.settimeout(30)
        got = s.recv(65536)
    assert b"headers too large" not in got and b"invalid_request_error" in got, got[:300]
