"""The step scheduler: two lanes over one model, one KV pool.

The generation lane (one thread) loops over steps: admit waiting requests into free KV slots and
prefill them (one batch within a token budget), then one decode step for every running sequence (a
CUDA graph replay on GPUs), then hand the step's new text to the callers' event loops in one call
per loop. The embedding lane (a second thread, its own CUDA stream) runs embedding inputs in batches
within a token budget, each stopping at its layer k.

Every eager forward (embedding batch, prefill, eager decode) holds ``forward_lock``, a FIFO lock:
the early-exit hooks live on the shared blocks, so two eager forwards must never interleave, and the
FIFO order means neither lane can starve the other. A graph replay runs no Python module code and
takes no lock, so on a GPU embedding batches overlap the decode steps (on a stream of lower priority). An embedding therefore waits
for at most one prefill or eager decode step, never for a whole generation, and a long embedding
request is cut into batches between which generation steps go on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict, deque
from contextlib import nullcontext

import numpy as np
import torch

from mcr_exit.metrics.pooling import pool_hidden
from mcr_exit.models.forward import hidden_at
from mcr_exit.models.tokens import collate
from mcr_exit.serving.detokenize import TextTracker
from mcr_exit.serving.errors import EngineNotReady, Overloaded
from mcr_exit.serving.jobs import EmbedJob, GenerationHandle, GenerationOutput, take_embed_batch
from mcr_exit.serving.sampling import HostCopy, make_generator, sample_tokens

log = logging.getLogger("mcr_exit.serving")


class FairLock:
    """A ticket lock: threads enter in the order they asked (``threading.Lock`` lets a releaser re-take it)."""

    def __init__(self):
        self._cond = threading.Condition()
        self._next = 0
        self._serving = 0

    def __enter__(self):
        with self._cond:
            ticket, self._next = self._next, self._next + 1
            while self._serving != ticket:
                self._cond.wait()

    def __exit__(self, *exc):
        with self._cond:
            self._serving += 1
            self._cond.notify_all()


class _Row:
    """A running sequence: its slot, its text, and the token to feed at the next decode step."""

    def __init__(self, handle: GenerationHandle, slot: int, tracker: TextTracker, generator):
        self.handle, self.slot, self.tracker, self.generator = handle, slot, tracker, generator
        self.next_pos = len(handle.req.prompt_ids)  # the position of the token the next decode step feeds
        self.finished = False


class _EmbedBatch:
    """An embedding batch whose forward is queued: its pooled vectors (on the host once ``event`` is done)."""

    def __init__(self, batch, layer: int, queued: bool, n_tokens: int):
        self.batch, self.layer, self.queued, self.n_tokens = batch, layer, queued, n_tokens
        self.vectors: dict[tuple, torch.Tensor] = {}
        self.event = None


def _deliver(items: list) -> None:
    for handle, event in items:
        handle.events.put_nowait((handle, *event))


class Scheduler:
    def __init__(self, *, stepper, tokenizer, config, metrics, eos_ids: set[int], pad_id: int):
        self.stepper, self.tok, self.config, self.metrics = stepper, tokenizer, config, metrics
        self.eos_ids, self.pad_id = eos_ids, pad_id
        self.cond = threading.Condition()  # generation queue and running rows
        self.embed_cond = threading.Condition()  # embedding queue
        self.forward_lock = FairLock()
        self.waiting: deque[GenerationHandle] = deque()
        self.pieces: deque[tuple[EmbedJob, int]] = deque()  # embedding inputs not yet run
        self.queued_tokens = 0  # tokens in self.pieces
        self.rows: dict[int, _Row] = {}  # slot -> running sequence
        self.stopping = False
        self._events: list = []
        self._host = HostCopy(stepper.device)
        self._inflight = None  # (rows, host copy) of the last decode step, whose tokens are not taken in yet
        # queue each decode step before taking in the previous one's tokens: on a GPU it overlaps the host
        # work of a step with the next step; a CPU step is done when it returns, so there it would only
        # run one step past each sequence's end
        self.step_ahead = stepper.device.type == "cuda"

    # ---- submission (any thread) ------------------------------------------------------------
    def submit_generation(self, handle: GenerationHandle) -> None:
        with self.cond:
            if self.stopping:
                raise EngineNotReady("the server is shutting down")
            if len(self.waiting) >= self.config.max_queue:
                raise Overloaded(f"{len(self.waiting)} generation requests are already waiting for the KV cache; "
                                 "retry later", code="queue_full")
            self.waiting.append(handle)
            self.metrics.set("mcr_exit_queue_depth", len(self.waiting), kind="generation")
            self.cond.notify()

    def submit_embed(self, job: EmbedJob) -> None:
        with self.embed_cond:
            if self.stopping:
                raise EngineNotReady("the server is shutting down")
            if self.queued_tokens + job.n_tokens > self.config.max_queue_tokens:
                raise Overloaded(f"the embedding queue holds {self.queued_tokens} tokens; this request's "
                                 f"{job.n_tokens} would pass the limit of {self.config.max_queue_tokens}; "
                                 "retry later", code="queue_full")
            self.pieces.extend((job, i) for i in range(len(job.ids)))
            self.queued_tokens += job.n_tokens
            self.metrics.set("mcr_exit_queue_depth", self.queued_tokens, kind="embedding_tokens")
            self.embed_cond.notify()

    def stop(self) -> None:
        """Fail everything waiting or running (callers see EngineNotReady) and end both lanes."""
        for cond in (self.cond, self.embed_cond):
            with cond:
                self.stopping = True
                cond.notify_all()

    # ---- the loop (engine thread) -------------------------------------------------------------
    def run(self) -> None:
        """The generation lane (the engine thread). On a GPU it runs on a high-priority CUDA stream: when an
        embedding batch and a decode step both wait for the GPU, the decode step's kernels go first."""
        dev = self.stepper.device
        if dev.type == "cuda":
            with torch.cuda.stream(torch.cuda.Stream(dev, priority=-1)):  # lower numbers go first
                self._run_generation()
        else:
            self._run_generation()

    def _run_generation(self) -> None:
        while True:
            with self.cond:
                while not (self.waiting or self.rows or self.stopping or self._inflight):
                    self.cond.wait()
                if self.stopping:
                    break
                admitted = self._admit()
            try:
                with torch.inference_mode():
                    if admitted:
                        with self.forward_lock:
                            self._prefill(admitted)
                    if self.rows:
                        self._decode()
                    elif self._inflight is not None:
                        inflight, self._inflight = self._inflight, None
                        self._take_tokens(inflight)
            except Exception as exc:  # noqa: BLE001 - fail this step's requests, keep serving
                log.exception("generation step failed")
                self._fail_step(admitted, exc)
            self._flush()
        self._shutdown()

    def run_embeddings(self) -> None:
        """The embedding lane (its own thread and, on a GPU, its own CUDA stream).

        On a GPU two batches are in flight when the queue holds a full batch: the next batch is launched
        (its kernels queued on the lane's stream) before the vectors of the previous one are collected, so
        the GPU is not idle while this thread collates, pools and hands out vectors. While sequences
        generate, a batch that is not full waits a little for more inputs (``_let_batch_fill``).
        """
        dev = self.stepper.device
        stream = torch.cuda.Stream(dev) if dev.type == "cuda" else None
        pending = None  # a launched batch whose vectors are not handed out yet
        while True:
            with self.embed_cond:
                while not (self.pieces or self.stopping or pending):
                    self.embed_cond.wait()
                if self.stopping:
                    break
                full = self._embed_queue_full()
                if pending is None and not full and self.rows:
                    self._let_batch_fill()
                batch = self._take_embed_batch() if self.pieces and (pending is None or full) else []
            launched = None
            if batch:
                try:
                    with torch.inference_mode(), self.forward_lock, \
                            (torch.cuda.stream(stream) if stream is not None else nullcontext()):
                        launched = self._launch_embed(batch)
                except Exception as exc:  # noqa: BLE001 - fail this batch's requests, keep serving
                    self._fail_embed(batch, exc)
            if pending is not None:
                self._collect_embed(pending)
            pending = launched
            if stream is None and pending is not None:  # a CPU forward is done when it returns
                self._collect_embed(pending)
                pending = None
        if pending is not None:
            self._collect_embed(pending)
        with self.embed_cond:
            pieces, self.pieces = list(self.pieces), deque()
        for job, _ in pieces:
            if not job.future.done():
                job.future.set_exception(EngineNotReady("the server is shutting down"))

    def _embed_queue_full(self) -> bool:
        return (self.queued_tokens >= self.config.max_batch_tokens
                or len(self.pieces) >= self.config.max_batch_size)

    def _let_batch_fill(self) -> None:
        """While sequences generate, wait up to ``embed_batch_wait_s`` after the oldest waiting input for a
        fuller batch (holding ``embed_cond``): every eager forward costs the generation lane Python time,
        so fewer, larger batches keep generation going at speed."""
        wait = self.config.embed_batch_wait_s
        until = min(job.arrived for job, _ in self.pieces) + wait
        while not (self.stopping or self._embed_queue_full()):
            left = until - time.monotonic()
            if left <= 0:
                break
            self.embed_cond.wait(left)

    def _fail_embed(self, batch, exc: BaseException) -> None:
        log.error("embedding batch failed", exc_info=exc)
        for job, _ in batch:
            if not job.future.done():
                job.future.set_exception(exc)

    # ---- embeddings ---------------------------------------------------------------------------
    def _take_embed_batch(self) -> list[tuple[EmbedJob, int]]:
        batch, self.pieces, dropped = take_embed_batch(self.pieces, max_batch_size=self.config.max_batch_size,
                                                       max_batch_tokens=self.config.max_batch_tokens)
        self.queued_tokens -= dropped
        self.metrics.set("mcr_exit_queue_depth", self.queued_tokens, kind="embedding_tokens")
        return batch

    def _run_embed(self, batch: list[tuple[EmbedJob, int]], *, queued: bool = True) -> None:
        """Run one batch to its layer k, pool, and hand each finished job its vectors."""
        self._collect_embed(self._launch_embed(batch, queued=queued))

    def _launch_embed(self, batch: list[tuple[EmbedJob, int]], *, queued: bool = True) -> _EmbedBatch:
        """Queue one batch's forward to its layer k and its pooling; the vectors come to the host in
        ``_collect_embed``. ``queued``: the batch's tokens are in the queue's budget, released once the
        forward is done (or has failed), before any caller hears back."""
        layer = batch[0][0].layer
        try:
            ids, mask = collate([job.ids[i] for job, i in batch], self.pad_id, self.stepper.device)
            hidden = hidden_at(self.stepper.adapter, ids, mask, layer)  # blocks layer+1.. never run
            pooled = {key: pool_hidden(hidden, mask, key[0], normalize=key[1],
                                 massive_ratio=self.config.massive_ratio)
                      for key in {(job.pooling, job.normalize) for job, _ in batch}}
            done = _EmbedBatch(batch, layer, queued, sum(len(job.ids[i]) for job, i in batch))
            if self.stepper.device.type == "cuda":
                for key, value in pooled.items():
                    host = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
                    done.vectors[key] = host.copy_(value, non_blocking=True)
                done.event = torch.cuda.Event()
                done.event.record()
            else:
                done.vectors = pooled
            return done
        except BaseException:
            if queued:
                self._release_queued(batch)
            raise

    def _release_queued(self, batch) -> None:
        with self.embed_cond:
            self.queued_tokens -= sum(len(job.ids[i]) for job, i in batch)
            self.metrics.set("mcr_exit_queue_depth", self.queued_tokens, kind="embedding_tokens")

    def _collect_embed(self, done: _EmbedBatch) -> None:
        try:
            if done.event is not None:
                done.event.synchronize()  # lets go of the GIL while the GPU finishes
            pooled = {key: value.numpy() for key, value in done.vectors.items()}
        except Exception as exc:  # noqa: BLE001
            self._fail_embed(done.batch, exc)
            return
        finally:
            if done.queued:
                self._release_queued(done.batch)
        for b, (job, i) in enumerate(done.batch):
            job.vectors[i] = pooled[(job.pooling, job.normalize)][b]
            job.remaining -= 1
            if job.remaining == 0 and not job.future.done():
                job.future.set_result(np.stack(job.vectors))
        self.metrics.inc("mcr_exit_blocks_executed_total", done.layer, kind="embedding")
        self.metrics.inc("mcr_exit_batches_total", kind="embedding")
        self.metrics.inc("mcr_exit_tokens_total", done.n_tokens, kind="embedding_input")

    # ---- generation -------------------------------------------------------------------------
    def _admit(self) -> list[GenerationHandle]:
        """Waiting requests that get a KV slot now (within the prefill token budget); then expire those that
        still wait after ``queue_timeout_s`` (429), and drop those whose client left."""
        admitted, tokens, now = [], 0, time.monotonic()
        pool = self.stepper.pool
        for handle in [h for h in self.waiting if h.cancelled.is_set()]:
            self.waiting.remove(handle)
        while self.waiting:
            n = len(self.waiting[0].req.prompt_ids)
            if admitted and tokens + n > self.config.max_batch_tokens:
                break
            if pool is None or pool.n_free - len(admitted) <= 0:
                break
            admitted.append(self.waiting.popleft())
            tokens += n
        full = pool is None or pool.n_free - len(admitted) <= 0
        for handle in [h for h in self.waiting if now - h.submitted > self.config.queue_timeout_s]:
            self.waiting.remove(handle)
            why = ("no KV cache slot came free" if full else "the request waited behind earlier prefills")
            self._error(handle, Overloaded(f"{why} within {self.config.queue_timeout_s:g} s; retry later",
                                           code="kv_cache_full" if full else "queue_timeout"))
        self.metrics.set("mcr_exit_queue_depth", len(self.waiting), kind="generation")
        return admitted

    def _prefill(self, handles: list[GenerationHandle]) -> None:
        pool = self.stepper.pool
        slots = [pool.alloc() for _ in handles]
        rows = []
        for handle, slot in zip(handles, slots):
            req = handle.req
            tracker = TextTracker(self.tok, eos_ids=self.eos_ids, max_tokens=req.max_tokens, stop=req.stop)
            rows.append(_Row(handle, slot, tracker, make_generator(req.seed, self.stepper.device)))
            self.rows[slot] = rows[-1]
        logits = self.stepper.prefill([h.req.prompt_ids for h in handles], slots)
        chosen = self._sample(rows, logits)
        # the first generated token and its position become the rows' next decode input, on the device
        self.stepper.feed(slots, chosen, [len(h.req.prompt_ids) for h in handles])
        self._advance(rows, self._host.wait(self._host.start(chosen)))
        self.metrics.inc("mcr_exit_batches_total", kind="prefill")
        self.metrics.inc("mcr_exit_blocks_executed_total", self.stepper.adapter.n_layers, kind="generation")
        self.metrics.inc("mcr_exit_tokens_total", sum(len(h.req.prompt_ids) for h in handles), kind="prompt")

    def _decode(self) -> None:
        """Launch one decode step for every running row, then take in the previous step's tokens.

        The step reads its input tokens and positions from the device, where the previous step (or the
        prefill) left them, so it is queued before the host has seen the previous step's tokens: the GPU
        runs step N while this thread streams the text of step N - 1. A row that step N - 1 finishes has
        run one step too many; that step's token is dropped (its KV write stays inside its own slot). On a
        CPU the step is done when it returns, and its tokens are taken in at once."""
        rows = [self.rows[s] for s in sorted(self.rows)]
        B = rows[-1].slot + 1
        span = max(r.next_pos for r in rows) + 1
        if self.stepper.use_graphs:
            logits = self.stepper.step(B, span)
        else:
            with self.forward_lock:
                logits = self.stepper.step(B, span)
        slots = [r.slot for r in rows]
        if len(rows) < B:
            logits = logits[self.stepper.index(slots)]
        chosen = self._sample(rows, logits)
        self.stepper.advance(slots, chosen)
        for row in rows:
            row.next_pos += 1
        step = (rows, self._host.start(chosen))
        if self.step_ahead:  # the GPU runs this step while the previous one's text is streamed
            previous, self._inflight = self._inflight, step
            if previous is not None:
                self._take_tokens(previous)
        else:
            self._take_tokens(step)
        self.metrics.inc("mcr_exit_batches_total", kind="decode")
        self.metrics.inc("mcr_exit_blocks_executed_total", self.stepper.adapter.n_layers, kind="generation")

    def _take_tokens(self, inflight) -> None:
        rows, copy = inflight
        self._advance(rows, self._host.wait(copy))

    def _sample(self, rows: list[_Row], logits: torch.Tensor) -> torch.Tensor:
        reqs = [r.handle.req for r in rows]
        return sample_tokens(logits, [q.temperature for q in reqs], [q.top_p for q in reqs],
                             [r.generator for r in rows])

    def _advance(self, rows: list[_Row], chosen: list[int]) -> None:
        """Stream each row's new token as text and retire finished rows (rows already retired are skipped)."""
        now = time.monotonic()
        for row, token in zip(rows, chosen):
            if row.finished:
                continue
            handle = row.handle
            handle.last_progress = now
            if handle.cancelled.is_set():
                row.tracker.abort()
            else:
                row.tracker.add(int(token))
            piece = row.tracker.pending_text()
            if piece:
                if handle.req.on_text is not None:
                    handle.req.on_text(piece)
                if handle.stream and handle.events is not None:
                    self._events.append((handle, ("text", piece)))
            if row.tracker.done:
                self._finish(row)
        self.metrics.inc("mcr_exit_tokens_total", sum(1 for r in rows if r.tracker.ids), kind="completion")

    def _finish(self, row: _Row) -> None:
        row.finished = True
        del self.rows[row.slot]
        self.stepper.park([row.slot])
        self.stepper.pool.release(row.slot)
        t, req = row.tracker, row.handle.req
        out = GenerationOutput(text=t.text, token_ids=list(t.ids), prompt_tokens=len(req.prompt_ids),
                               completion_tokens=len(t.ids), finish_reason=t.finish_reason)
        if not row.handle.future.done():
            row.handle.future.set_result(out)
        if row.handle.events is not None:
            self._events.append((row.handle, ("done", out)))

    # ---- delivery and failure ----------------------------------------------------------------
    def _error(self, handle: GenerationHandle, exc: BaseException) -> None:
        if not handle.future.done():
            handle.future.set_exception(exc)
        if handle.events is not None:
            self._events.append((handle, ("error", exc)))

    def _flush(self) -> None:
        if not self._events:
            return
        by_loop = defaultdict(list)
        for handle, event in self._events:
            by_loop[handle.loop].append((handle, event))
        self._events = []
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # that loop has closed: nobody is listening
                pass

    def _fail_step(self, admitted, exc: BaseException) -> None:
        """A step raised: its new requests and every running sequence get the error."""
        running = [row.handle for row in self.rows.values()]
        self._inflight = None
        for row in list(self.rows.values()):
            row.finished = True
            del self.rows[row.slot]
            self.stepper.pool.release(row.slot)
        if self.stepper.pool is not None:
            self.stepper.park(list(range(self.stepper.pool.n_slots)))
        for handle in {id(h): h for h in (*admitted, *running)}.values():
            self._error(handle, exc)

    def _shutdown(self) -> None:
        exc = EngineNotReady("the server is shutting down")
        with self.cond:
            waiting, self.waiting = list(self.waiting), deque()
        for handle in waiting:
            self._error(handle, exc)
        self._inflight = None
        for row in list(self.rows.values()):
            row.finished = True
            del self.rows[row.slot]
            self.stepper.pool.release(row.slot)
            self._error(row.handle, exc)
        self._flush()
