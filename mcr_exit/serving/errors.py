"""Serving errors and the one table that maps them (and every McrExitError) to HTTP statuses.

Nothing here imports fastapi: the engine raises these, the app turns them into OpenAI-style JSON
``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

from mcr_exit.errors import ConfigError, DataError, McrExitError, MissingExtraError, ModelLoadError


class ServingError(McrExitError):
    """A request the server refuses; ``param`` names the offending request field when there is one."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code


class InvalidRequest(ServingError):
    """The body is well-formed JSON but a value is wrong (empty input, out-of-range layer, ...)."""


class ModelNotFound(ServingError):
    """The request names a model this server does not serve."""


class Unauthorized(ServingError):
    """Missing or wrong Bearer API key."""


class PayloadTooLarge(ServingError):
    """The body exceeds the configured size limit."""


class Overloaded(ServingError):
    """The bounded queue is full; retry later."""


class RequestTimeout(ServingError):
    """The request waited or ran longer than the configured timeout."""


class EngineNotReady(ServingError):
    """The engine has not finished warming up (or is shutting down)."""


class ClientDisconnected(ServingError):
    """The client closed the connection before its response; counted as 499 (nobody reads the body)."""


# (exception class, HTTP status, OpenAI error type); the first matching row wins, so subclasses come first.
ERROR_TABLE: tuple[tuple[type[Exception], int, str], ...] = (
    (Unauthorized, 401, "authentication_error"),
    (ModelNotFound, 404, "invalid_request_error"),
    (PayloadTooLarge, 413, "invalid_request_error"),
    (Overloaded, 429, "rate_limit_error"),
    (RequestTimeout, 504, "timeout_error"),
    (EngineNotReady, 503, "service_unavailable"),
    (ClientDisconnected, 499, "client_closed_request"),
    (InvalidRequest, 400, "invalid_request_error"),
    (ConfigError, 400, "invalid_request_error"),
    (DataError, 400, "invalid_request_error"),
    (MissingExtraError, 500, "server_error"),
    (ModelLoadError, 500, "server_error"),
    (McrExitError, 400, "invalid_request_error"),
)


def error_body(message: str, type_: str, *, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def status_and_body(exc: Exception) -> tuple[int, dict]:
    """HTTP status and OpenAI-style body for any exception; unknown ones are a 500 without internals."""
    for cls, status, type_ in ERROR_TABLE:
        if isinstance(exc, cls):
            param = getattr(exc, "param", None)
            code = getattr(exc, "code", None) or (str(status) if status != 400 else None)
            return status, error_body(str(exc).splitlines()[0] if str(exc) else cls.__name__, type_,
                                      param=param, code=code)
    return 500, error_body(f"internal error: {type(exc).__name__}", "server_error", code="500")
