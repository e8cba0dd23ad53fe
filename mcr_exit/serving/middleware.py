"""Plain ASGI middleware of the HTTP app: the API key, the body size limit, and request metrics.

Nothing here imports fastapi or starlette: each class wraps any ASGI app.
"""

from __future__ import annotations

import hmac
import json
import time

from mcr_exit.serving.errors import InvalidRequest, PayloadTooLarge, Unauthorized, status_and_body

# Routes whose metrics get their own label; anything else is counted as "other" (bounded cardinality).
KNOWN_ROUTES = ("/v1/embeddings", "/v1/completions", "/v1/chat/completions", "/v1/models", "/health",
                "/health/ready", "/metrics")
OPEN_ROUTES = ("/health", "/health/ready")  # answered without the API key
# A stream records the status of an error it reports in-band (after its 200 headers) under this scope key.
STATUS_KEY = "mcr_exit.status"


async def send_json(send, status: int, body: dict, headers: tuple = ()) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": data})


def key_matches(authorization: bytes | None, api_key: str) -> bool:
    """``Authorization: Bearer KEY``, compared in constant time."""
    scheme, _, token = (authorization or b"").decode("latin-1").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode())


class AuthMiddleware:
    """401 on every path but /health and /health/ready (the docs and the OpenAPI spec included) unless
    the request carries the key. Runs before the body is read, so an unauthenticated client costs nothing."""

    def __init__(self, app, api_key: str):
        self.app, self.api_key = app, api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in OPEN_ROUTES:
            return await self.app(scope, receive, send)
        authorization = next((v for k, v in scope.get("headers", []) if k == b"authorization"), None)
        if not key_matches(authorization, self.api_key):
            err = Unauthorized("missing or invalid API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
            return await send_json(send, *status_and_body(err), headers=((b"www-authenticate", b"Bearer"),))
        return await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """413 for bodies over ``max_bytes``, by Content-Length or by counting a chunked body."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = PayloadTooLarge(f"request body exceeds the limit of {self.max_bytes} bytes")
        length = dict(scope.get("headers", [])).get(b"content-length")
        if length is not None:
            if not length.strip().isdigit():
                return await send_json(send, *status_and_body(InvalidRequest("bad Content-Length header")))
            if int(length) > self.max_bytes:
                return await send_json(send, *status_and_body(too_large))
            return await self.app(scope, receive, send)
        messages, total = [], 0
        while True:
            msg = await receive()
            messages.append(msg)
            total += len(msg.get("body", b""))
            if total > self.max_bytes:
                return await send_json(send, *status_and_body(too_large))
            if msg["type"] != "http.request" or not msg.get("more_body"):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()

        return await self.app(scope, replay, send)


class MetricsMiddleware:
    """Count requests by route and status, and observe their latency (streams: until the last byte).

    A stream that fails after its 200 headers sets ``scope[STATUS_KEY]["code"]``: it is counted under the
    status of its in-band error, not as 200."""

    def __init__(self, app, metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in KNOWN_ROUTES else "other"
        status, t0 = {"code": 500}, time.perf_counter()
        scope[STATUS_KEY] = status

        async def watch(msg):
            if msg["type"] == "http.response.start":
                status["code"] = msg["status"]
            await send(msg)

        try:
            await self.app(scope, receive, watch)
        finally:
            self.metrics.inc("mcr_exit_requests_total", route=route, status=str(status["code"]))
            self.metrics.observe("mcr_exit_request_seconds", time.perf_counter() - t0, route=route)
