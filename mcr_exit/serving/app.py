"""``create_app(engine, ...)``: the FastAPI layer over an Engine (auth, limits, errors, metrics, lifespan).

fastapi is imported lazily by the caller's first use of this module; a missing extra names ``[serve]``.
"""

from __future__ import annotations

import hmac
import json
import time
from contextlib import asynccontextmanager

from mcr_exit.errors import MissingExtraError
from mcr_exit.serving.errors import PayloadTooLarge, Unauthorized, error_body, status_and_body

# Routes whose metrics get their own label; anything else is counted as "other" (bounded cardinality).
KNOWN_ROUTES = ("/v1/embeddings", "/v1/completions", "/v1/chat/completions", "/v1/models", "/health",
                "/health/ready", "/metrics")


_UNION_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}


def _fastapi():
    try:
        import fastapi
    except ImportError as exc:
        raise MissingExtraError("fastapi", "serve") from exc
    return fastapi


async def _send_json(send, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


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
            if int(length) > self.max_bytes:
                return await _send_json(send, *status_and_body(too_large))
            return await self.app(scope, receive, send)
        messages, total = [], 0
        while True:
            msg = await receive()
            messages.append(msg)
            total += len(msg.get("body", b""))
            if total > self.max_bytes:
                return await _send_json(send, *status_and_body(too_large))
            if msg["type"] != "http.request" or not msg.get("more_body"):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()

        return await self.app(scope, replay, send)


class MetricsMiddleware:
    """Count requests by route and status, and observe their latency (streams: until the last byte)."""

    def __init__(self, app, metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in KNOWN_ROUTES else "other"
        status, t0 = {"code": 500}, time.perf_counter()

        async def watch(msg):
            if msg["type"] == "http.response.start":
                status["code"] = msg["status"]
            await send(msg)

        try:
            await self.app(scope, receive, watch)
        finally:
            self.metrics.inc("mcr_exit_requests_total", route=route, status=str(status["code"]))
            self.metrics.observe("mcr_exit_request_seconds", time.perf_counter() - t0, route=route)


def create_app(engine, *, api_key: str | None = None, max_body_bytes: int = 4 * 1024 * 1024,
               served_model_names: tuple[str, ...] = ()):
    """The HTTP app. ``api_key``: required as ``Authorization: Bearer KEY`` on every route but /health*."""
    fastapi = _fastapi()
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    from mcr_exit.errors import McrExitError
    from mcr_exit.serving.routes import build_router

    @asynccontextmanager
    async def lifespan(_app):
        # Start the worker without waiting for its warm-up: /health answers at once and
        # /health/ready turns 200 when the warm-up is done (requests before that get 503).
        started_here = not engine.is_ready()
        if started_here:
            engine.start()
        yield
        if started_here:
            await engine.astop()

    app = fastapi.FastAPI(title="mcr-exit", version="1", lifespan=lifespan)
    app.state.engine = engine

    def require_key(authorization: str | None = fastapi.Header(None)) -> None:
        if api_key is None:
            return
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise Unauthorized("missing or invalid API key: send 'Authorization: Bearer <key>'",
                               code="invalid_api_key")

    app.include_router(build_router(engine, served_model_names), dependencies=[fastapi.Depends(require_key)])

    @app.get("/health")
    async def health():
        return {"status": "ok", "ready": engine.is_ready()}

    @app.get("/health/ready")
    async def ready():
        ok = engine.is_ready()
        return JSONResponse({"status": "ready" if ok else "warming_up"}, status_code=200 if ok else 503)

    @app.exception_handler(McrExitError)
    async def domain_error(_request, exc: McrExitError):
        status, body = status_and_body(exc)
        headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, Unauthorized) else None
        return JSONResponse(body, status_code=status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        loc = []
        for part in (p for p in first.get("loc", ()) if p != "body"):
            if isinstance(part, str) and ("[" in part or part in _UNION_TAGS):
                break  # pydantic names the union member it tried; the field is what the client sent
            loc.append(str(part))
        param = ".".join(loc) or None
        msg = f"{param or 'body'}: {first.get('msg', 'invalid request')}"
        return JSONResponse(error_body(msg, "invalid_request_error", param=param), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(_request, exc: HTTPException):
        return JSONResponse(error_body(str(exc.detail), "invalid_request_error", code=str(exc.status_code)),
                            status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def internal_error(_request, exc: Exception):
        status, body = status_and_body(exc)
        return JSONResponse(body, status_code=status)

    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=engine.metrics)
    return app
