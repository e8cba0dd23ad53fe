"""The serving engine: owns the model, one worker thread, dynamic batching. Knows nothing about HTTP.

Embeddings run the one early-exit path (``models.forward.hidden_at``) to hidden index k; jobs from
many requests are packed into forward batches under a token budget. Generation runs at full depth
through ``generation.generate_batch`` (or an optional vLLM generator). The model only ever runs on
the worker thread; async callers wait on futures, so the event loop never blocks on it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from mcr_exit.errors import ConfigError, DataError
from mcr_exit.models import LoadedModel
from mcr_exit.models.tokens import encode_prompts, pad_id_of, resolve_bos
from mcr_exit.serving.errors import EngineNotReady, InvalidRequest, Overloaded, RequestTimeout
from mcr_exit.serving.generation import GenerationOutput, GenerationRequest
from mcr_exit.serving.metrics import Metrics
from mcr_exit.serving.pooling import POOLINGS
from mcr_exit.serving.profile_source import ProfileSource


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    max_queue: int = 128  # jobs waiting for the worker; one more is answered with Overloaded (429)
    max_batch_tokens: int = 8192  # padded tokens per embedding forward
    max_batch_size: int = 64  # sequences per embedding forward
    max_gen_batch: int = 8  # requests per generate call
    max_inputs: int = 256  # inputs per embedding request
    max_input_tokens: int = 2048  # tokens per input (BOS included)
    max_new_tokens: int = 1024  # cap on a request's max_tokens
    max_layer: int | None = None  # highest hidden index a request may ask for; None = L
    request_timeout_s: float = 120.0
    pooling: str = "mean"
    normalize: bool = True
    warmup: bool = True

    def __post_init__(self):
        if self.pooling not in POOLINGS:
            raise ConfigError(f"pooling must be one of {', '.join(POOLINGS)}, got {self.pooling!r}")
        for name in ("max_queue", "max_batch_tokens", "max_batch_size", "max_gen_batch", "max_inputs",
                     "max_input_tokens", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")


@dataclass(eq=False)
class _Job:
    kind: str  # "embed" or "generate"
    future: Future
    deadline: float
    payload: object
    cancelled: threading.Event = field(default_factory=threading.Event)


@dataclass(frozen=True, kw_only=True)
class _EmbedPayload:
    ids: list[list[int]]
    layer: int
    pooling: str
    normalize: bool


@dataclass(frozen=True, kw_only=True)
class EmbeddingResult:
    vectors: torch.Tensor  # (N, d) float32 on the CPU
    layer: int
    prompt_tokens: int


class Engine:
    def __init__(self, loaded: LoadedModel, profile: ProfileSource | None = None,
                 config: EngineConfig | None = None, *, embedding_layer: int | None = None,
                 generator=None, metrics: Metrics | None = None):
        self.loaded, self.profile = loaded, profile
        self.config = config or EngineConfig()
        self.metrics = metrics or Metrics()
        self.generator = generator  # optional object with .generate(list[GenerationRequest]) (vLLM)
        L = loaded.n_layers
        k = embedding_layer if embedding_layer is not None else (profile.embedding_layer if profile else L)
        self.max_layer = L if self.config.max_layer is None else self.config.max_layer
        if not 0 <= k <= L or not 0 <= self.max_layer <= L:
            raise ConfigError(f"embedding layer {k} / max layer {self.max_layer} outside hidden 0..{L}")
        if k > self.max_layer:
            raise ConfigError(f"--max-layer {self.max_layer} is below the embedding layer {k}")
        self.embedding_layer = k
        self.bos = resolve_bos(loaded.tokenizer, "auto")
        self.pad_id = pad_id_of(loaded.tokenizer)
        self.vocab_size = int(loaded.model.get_input_embeddings().num_embeddings)
        self._queue: deque[_Job] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- lifecycle -------------------------------------------------------------------------
    @property
    def model_id(self) -> str:
        return self.loaded.spec.name

    @property
    def n_layers(self) -> int:
        return self.loaded.n_layers

    def start(self) -> None:
        """Start the worker thread; warm-up runs on it and ``is_ready()`` turns true afterwards."""
        if self._thread is not None:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._worker, name="mcr-exit-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            pending = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for job in pending:
            if not job.future.done():
                job.future.set_exception(EngineNotReady("the server is shutting down"))
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        self._ready.clear()

    async def astart(self) -> None:
        self.start()
        await asyncio.to_thread(self._ready.wait)

    async def astop(self) -> None:
        await asyncio.to_thread(self.stop)

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout)

    def is_ready(self) -> bool:
        return self._ready.is_set()

    def queue_depth(self) -> int:
        return len(self._queue)

    def is_overloaded(self) -> bool:
        return len(self._queue) >= self.config.max_queue

    # ---- tokenization (cheap, runs in the caller's thread) -------------------------------------
    def encode_texts(self, texts: list[str], *, truncate: bool = False, param: str = "input") -> list[list[int]]:
        """Token ids exactly as the analysis made them (``encode_prompts`` with the BOS policy "auto")."""
        for i, t in enumerate(texts):
            if not isinstance(t, str) or not t.strip():
                raise InvalidRequest(f"{param}[{i}] is an empty string", param=param)
        try:
            enc = encode_prompts(self.loaded.tokenizer, texts, self.bos, max_length=10**9)
        except DataError as exc:
            raise InvalidRequest(f"{param} has no tokens: {exc}", param=param) from exc
        if len(enc.kept) != len(texts):
            bad = sorted(set(range(len(texts))) - set(enc.kept))[0]
            raise InvalidRequest(f"{param}[{bad}] has no tokens", param=param)
        return self._check_lengths(enc.ids, truncate, param)

    def encode_token_ids(self, batch: list[list[int]], *, truncate: bool = False, param: str = "input"):
        out = []
        for i, ids in enumerate(batch):
            if not ids:
                raise InvalidRequest(f"{param}[{i}] is an empty list of token ids", param=param)
            if any(not 0 <= t < self.vocab_size for t in ids):
                raise InvalidRequest(f"{param}[{i}] has token ids outside 0..{self.vocab_size - 1}", param=param)
            ids = list(ids)
            if self.bos.prepend and ids[0] != self.bos.token_id:
                ids = [self.bos.token_id, *ids]
            out.append(ids)
        return self._check_lengths(out, truncate, param)

    def _check_lengths(self, ids: list[list[int]], truncate: bool, param: str) -> list[list[int]]:
        limit = self.config.max_input_tokens
        if len(ids) > self.config.max_inputs:
            raise InvalidRequest(f"{len(ids)} inputs exceed the limit of {self.config.max_inputs} per request",
                                 param=param)
        for i, x in enumerate(ids):
            if len(x) > limit and not truncate:
                raise InvalidRequest(f"{param}[{i}] has {len(x)} tokens, more than the limit of {limit} "
                                     "(send truncate=true to cut it)", param=param)
        return [x[:limit] for x in ids]

    def encode_chat(self, messages: list[dict]) -> list[int]:
        tok = self.loaded.tokenizer
        if getattr(tok, "chat_template", None):
            ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
            ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        else:  # a tokenizer without a template: a plain "role: content" transcript
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
            ids = self.encode_texts([text], param="messages")[0]
        return self._check_lengths([ids], False, "messages")[0]

    # ---- async API ---------------------------------------------------------------------------
    async def embed(self, ids: list[list[int]], *, layer: int | None = None, pooling: str | None = None,
                    normalize: bool | None = None) -> EmbeddingResult:
        layer = self.embedding_layer if layer is None else layer
        if not 0 <= layer <= self.max_layer:
            raise InvalidRequest(f"layer {layer} is out of range: this server allows hidden 0..{self.max_layer}",
                                 param="layer")
        pooling = pooling or self.config.pooling
        if pooling not in POOLINGS:
            raise InvalidRequest(f"pooling must be one of {', '.join(POOLINGS)}", param="pooling")
        payload = _EmbedPayload(ids=ids, layer=layer, pooling=pooling,
                                normalize=self.config.normalize if normalize is None else normalize)
        vectors = await self._wait(self._submit("embed", payload))
        return EmbeddingResult(vectors=vectors, layer=layer, prompt_tokens=sum(len(x) for x in ids))

    def check_generation(self, req: GenerationRequest) -> GenerationRequest:
        if req.max_tokens < 1 or req.max_tokens > self.config.max_new_tokens:
            raise InvalidRequest(f"max_tokens must be in 1..{self.config.max_new_tokens}, got {req.max_tokens}",
                                 param="max_tokens")
        if not 0 <= req.temperature <= 2:
            raise InvalidRequest("temperature must be in [0, 2]", param="temperature")
        if not 0 < req.top_p <= 1:
            raise InvalidRequest("top_p must be in (0, 1]", param="top_p")
        if len(req.stop) > 4:
            raise InvalidRequest("at most 4 stop sequences", param="stop")
        return req

    async def generate(self, req: GenerationRequest) -> GenerationOutput:
        return await self._wait(self._submit("generate", self.check_generation(req), req.cancelled))

    def submit_generate(self, req: GenerationRequest) -> _Job:
        """For streaming: queue the request now (so 429 comes before any byte is sent); await ``wait``."""
        return self._submit("generate", self.check_generation(req), req.cancelled)

    async def wait(self, job: _Job):
        return await self._wait(job)

    def _submit(self, kind: str, payload, cancelled: threading.Event | None = None) -> _Job:
        if not self.is_ready():
            raise EngineNotReady("the engine is warming up")
        job = _Job(kind=kind, future=Future(), deadline=time.monotonic() + self.config.request_timeout_s,
                   payload=payload, cancelled=cancelled or threading.Event())
        with self._cond:
            if self.is_overloaded():
                raise Overloaded(f"the queue is full ({self.config.max_queue} jobs waiting); retry later",
                                 code="queue_full")
            self._queue.append(job)
            self.metrics.set("mcr_exit_queue_depth", len(self._queue))
            self._cond.notify()
        return job

    async def _wait(self, job: _Job):
        remaining = max(0.0, job.deadline - time.monotonic())
        try:
            return await asyncio.wait_for(asyncio.wrap_future(job.future), timeout=remaining)
        except (asyncio.TimeoutError, TimeoutError) as exc:
            job.cancelled.set()
            raise RequestTimeout(f"the request took longer than {self.config.request_timeout_s:g} s") from exc
        except asyncio.CancelledError:
            job.cancelled.set()
            raise

    # ---- worker thread -------------------------------------------------------------------------
    def _worker(self) -> None:
        from mcr_exit.serving.worker import run_worker

        run_worker(self)
