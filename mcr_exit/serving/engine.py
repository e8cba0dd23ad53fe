"""The serving engine: the public API over one model. Knows nothing about HTTP.

It validates and tokenizes requests, sizes the KV pool, warms up, and hands work to the step
scheduler (``scheduler.py``), which owns the model on its own thread. Embeddings run the one
early-exit path (``models.forward.hidden_at``) to hidden index k; generation runs at full depth over
the KV pool. Async callers wait on futures and per-request event queues, so the event loop never
blocks on the model.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections.abc import AsyncIterator

import torch

from mcr_exit.errors import ConfigError
from mcr_exit.metrics.pooling import POOLING_ALIASES, POOLINGS
from mcr_exit.models import LoadedModel
from mcr_exit.models.bos_choice import decide_bos
from mcr_exit.models.tokens import pad_id_of
from mcr_exit.serving import embed_graphs
from mcr_exit.serving.config import EmbeddingResult, EngineConfig, served_layers  # noqa: F401 - also imported from here
from mcr_exit.serving.errors import EngineNotReady, InvalidRequest, RequestTimeout
from mcr_exit.serving.inputs import InputEncoding
from mcr_exit.serving.jobs import EmbedJob, GenerationHandle, GenerationOutput, GenerationRequest
from mcr_exit.serving.kv_pool import KVPool
from mcr_exit.serving.metrics import Metrics
from mcr_exit.serving.model_step import ModelStepper
from mcr_exit.serving.profile_source import ProfileSource
from mcr_exit.serving.scheduler import Scheduler

log = logging.getLogger("mcr_exit.serving")
MAX_SEED = 2**63 - 1


def eos_ids_of(model, tokenizer) -> set[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if gen_eos is not None:
        ids |= set(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos])
    return ids


def _max_positions(config) -> int | None:
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


async def _get(queue: asyncio.Queue, timeout: float):
    if hasattr(asyncio, "timeout"):  # Python 3.11+: a timer handle, no task per call
        async with asyncio.timeout(timeout):
            return await queue.get()
    return await asyncio.wait_for(queue.get(), timeout)


def _coalesce(first: tuple, queue: asyncio.Queue) -> list[tuple]:
    """``first`` and whatever else is queued now, each handle's text joined into one event.

    Per handle the engine sends text events, then one done or error event, so joining a handle's
    text at its first text event keeps every handle's order.
    """
    items = [first]
    while not queue.empty():
        items.append(queue.get_nowait())
    out: list[tuple] = []
    text_at: dict[int, int] = {}
    for handle, kind, value in items:
        if kind == "text" and id(handle) in text_at:
            i = text_at[id(handle)]
            out[i] = (handle, "text", out[i][2] + value)
            continue
        if kind == "text":
            text_at[id(handle)] = len(out)
        out.append((handle, kind, value))
    return out


class Engine(InputEncoding):
    generation_engine = "mcr-exit"  # reported by /v1/models

    def __init__(self, loaded: LoadedModel, profile: ProfileSource | None = None,
                 config: EngineConfig | None = None, *, embedding_layer: int | None = None,
                 metrics: Metrics | None = None):
        self.loaded, self.profile = loaded, profile
        self.config = config or EngineConfig()
        rule = ((profile.doc.get("massive_activations") or {}).get("rule") or {}) if profile else {}
        if rule.get("threshold"):
            self.config = dataclasses.replace(self.config, massive_ratio=float(rule["threshold"]))
        self.metrics = metrics or Metrics()
        self.embedding_layer, self.max_layer = served_layers(loaded.n_layers, self.config, profile, embedding_layer)
        self.bos = decide_bos(loaded, "auto")
        self.pad_id = pad_id_of(loaded.tokenizer)
        self.vocab_size = int(loaded.model.get_input_embeddings().num_embeddings)
        self.hidden_size = int(loaded.adapter.embed.weight.shape[1])
        cap = _max_positions(loaded.model.config)
        want = self.config.max_input_tokens + self.config.max_new_tokens
        self.context_len = min(want, cap) if cap else want  # prompt + completion tokens per sequence
        self.stepper = ModelStepper(loaded)
        self.scheduler = Scheduler(stepper=self.stepper, tokenizer=loaded.tokenizer, config=self.config,
                                   metrics=self.metrics, eos_ids=eos_ids_of(loaded.model, loaded.tokenizer),
                                   pad_id=self.pad_id)
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None  # the generation lane; it starts the embedding lane
        self._embed_thread: threading.Thread | None = None
        self.startup_report: dict = {}
        self.startup_error: str | None = None

    # ---- lifecycle -------------------------------------------------------------------------
    @property
    def model_id(self) -> str:
        return self.loaded.spec.name

    @property
    def n_layers(self) -> int:
        return self.loaded.n_layers

    def start(self) -> None:
        """Start the engine thread; pool sizing and warm-up run on it, then ``is_ready()`` turns true."""
        if self._thread is not None:
            return
        self.scheduler.stopping = False
        self._thread = threading.Thread(target=self._run, name="mcr-exit-engine", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            with torch.inference_mode():
                self._build_pool()
                if self.config.warmup:
                    self._warm_up()
                self._set_up_fused_steps()
        except Exception as exc:  # noqa: BLE001 - requests will show the failure; the server stays up
            log.exception("engine start-up failed")
            self.startup_error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        self._embed_thread = threading.Thread(target=self.scheduler.run_embeddings, name="mcr-exit-embeddings",
                                              daemon=True)
        self._embed_thread.start()
        self._ready.set()
        self.metrics.set("mcr_exit_ready", 1)
        self.scheduler.run()
        self._embed_thread.join()
        self.metrics.set("mcr_exit_ready", 0)

    def stop(self, timeout: float = 30.0) -> None:
        """Cancel everything waiting or running (callers get 503) and end the engine thread."""
        self.scheduler.stop()
        if self._thread is not None:
            self._thread.join(timeout=timeout)
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
        return self._ready.is_set() and not self.scheduler.stopping and self.scheduler.failed is None

    def has_failed(self) -> bool:
        """A generation step failed and so did the reset after it (a device error that stays)."""
        return self.scheduler.failed is not None

    def queue_depth(self) -> int:
        return len(self.scheduler.waiting)

    def is_overloaded(self) -> bool:
        return len(self.scheduler.waiting) >= self.config.max_queue

    def _build_pool(self) -> None:
        cfg, dev = self.config, self.stepper.device
        shapes = self.stepper.layer_shapes()
        per_token = KVPool.bytes_per_token(shapes, self.stepper.dtype)
        tokens = cfg.kv_cache_tokens
        if tokens is None and (cfg.kv_cache_memory is not None or dev.type == "cuda"):
            tokens = self._tokens_for_memory(cfg.kv_cache_memory or 0.9, per_token)
        if tokens is None:
            tokens = min(cfg.max_running, 8) * self.context_len  # CPU default: 8 sequences
        n_slots = min(cfg.max_running, tokens // self.context_len)
        if n_slots < 1:
            raise ConfigError(f"the KV cache of {tokens} tokens cannot hold one sequence of {self.context_len} "
                              "tokens (--max-input-tokens + --max-new-tokens)")
        pool = KVPool(shapes, n_slots=n_slots, slot_len=self.context_len, dtype=self.stepper.dtype, device=dev)
        self.stepper.attach(pool)
        self.startup_report.update(kv_slots=n_slots, kv_slot_tokens=self.context_len,
                                   kv_cache_bytes=pool.nbytes, kv_bytes_per_token=per_token)
        self.metrics.set("mcr_exit_kv_cache_slots", n_slots)

    def _tokens_for_memory(self, fraction: float, per_token: int) -> int:
        """KV tokens that fit in ``fraction`` of the GPU next to the weights and the largest forward."""
        dev = self.stepper.device
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        T = min(self.config.max_input_tokens, self.config.max_batch_tokens)
        rows = max(1, self.config.max_batch_tokens // T)
        ids = torch.zeros((rows, T), dtype=torch.long, device=dev)
        from mcr_exit.models.forward import hidden_at

        h = hidden_at(self.loaded.adapter, ids, torch.ones_like(ids), self.n_layers)
        self.stepper.logits(h[:, -1])
        del h
        torch.cuda.synchronize(dev)
        activations = torch.cuda.max_memory_allocated(dev) - base
        free, total = torch.cuda.mem_get_info(dev)
        budget = fraction * total - (total - free) - 1.5 * activations - (1 << 30)  # 1 GiB for graphs, sampling
        self.startup_report.update(activation_reserve_bytes=int(1.5 * activations))
        return max(0, int(budget // per_token))

    def _warm_up(self) -> None:
        """One embedding forward, one prefill and a few decode steps; then the decode CUDA graphs."""
        ids = self.encode_texts(["Warm-up: the quick brown fox."])
        job = EmbedJob(ids=ids, layer=self.embedding_layer, pooling=self.config.pooling,
                       normalize=self.config.normalize, deadline=float("inf"))
        self.scheduler._run_embed([(job, 0)], queued=False)
        t0 = time.perf_counter()
        slot = self.stepper.pool.alloc()
        try:
            self.stepper.prefill(ids, [slot])
            for p in range(3):
                self.stepper.decode([0] * slot + [1], [0] * slot + [len(ids[0]) + p])
        finally:
            self.stepper.pool.release(slot)
        if self.stepper.device.type == "cuda" and self.config.cuda_graphs:
            if self.config.compile:
                self.stepper.enable_compile()
            n = self.stepper.capture_graphs()
            self.startup_report.update(compiled=bool(self.stepper.compiled))
            self.startup_report.update(cuda_graphs=n)
        when = embed_graphs.mode(self.config.embed_cuda_graphs, self.loaded.model, self.stepper.device)
        if self.config.cuda_graphs and when is not None:
            self.scheduler.embed_graphs = embed_graphs.EmbedGraphs(
                self.stepper, max_batch_tokens=self.config.max_batch_tokens, always=when == "always")
        self.startup_report.update(embed_cuda_graphs=when if self.scheduler.embed_graphs is not None else "off")
        self.startup_report.update(warmup_s=round(time.perf_counter() - t0, 2))

    def _set_up_fused_steps(self) -> None:
        """Decode steps that carry embedding inputs of layer k (fused_step.py): with ``auto``, where decode
        steps replay CUDA graphs; with ``on`` also eagerly (the CPU). Eager fused forwards compile their
        path at warm-up, so that the first graph captured while serving does not wait for the compiler."""
        setting = self.config.fuse_embeddings
        graphs = self.stepper.use_graphs
        if setting == "off" or (setting == "auto" and not graphs):
            self.startup_report.update(fused_embeddings="off")
            return
        from mcr_exit.serving.fused_step import FusedStep

        fused = FusedStep(self.stepper, layer=self.embedding_layer, max_tokens=self.config.fused_embed_tokens,
                          graphs=graphs)
        if self.config.warmup:
            # batch sizes 2 and 1: a forward compiled for one size only would compile again for the other
            # the first time a step of it carries inputs, which on an H200 stalls generation for ~10 s
            slots = [self.stepper.pool.alloc() for _ in range(min(2, self.stepper.pool.n_slots))]
            try:
                self.stepper.park(slots)
                fused.load(self.encode_texts(["Warm-up: the quick brown fox."]))
                for B in sorted({len(slots), 1}, reverse=True):
                    fused.forward(B, self.stepper.span_buckets[0], fused.buckets[0])
            finally:
                for slot in slots:
                    self.stepper.pool.release(slot)
            if graphs:
                t0 = time.perf_counter()
                n = fused.capture_full_batch()
                self.startup_report.update(fused_cuda_graphs=n,
                                           fused_capture_s=round(time.perf_counter() - t0, 2))
        self.scheduler.fused = fused
        self.startup_report.update(fused_embeddings=f"{'graphs' if graphs else 'eager'}, "
                                                    f"up to {self.config.fused_embed_tokens} tokens a step")

    # ---- embeddings --------------------------------------------------------------------------
    def _require_ready(self) -> None:
        if self.startup_error:
            raise EngineNotReady(f"the engine failed to start: {self.startup_error}")
        if self.scheduler.failed is not None:
            raise EngineNotReady(self.scheduler.failure_message())
        if not self.is_ready():
            raise EngineNotReady("the engine is warming up" if not self.scheduler.stopping
                                 else "the server is shutting down")

    def check_embedding(self, ids: list[list[int]], layer: int | None, pooling: str | None) -> tuple[int, str, int]:
        """(layer, pooling, input tokens) of an embedding request, or InvalidRequest."""
        layer = self.embedding_layer if layer is None else layer
        if not 0 <= layer <= self.max_layer:
            raise InvalidRequest(f"layer {layer} is out of range: this server allows hidden 0..{self.max_layer}",
                                 param="layer")
        pooling = POOLING_ALIASES.get(pooling or self.config.pooling, pooling or self.config.pooling)
        if pooling not in POOLINGS:
            raise InvalidRequest(f"pooling must be one of {', '.join(POOLINGS)}", param="pooling")
        n_tokens = sum(len(x) for x in ids)
        if n_tokens > self.config.max_request_tokens:
            raise InvalidRequest(f"the inputs hold {n_tokens} tokens, more than this server's limit of "
                                 f"{self.config.max_request_tokens} per request; send fewer or shorter inputs",
                                 param="input", code="request_too_large")
        return layer, pooling, n_tokens

    async def embed(self, ids: list[list[int]], *, layer: int | None = None, pooling: str | None = None,
                    normalize: bool | None = None) -> EmbeddingResult:
        layer, pooling, n_tokens = self.check_embedding(ids, layer, pooling)
        self._require_ready()
        job = EmbedJob(ids=ids, layer=layer, pooling=pooling,
                       normalize=self.config.normalize if normalize is None else normalize,
                       deadline=time.monotonic() + self.config.request_timeout_s)
        self.scheduler.submit_embed(job)
        try:
            vectors = await asyncio.wait_for(asyncio.wrap_future(job.future), timeout=self.config.request_timeout_s)
        except (asyncio.TimeoutError, TimeoutError) as exc:
            job.cancelled.set()
            raise RequestTimeout(f"the request took longer than {self.config.request_timeout_s:g} s") from exc
        except asyncio.CancelledError:
            job.cancelled.set()
            raise
        return EmbeddingResult(vectors=vectors, layer=layer, prompt_tokens=sum(len(x) for x in ids))

    # ---- generation --------------------------------------------------------------------------
    def check_generation(self, req: GenerationRequest) -> GenerationRequest:
        if req.max_tokens < 1 or req.max_tokens > self.config.max_new_tokens:
            raise InvalidRequest(f"max_tokens must be in 1..{self.config.max_new_tokens}, got {req.max_tokens}",
                                 param="max_tokens")
        if len(req.prompt_ids) + req.max_tokens > self.context_len:
            raise InvalidRequest(f"the prompt has {len(req.prompt_ids)} tokens; with max_tokens {req.max_tokens} it "
                                 f"passes this server's context of {self.context_len} tokens", param="max_tokens")
        if not 0 <= req.temperature <= 2:
            raise InvalidRequest("temperature must be in [0, 2]", param="temperature")
        if not 0 < req.top_p <= 1:
            raise InvalidRequest("top_p must be in (0, 1]", param="top_p")
        if req.seed is not None and not 0 <= req.seed <= MAX_SEED:
            raise InvalidRequest(f"seed must be in 0..{MAX_SEED}", param="seed")
        if len(req.stop) > 4:
            raise InvalidRequest("at most 4 stop sequences", param="stop")
        return req

    def open_generation(self, req: GenerationRequest, *, stream: bool = False,
                        events: asyncio.Queue | None = None) -> GenerationHandle:
        """Queue a request now (so 400 / 429 / 503 come before any byte is sent); read it with ``events``."""
        self.check_generation(req)
        self._require_ready()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        handle = GenerationHandle(req, loop, stream=stream, events=events)
        self.scheduler.submit_generation(handle)
        return handle

    def submit_generate(self, req: GenerationRequest) -> GenerationHandle:
        return self.open_generation(req)

    async def events(self, handles: list[GenerationHandle]) -> AsyncIterator[tuple]:
        """(handle, kind, value) events of handles that share one queue, until every one is done.

        Text that piled up for a handle since the last read comes as one event. A request times out
        only when no token arrives for ``stall_timeout_s``: a long stream that keeps making progress
        runs on. Leaving the iteration early cancels the requests.
        """
        queue, stall = handles[0].events, self.config.stall_timeout_s
        open_ = {id(h) for h in handles}
        try:
            while open_:
                try:
                    item = await _get(queue, stall)
                except (asyncio.TimeoutError, TimeoutError):
                    if time.monotonic() - max(h.last_progress for h in handles) >= stall:
                        raise RequestTimeout(f"no new token for {stall:g} s") from None
                    continue
                for handle, kind, value in _coalesce(item, queue):
                    if kind == "error":
                        raise value
                    if kind == "done":
                        open_.discard(id(handle))
                    yield handle, kind, value
        finally:
            for h in handles:
                if not h.future.done():
                    h.cancel()

    async def wait(self, handle: GenerationHandle) -> GenerationOutput:
        async for _, kind, value in self.events([handle]):
            if kind == "done":
                return value
        raise RuntimeError("generation ended without a result")

    async def generate(self, req: GenerationRequest) -> GenerationOutput:
        return await self.wait(self.open_generation(req))
