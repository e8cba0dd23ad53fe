"""``VllmEngine``: the serving engine's public API over one vLLM ``AsyncLLM`` (``--engine vllm``).

It offers what the routes and the app use of ``Engine`` (the same request checks, events and errors),
on one copy of the weights, the one vLLM loaded:

- **generation** goes to ``AsyncLLM.generate`` with delta outputs: each engine step's new text reaches
  the caller's event queue as it comes. Leaving a stream cancels its task, and vLLM aborts the request.
- **embeddings** at layer k run inside vLLM's worker through ``collective_rpc("mcr_exit_embed")``
  (``vllm_worker.py``): the model's own forward stops after block k. The engine core serves such calls
  between two scheduler steps, so they never race a generation step. Inputs of waiting requests are
  batched here (one layer per batch, within ``--max-batch-tokens`` and ``--max-batch-size``), one call
  per batch: a generation step waits for at most one embedding batch.

Everything runs on the server's event loop; there is no engine thread.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from itertools import count

import numpy as np

from mcr_exit.errors import ConfigError
from mcr_exit.models.tokens import pad_id_of, resolve_bos
from mcr_exit.serving.config import EmbeddingResult, EngineConfig, served_layers
from mcr_exit.serving.engine import Engine
from mcr_exit.serving.errors import EngineNotReady, Overloaded, RequestTimeout
from mcr_exit.serving.inputs import InputEncoding
from mcr_exit.serving.jobs import EmbedJob, GenerationHandle, GenerationOutput, GenerationRequest, take_embed_batch
from mcr_exit.serving.metrics import Metrics

log = logging.getLogger("mcr_exit.serving")
GREEDY_BELOW = 1e-4  # the built-in engine's rule: a temperature below this is greedy


class _TokenizerOnly:
    """What ``InputEncoding`` reads of a loaded model: the tokenizer (no weights in this process)."""

    def __init__(self, tokenizer, name: str, location: str):
        from mcr_exit.models.loading import ModelSpec

        self.tokenizer = tokenizer
        self.spec = ModelSpec(name=name, source="vllm", location=location, revision=None, dtype="vllm",
                              device="vllm")


class _VllmHandle(GenerationHandle):
    """A generation handle whose cancel also cancels its vLLM task (vLLM then aborts the request)."""

    task: asyncio.Task | None = None

    def cancel(self) -> None:
        super().cancel()
        task = self.task
        if task is not None and not task.done() and self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(task.cancel)


class _Lanes:
    """What ``run_server`` stops on a signal (``engine.scheduler.stop()``), as on the built-in engine."""

    def __init__(self, engine: VllmEngine):
        self._engine = engine

    @property
    def stopping(self) -> bool:
        return self._engine.stopping

    def stop(self) -> None:
        self._engine.stop_now()


class VllmEngine(InputEncoding):
    generation_engine = "vllm"  # reported by /v1/models

    # The request checks and the event reading of the built-in engine: they use only ``config``,
    # ``context_len`` and the handles, so both engines answer the same requests the same way.
    check_generation = Engine.check_generation
    check_embedding = Engine.check_embedding
    events = Engine.events
    wait = Engine.wait
    generate = Engine.generate

    def __init__(self, llm, tokenizer, *, name: str, location: str, n_layers: int, hidden_size: int,
                 vocab_size: int, max_positions: int | None, profile=None, config: EngineConfig | None = None,
                 embedding_layer: int | None = None, metrics: Metrics | None = None,
                 max_model_len: int | None = None):
        self.llm = llm
        self.loaded = _TokenizerOnly(tokenizer, name, location)
        self.profile = profile
        self.config = config or EngineConfig()
        self.metrics = metrics or Metrics()
        self._n_layers = n_layers
        self.embedding_layer, self.max_layer = served_layers(n_layers, self.config, profile, embedding_layer)
        self.bos = resolve_bos(tokenizer, "auto")
        self.pad_id = pad_id_of(tokenizer)
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        want = self.config.max_input_tokens + self.config.max_new_tokens
        caps = [c for c in (max_positions, max_model_len) if c]
        self.context_len = min([want, *caps])
        self.scheduler = _Lanes(self)
        self.stopping = False
        self.startup_report: dict = {"engine": "vllm"}
        self.startup_error: str | None = None
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task] = set()
        self._running: dict[str, _VllmHandle] = {}
        self._ids = count()
        self._pieces: deque[tuple[EmbedJob, int]] = deque()
        self.queued_tokens = 0
        self._wakeup: asyncio.Event | None = None
        self.block_calls = [0] * n_layers  # embedding calls of each block inside vLLM's worker, from the worker
        for b in range(n_layers):
            self.metrics.inc("mcr_exit_embedding_block_calls_total", 0, block=str(b))

    # ---- lifecycle -------------------------------------------------------------------------
    @property
    def model_id(self) -> str:
        return self.loaded.spec.name

    @property
    def n_layers(self) -> int:
        return self._n_layers

    def start(self) -> None:
        """Start the embedding lane and the warm-up on the running event loop (the app's lifespan)."""
        if self._loop is not None:
            return
        self._loop = asyncio.get_running_loop()
        self.stopping = False
        self._wakeup = asyncio.Event()
        self._spawn(self._startup())

    def _spawn(self, coro) -> asyncio.Task:
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _startup(self) -> None:
        try:
            info = (await self.llm.collective_rpc("mcr_exit_describe"))[0]
            if info["n_layers"] != self.n_layers or info["hidden_size"] != self.hidden_size:
                raise ConfigError(f"vLLM's model has {info['n_layers']} blocks of width {info['hidden_size']}, "
                                  f"the config {self.n_layers} of width {self.hidden_size}")
            self.startup_report.update(vllm_model_class=info["model_class"], vllm_dtype=info["dtype"])
            self._spawn(self._embed_lane())
            if self.config.warmup:
                t0 = time.perf_counter()
                await self._embed_now(self.encode_texts(["Warm-up: the quick brown fox."]), self.embedding_layer)
                self.startup_report.update(warmup_s=round(time.perf_counter() - t0, 2))
        except Exception as exc:  # noqa: BLE001 - requests will show the failure; the server stays up
            log.exception("vLLM engine start-up failed")
            self.startup_error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        self._ready.set()
        self.metrics.set("mcr_exit_ready", 1)

    def stop_now(self) -> None:
        """Cancel everything waiting or running (callers get 503). Safe from any thread."""
        self.stopping = True
        if self._loop is None or self._loop.is_closed():
            return
        try:
            self._loop.call_soon_threadsafe(self._cancel_all)
        except RuntimeError:  # the loop has closed
            pass

    def _cancel_all(self) -> None:
        exc = EngineNotReady("the server is shutting down")
        for handle in list(self._running.values()):
            self._error(handle, exc)
            if handle.task is not None:
                handle.task.cancel()
        self._running.clear()
        pieces, self._pieces = list(self._pieces), deque()
        self.queued_tokens = 0
        for job, _ in pieces:
            if not job.future.done():
                job.future.set_exception(exc)
        if self._wakeup is not None:
            self._wakeup.set()

    def stop(self, timeout: float = 30.0) -> None:
        self.stop_now()
        self._ready.clear()
        self.metrics.set("mcr_exit_ready", 0)

    async def astart(self) -> None:
        self.start()
        await asyncio.to_thread(self._ready.wait)

    async def astop(self) -> None:
        self.stopping = True
        self._cancel_all()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._ready.clear()
        self.metrics.set("mcr_exit_ready", 0)
        await asyncio.to_thread(self.llm.shutdown)

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout)

    def has_failed(self) -> bool:
        """The built-in engine's "generation failed for good" state; vLLM's engine reports its own errors."""
        return False

    def is_ready(self) -> bool:
        return self._ready.is_set() and not self.stopping

    def queue_depth(self) -> int:
        return max(0, len(self._running) - self.config.max_running)

    def is_overloaded(self) -> bool:
        return self.queue_depth() >= self.config.max_queue

    def _require_ready(self) -> None:
        if self.startup_error:
            raise EngineNotReady(f"the engine failed to start: {self.startup_error}")
        if not self.is_ready():
            raise EngineNotReady("the engine is warming up" if not self.stopping else "the server is shutting down")

    # ---- embeddings ------------------------------------------------------------------------
    async def embed(self, ids: list[list[int]], *, layer: int | None = None, pooling: str | None = None,
                    normalize: bool | None = None) -> EmbeddingResult:
        layer, pooling, n_tokens = self.check_embedding(ids, layer, pooling)
        self._require_ready()
        vectors = await self._embed_now(ids, layer, pooling, normalize)
        return EmbeddingResult(vectors=vectors, layer=layer, prompt_tokens=n_tokens)

    async def _embed_now(self, ids, layer, pooling=None, normalize=None) -> np.ndarray:
        job = EmbedJob(ids=ids, layer=layer, pooling=pooling or self.config.pooling,
                       normalize=self.config.normalize if normalize is None else normalize,
                       deadline=time.monotonic() + self.config.request_timeout_s)
        if self.stopping:
            raise EngineNotReady("the server is shutting down")
        if self.queued_tokens + job.n_tokens > self.config.max_queue_tokens:
            raise Overloaded(f"the embedding queue holds {self.queued_tokens} tokens; this request's {job.n_tokens} "
                             f"would pass the limit of {self.config.max_queue_tokens}; retry later", code="queue_full")
        self._pieces.extend((job, i) for i in range(len(ids)))
        self.queued_tokens += job.n_tokens
        self.metrics.set("mcr_exit_queue_depth", self.queued_tokens, kind="embedding_tokens")
        self._wakeup.set()
        try:
            return await asyncio.wait_for(asyncio.wrap_future(job.future), timeout=self.config.request_timeout_s)
        except (asyncio.TimeoutError, TimeoutError) as exc:
            job.cancelled.set()
            raise RequestTimeout(f"the request took longer than {self.config.request_timeout_s:g} s") from exc
        except asyncio.CancelledError:
            job.cancelled.set()  # its batches not yet run are dropped
            raise

    def _take_batch(self) -> list[tuple[EmbedJob, int]]:
        batch, self._pieces, dropped = take_embed_batch(self._pieces, max_batch_size=self.config.max_batch_size,
                                                        max_batch_tokens=self.config.max_batch_tokens)
        self.queued_tokens -= dropped
        return batch

    async def _embed_lane(self) -> None:
        while not self.stopping:
            if not self._pieces:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            batch = self._take_batch()
            if batch:
                await self._run_batch(batch)

    async def _run_batch(self, batch: list[tuple[EmbedJob, int]]) -> None:
        layer = batch[0][0].layer
        keys = sorted({(job.pooling, job.normalize) for job, _ in batch})
        try:
            out = (await self.llm.collective_rpc("mcr_exit_embed",
                                                 args=([job.ids[i] for job, i in batch], layer, keys)))[0]
        except Exception as exc:  # noqa: BLE001 - fail this batch's requests, keep serving
            log.exception("embedding batch failed")
            for job, _ in batch:
                if not job.future.done():
                    job.future.set_exception(exc)
            return
        finally:
            self.queued_tokens -= sum(len(job.ids[i]) for job, i in batch)
            self.metrics.set("mcr_exit_queue_depth", self.queued_tokens, kind="embedding_tokens")
        pooled = {key: np.frombuffer(buf, dtype=np.float32).reshape(out["shape"]) for key, buf in zip(keys, out["vectors"])}
        for b, (job, i) in enumerate(batch):
            job.vectors[i] = pooled[(job.pooling, job.normalize)][b]
            job.remaining -= 1
            if job.remaining == 0 and not job.future.done():
                job.future.set_result(np.stack(job.vectors))
        for b, n in enumerate(out["block_calls"]):
            self.block_calls[b] += n
            if n:
                self.metrics.inc("mcr_exit_embedding_block_calls_total", n, block=str(b))
        self.metrics.inc("mcr_exit_blocks_executed_total", sum(out["block_calls"]), kind="embedding")
        self.metrics.inc("mcr_exit_batches_total", kind="embedding")
        self.metrics.inc("mcr_exit_tokens_total", out["tokens"], kind="embedding_input")

    # ---- generation ------------------------------------------------------------------------
    def open_generation(self, req: GenerationRequest, *, stream: bool = False,
                        events: asyncio.Queue | None = None) -> GenerationHandle:
        """Queue a request now (400 / 429 / 503 before any byte is sent); read it with ``events``."""
        self.check_generation(req)
        self._require_ready()
        if len(self._running) >= self.config.max_running + self.config.max_queue:
            raise Overloaded(f"{len(self._running)} generation requests are already running or waiting; retry later",
                             code="queue_full")
        loop = asyncio.get_running_loop()
        handle = _VllmHandle(req, loop, stream=stream, events=events)
        rid = f"mcr-exit-{next(self._ids)}"
        self._running[rid] = handle
        handle.task = self._spawn(self._drive(rid, handle))
        return handle

    def submit_generate(self, req: GenerationRequest) -> GenerationHandle:
        return self.open_generation(req)

    def _params(self, req: GenerationRequest):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        greedy = req.temperature < GREEDY_BELOW
        return SamplingParams(max_tokens=req.max_tokens, temperature=0.0 if greedy else req.temperature,
                              top_p=1.0 if greedy else req.top_p, seed=req.seed, stop=list(req.stop) or None,
                              output_kind=RequestOutputKind.DELTA)

    async def _drive(self, rid: str, handle: _VllmHandle) -> None:
        req = handle.req
        text, ids, finish = [], [], None
        try:
            async for out in self.llm.generate({"prompt_token_ids": list(req.prompt_ids)}, self._params(req),
                                               request_id=rid):
                c = out.outputs[0]
                handle.last_progress = time.monotonic()
                ids.extend(c.token_ids)
                self.metrics.inc("mcr_exit_tokens_total", len(c.token_ids), kind="completion")
                if c.text:
                    text.append(c.text)
                    if req.on_text is not None:
                        req.on_text(c.text)
                    if handle.stream and handle.events is not None:
                        handle.events.put_nowait((handle, "text", c.text))
                if out.finished:
                    finish = c.finish_reason
            result = GenerationOutput(text="".join(text), token_ids=ids, prompt_tokens=len(req.prompt_ids),
                                      completion_tokens=len(ids),
                                      finish_reason="length" if finish == "length" else
                                      "abort" if finish == "abort" else "stop")
            self.metrics.inc("mcr_exit_tokens_total", len(req.prompt_ids), kind="prompt")
            if not handle.future.done():
                handle.future.set_result(result)
            if handle.events is not None:
                handle.events.put_nowait((handle, "done", result))
        except asyncio.CancelledError:  # the caller left or the server stops: AsyncLLM aborts the request
            self.metrics.inc("mcr_exit_vllm_aborted_total")
            if not handle.future.done():
                handle.future.cancel()
            raise
        except Exception as exc:  # noqa: BLE001 - the caller hears of it; the engine keeps serving
            log.exception("generation failed")
            self._error(handle, exc)
        finally:
            self._running.pop(rid, None)

    def _error(self, handle: GenerationHandle, exc: BaseException) -> None:
        if not handle.future.done():
            handle.future.set_exception(exc)
        if handle.events is not None:
            handle.events.put_nowait((handle, "error", exc))

    def running_requests(self) -> int:
        """Generation requests this engine has handed to vLLM and not yet seen end."""
        return len(self._running)
