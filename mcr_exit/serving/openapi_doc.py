"""The OpenAPI spec as the server behaves: 400 (never 422) for bad bodies, and every error status it sends.

FastAPI documents a 422 for each route with a body; this server answers 400 with an OpenAI-style error.
``document_errors`` rewrites the generated spec: each route lists the statuses it can send, all with the
one error schema, and the streamed routes list ``text/event-stream`` beside JSON.
"""

from __future__ import annotations

ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {
        "type": "object",
        "required": ["message", "type", "param", "code"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}},
    }},
}

DESCRIPTIONS = {
    "400": "Invalid request: a bad value, type or JSON body",
    "401": "Missing or invalid API key (only when the server has one)",
    "404": "The model named in the request is not served here",
    "413": "The request body is larger than --max-body-bytes",
    "429": "Queue or KV cache full; retry later",
    "503": "Warming up or shutting down",
    "504": "Timed out (an embedding past --timeout; a generation without a new token for --stall-timeout)",
}
_POST = ("400", "401", "404", "413", "429", "503", "504")
STATUSES = {  # path -> the error statuses its operations can send
    "/v1/embeddings": _POST,
    "/v1/completions": _POST,
    "/v1/chat/completions": _POST,
    "/v1/models": ("401",),
    "/metrics": ("401",),
    "/health/ready": ("503",),
}
STREAMED = ("/v1/completions", "/v1/chat/completions")


def document_errors(schema: dict, *, api_key: bool) -> dict:
    """Rewrite FastAPI's generated spec in place (and return it)."""
    components = schema.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    schemas["ErrorResponse"] = ERROR_SCHEMA
    ref = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
    if api_key:
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    for path, operations in schema.get("paths", {}).items():
        for op in operations.values():
            responses = op.setdefault("responses", {})
            responses.pop("422", None)
            codes = STATUSES.get(path, ())
            for code in codes:
                if code == "401" and not api_key:
                    continue
                responses[code] = {"description": DESCRIPTIONS[code], "content": ref}
            if api_key and "401" in codes:
                op["security"] = [{"bearer": []}]
            if path in STREAMED and "200" in responses:
                content = responses["200"].setdefault("content", {})
                content["text/event-stream"] = {"schema": {"type": "string"},
                                                "description": "with stream=true: server-sent events"}
    return schema
