"""The OpenAI-compatible routes: /v1/embeddings, /v1/completions, /v1/chat/completions, /v1/models, /metrics."""

from __future__ import annotations

import asyncio
import functools
import json
import math
from pathlib import PurePath

from starlette.requests import Request  # at module level: FastAPI resolves the routes' annotations here

from mcr_exit.serving.errors import ClientDisconnected, InvalidRequest, ModelNotFound, status_and_body
from mcr_exit.serving.jobs import GenerationRequest
from mcr_exit.serving.middleware import STATUS_KEY
from mcr_exit.serving.schemas import (
    ChatCompletionRequest,
    TextChunks,
    CompletionRequest,
    EmbeddingRequest,
    chat_chunk,
    chat_response,
    completion_chunk,
    completion_response,
    embedding_response,
    new_id,
    usage_chunk,
)

CHAT_DEFAULT_MAX_TOKENS = 256


def _finite(value, param: str) -> float:
    """A JSON number as a float; an integer too large for a float is a 400, not an OverflowError."""
    try:
        out = float(value)
    except OverflowError:
        out = math.inf
    if not math.isfinite(out):
        raise InvalidRequest(f"{param} must be a finite number", param=param)
    return out


def public_source(source: str) -> str:
    """A profile source as /v1/models shows it: MLflow URIs as given, a local path by its last part only."""
    if source.startswith(("runs:/", "models:/")):
        return source
    return PurePath(source).name or source.strip("/\\") or "phase_profile.json"


async def until_disconnected(receive) -> None:
    """Return once the client has gone (its request body is read: the next message is the disconnect)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(request, work):
    """Await ``work`` (a coroutine); if the client disconnects first, cancel it and raise ClientDisconnected."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(until_disconnected(request.receive))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
    if not task.done() or task.cancelled():
        await asyncio.gather(task, return_exceptions=True)  # let the cancellation reach the engine
        raise ClientDisconnected("the client closed the connection before the response")
    return task.result()


def _split_inputs(value) -> tuple[list[str], list[list[int]]]:
    """(texts, token id lists) of an OpenAI ``input``/``prompt``; exactly one of them is non-empty."""
    if isinstance(value, str):
        return [value], []
    if not value:
        return [], []
    if all(isinstance(v, int) for v in value):
        return [], [list(value)]
    if all(isinstance(v, list) for v in value):
        return [], [list(v) for v in value]
    return list(value), []


@functools.lru_cache(maxsize=1)
def sse_response_class():
    """Starlette's StreamingResponse, closing its body generator as soon as the response ends, however it
    ends. When a client leaves a stream, ``send`` raises and Starlette gives up the response with the
    generator suspended at a ``yield``: its ``finally`` (which cancels the generation) would run only when
    the generator is garbage-collected, seconds or minutes later if a reference cycle holds it, while the
    engine generates on for nobody."""
    from fastapi.responses import StreamingResponse

    class SSEResponse(StreamingResponse):
        async def __call__(self, scope, receive, send):
            try:
                await super().__call__(scope, receive, send)
            finally:
                close = getattr(self.body_iterator, "aclose", None)
                if close is not None:
                    await close()

    return SSEResponse


