"""``create_app(engine, ...)``: the FastAPI layer over an Engine (auth, limits, errors, metrics, lifespan).

fastapi is imported lazily by the caller's first use of this module; a missing extra names ``[serve]``.
"""

from __future__ import annotations

from contextlib import asynccontextmanager

from mcr_exit.errors import MissingExtraError
from mcr_exit.serving.errors import ClientDisconnected, error_body, status_and_body
from mcr_exit.serving.middleware import KNOWN_ROUTES, AuthMiddleware, BodyLimitMiddleware, MetricsMiddleware

__all__ = ["KNOWN_ROUTES", "create_app"]

_UNION_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}


def _fastapi():
    try:
        import fastapi
    except ImportError as exc:
        raise MissingExtraError("fastapi", "serve") from exc
    return fastapi


def create_app(engine, *, api_key: str | None = None, max_body_bytes: int = 4 * 1024 * 1024,
               served_model_names: tuple[str, ...] = (), docs: bool = True):
    """The HTTP app.

    ``api_key``: required as ``Authorization: Bearer KEY`` on every path but /health and /health/ready,
    /docs, /redoc and /openapi.json included. ``docs=False`` removes those three (404).
    """
    fastapi = _fastapi()
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect

    from mcr_exit.errors import McrExitError
    from mcr_exit.serving.openapi_doc import document_errors
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

    urls = {} if docs else {"openapi_url": None, "docs_url": None, "redoc_url": None}
    app = fastapi.FastAPI(title="mcr-exit", version="1", lifespan=lifespan, **urls)
    app.state.engine = engine
    app.include_router(build_router(engine, served_model_names))
    generate_spec = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = document_errors(generate_spec(), api_key=api_key is not None)
        return app.openapi_schema

    app.openapi = openapi

    @app.get("/health")
    async def health():
        return {"status": "ok", "ready": engine.is_ready()}

    @app.get("/health/ready")
    async def ready():
        ok = engine.is_ready()
        status = "ready" if ok else "failed" if engine.has_failed() else "warming_up"
        return JSONResponse({"status": status}, status_code=200 if ok else 503)

    @app.exception_handler(McrExitError)
    async def domain_error(_request, exc: McrExitError):
        status, body = status_and_body(exc)
        return JSONResponse(body, status_code=status)

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
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))  # 405: Allow

    @app.exception_handler(ClientDisconnect)
    async def client_gone(_request, _exc):  # the body never came whole (the read deadline closed it): no 500
        return JSONResponse(status_and_body(ClientDisconnected("the client went away mid-request"))[1],
                            status_code=499)

    @app.exception_handler(Exception)
    async def internal_error(_request, exc: Exception):
        status, body = status_and_body(exc)
        return JSONResponse(body, status_code=status)

    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes)  # the last added runs first
    if api_key is not None:
        app.add_middleware(AuthMiddleware, api_key=api_key)
    app.add_middleware(MetricsMiddleware, metrics=engine.metrics)
    return app