def build_router(engine, served_model_names: tuple[str, ...] = ()):
    from fastapi import APIRouter
    from fastapi.responses import JSONResponse, PlainTextResponse

    router = APIRouter()
    names = (engine.model_id, *served_model_names)

    def check_model(name: str | None) -> str:
        if name is not None and name not in names:
            raise ModelNotFound(f"model '{name}' is not served here; use one of: {', '.join(names)}",
                                param="model", code="model_not_found")
        return name or engine.model_id

    async def encode(value, param: str, truncate: bool = False) -> list[list[int]]:
        """Token ids of an ``input``/``prompt``; the tokenizer runs off the event loop."""
        texts, token_lists = _split_inputs(value)
        if not texts and not token_lists:
            raise InvalidRequest(f"{param} must not be empty", param=param)
        engine.check_count(len(texts) + len(token_lists), param)  # before any tokenizing
        if texts:
            return await asyncio.to_thread(engine.encode_texts, texts, truncate=truncate, param=param)
        return engine.encode_token_ids(token_lists, truncate=truncate, param=param)

    def sampling(req, prompt_ids: list[int], max_tokens: int | None) -> GenerationRequest:
        if req.n != 1:
            raise InvalidRequest("only n=1 is supported", param="n")
        return GenerationRequest(prompt_ids=prompt_ids, max_tokens=max_tokens if max_tokens is not None else 16,
                                 temperature=_finite(req.temperature, "temperature"),
                                 top_p=_finite(req.top_p, "top_p"), stop=req.stop_strings(), seed=req.seed)

    @router.post("/v1/embeddings")
    async def embeddings(req: EmbeddingRequest, request: Request):
        model = check_model(req.model)
        if req.dimensions is not None and req.dimensions != engine.hidden_size:
            raise InvalidRequest(f"dimensions must be {engine.hidden_size} (no reduction is offered)",
                                 param="dimensions")
        ids = await encode(req.input, "input", req.truncate)
        # A client that gives up cancels its job: the batches it has not reached yet are never run.
        result = await unless_disconnected(request, engine.embed(ids, layer=req.layer, pooling=req.pooling,
                                                                 normalize=req.normalize))
        return JSONResponse(embedding_response(result.vectors, model=model, prompt_tokens=result.prompt_tokens,
                                               encoding_format=req.encoding_format))

    @router.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        model = check_model(req.model)
        gens = [sampling(req, ids, req.max_tokens) for ids in await encode(req.prompt, "prompt")]
        if req.stream:
            return stream(gens, model, chat=False, include_usage=req.include_usage(), scope=request.scope)
        outputs = await unless_disconnected(request, collect(gens))  # a gone client frees its KV slots
        return JSONResponse(completion_response(outputs, model=model))

    @router.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        model = check_model(req.model)
        for i, m in enumerate(req.messages):
            if not m.text().strip() and m.role != "assistant":
                raise InvalidRequest(f"messages[{i}].content is empty", param=f"messages.{i}.content")
        ids = await asyncio.to_thread(engine.encode_chat,
                                      [{"role": m.role, "content": m.text()} for m in req.messages])
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if max_tokens is None:  # the default fits the context that the prompt leaves
            max_tokens = max(1, min(CHAT_DEFAULT_MAX_TOKENS, engine.config.max_new_tokens,
                                    engine.context_len - len(ids)))
        gen = sampling(req, ids, max_tokens)
        if req.stream:
            return stream([gen], model, chat=True, include_usage=req.include_usage(), scope=request.scope)
        outputs = await unless_disconnected(request, collect([gen]))
        return JSONResponse(chat_response(outputs[0], model=model))

    def open_all(gens: list[GenerationRequest], stream_text: bool) -> list:
        """Queue every prompt of a request, or none: a refusal cancels what was queued."""
        events: asyncio.Queue = asyncio.Queue()
        handles = []
        try:
            for g in gens:
                handles.append(engine.open_generation(g, stream=stream_text, events=events))
        except Exception:
            for h in handles:
                h.cancel()
            raise
        return handles

    async def collect(gens: list[GenerationRequest]) -> list:
        handles = open_all(gens, stream_text=False)
        outputs = {}
        async for handle, kind, value in engine.events(handles):
            if kind == "done":
                outputs[id(handle)] = value
        return [outputs[id(h)] for h in handles]

    def stream(gens: list[GenerationRequest], model: str, *, chat: bool, include_usage: bool, scope: dict):
        handles = open_all(gens, stream_text=True)  # 400 / 429 now, before the first byte
        index = {id(h): i for i, h in enumerate(handles)}
        rid = new_id("chatcmpl" if chat else "cmpl")
        texts = TextChunks(rid, model, chat=chat)

        def chunk(i: int, text: str | None, finish: str | None, role: bool = False) -> str:
            if chat:
                delta = ({"role": "assistant", "content": ""} if role else {"content": text} if text else {})
                body = chat_chunk(rid, model, i, delta, finish)
            else:
                body = completion_chunk(rid, model, i, text or "", finish)
            return f"data: {json.dumps(body)}\n\n"

        async def sse():
            outputs = []
            try:
                if chat:
                    yield chunk(0, None, None, role=True)
                async for handle, kind, value in engine.events(handles):
                    if kind == "text":
                        yield texts.text(index[id(handle)], value)
                    elif kind == "done":
                        outputs.append(value)
                        yield chunk(index[id(handle)], None, value.finish_reason)
                if include_usage:
                    obj = "chat.completion.chunk" if chat else "text_completion"
                    yield f"data: {json.dumps(usage_chunk(rid, model, outputs, obj))}\n\n"
            except Exception as exc:  # noqa: BLE001 - headers are sent: report in-band, then end the stream
                status, body = status_and_body(exc)
                if isinstance(scope.get(STATUS_KEY), dict):  # /metrics counts the error's status
                    scope[STATUS_KEY]["code"] = status
                yield f"data: {json.dumps(body)}\n\n"
            finally:
                for h in handles:
                    h.cancel()  # a disconnected client frees its KV slot at the next step
            yield "data: [DONE]\n\n"

        return sse_response_class()(sse(), media_type="text/event-stream",
                                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @router.get("/v1/models")
    async def models():
        p = engine.profile
        info = {
            "n_layers": engine.n_layers, "embedding_layer": engine.embedding_layer, "max_layer": engine.max_layer,
            "phases": p.phases if p else None,
            "profile": {"source": public_source(p.source), "sha256": p.sha256,
                        "mlflow_run_id": p.doc.get("mlflow_run_id")}
            if p else None,
            "pooling": engine.config.pooling, "normalize": engine.config.normalize,
            "generation_engine": engine.generation_engine,
            "limits": {"context_tokens": engine.context_len, "max_input_tokens": engine.config.max_input_tokens,
                       "max_new_tokens": engine.config.max_new_tokens,
                       "embedding_timeout_s": engine.config.request_timeout_s,
                       "generation_stall_timeout_s": engine.config.stall_timeout_s,
                       "kv_slot_wait_s": engine.config.queue_timeout_s},
            "kv_cache": {k: v for k, v in engine.startup_report.items() if k.startswith("kv_")},
            "startup": engine.startup_report,
        }
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "mcr-exit",
                                            "mcr_exit": info} for name in names]}

    @router.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        engine.metrics.set("mcr_exit_queue_depth", engine.queue_depth())
        return PlainTextResponse(engine.metrics.render(), media_type="text/plain; version=0.0.4")

    return router
