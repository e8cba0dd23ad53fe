"""The step scheduler: two lanes over one model, one KV pool.

The generation lane (one thread) loops over steps: admit waiting requests into free KV slots and
prefill them (one batch within a token budget), then one decode step for every running sequence (a
CUDA graph replay on GPUs), then hand the step's new text to the callers' event loops in one call
per loop. The embedding lane (a second thread, its own CUDA stream; ``embedding_lane.py``) runs
embedding inputs in batches within a token budget, each stopping at its layer k. With fused steps on
(``fused_step.py``), while sequences generate a decode step carries the waiting inputs of the served layer
instead, and the embedding lane runs only the others.

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

import torch

from mcr_exit.serving.detokenize import TextTracker
from mcr_exit.serving.errors import EngineNotReady, Overloaded
from mcr_exit.serving.embedding_lane import EmbeddingLane
from mcr_exit.serving.jobs import EmbedJob, GenerationHandle, GenerationOutput
from mcr_exit.serving.sampling import HostCopy, make_generator, sample_tokens

log = logging.getLogger("mcr_exit.serving")


class FairLock:
    """A ticket lock: threads enter in the order they asked (``threading.Lock`` lets a releaser re-take it)."""

    def __init__(self, on_wait=None):
        self._cond = threading.Condition()
        self._next = 0
        self._serving = 0
        self._on_wait = on_wait  # called with the seconds a thread waited for its turn

    def __enter__(self):
        with self._cond:
            ticket, self._next = self._next, self._next + 1
            if self._serving != ticket:
                t0 = time.perf_counter()
                while self._serving != ticket:
                    self._cond.wait()
                if self._on_wait is not None:
                    self._on_wait(time.perf_counter() - t0)

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


def _deliver(items: list) -> None:
    for handle, event in items:
        handle.events.put_nowait((handle, *event))


class Scheduler(EmbeddingLane):
    def __init__(self, *, stepper, tokenizer, config, metrics, eos_ids: set[int], pad_id: int):
        self.stepper, self.tok, self.config, self.metrics = stepper, tokenizer, config, metrics
        self.eos_ids, self.pad_id = eos_ids, pad_id
        self.cond = threading.Condition()  # generation queue and running rows
        self.embed_cond = threading.Condition()  # embedding queue
        self.forward_lock = FairLock(on_wait=self._lock_waited)
        self.waiting: deque[GenerationHandle] = deque()
        self.pieces: deque[tuple[EmbedJob, int]] = deque()  # embedding inputs not yet run
        self.queued_tokens = 0  # tokens in self.pieces
        self.rows: dict[int, _Row] = {}  # slot -> running sequence
        self.stopping = False
        self.failed: BaseException | None = None  # set when clearing up after a failed step failed too
        self._events: list = []
        self._host = HostCopy(stepper.device)
        self._inflight = None  # (rows, host copy, carried embeddings) of the last decode step, not taken in yet
        # queue each decode step before taking in the previous one's tokens: on a GPU it overlaps the host
        # work of a step with the next step; a CPU step is done when it returns, so there it would only
        # run one step past each sequence's end
        self.step_ahead = stepper.device.type == "cuda"
        self.embed_graphs = None  # EmbedGraphs once the engine has warmed up (GPU; embed_graphs.py)
        self.fused = None  # FusedStep once the engine has warmed up (fused_step.py): decode steps carry embeddings
        self._step_kind = "decode"  # what the last decode step was: decode, or fused (it carried embeddings)

    def _lock_waited(self, seconds: float) -> None:
        lane = "embedding" if threading.current_thread().name == "mcr-exit-embeddings" else "generation"
        self.metrics.inc("mcr_exit_forward_lock_wait_seconds_total", seconds, lane=lane)

    def _gpu_wait(self, copy) -> list[int]:
        """The host copy of a step's tokens; the time this thread waited for the device goes to /metrics."""
        t0 = time.perf_counter()
        tokens = self._host.wait(copy)
        self.metrics.inc("mcr_exit_device_wait_seconds_total", time.perf_counter() - t0, lane="generation")
        return tokens

    # ---- submission (any thread) ------------------------------------------------------------
    def submit_generation(self, handle: GenerationHandle) -> None:
        with self.cond:
            if self.stopping:
                raise EngineNotReady("the server is shutting down")
            if self.failed is not None:
                raise EngineNotReady(self.failure_message())
            if len(self.waiting) >= self.config.max_queue:
                raise Overloaded(f"{len(self.waiting)} generation requests are already waiting for the KV cache; "
                                 "retry later", code="queue_full")
            self.waiting.append(handle)
            self.metrics.set("mcr_exit_queue_depth", len(self.waiting), kind="generation")
            self.cond.notify()

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
            t0 = time.perf_counter()
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
                try:
                    self._fail_step(admitted, exc)
                except Exception as again:  # noqa: BLE001 - e.g. a CUDA error that stays: no more generation
                    log.exception("resetting the KV slots after a failed step failed: generation stops")
                    with self.cond:
                        self.failed = again
                    break
            self._flush()
            self.metrics.inc("mcr_exit_step_seconds_total", time.perf_counter() - t0,
                             kind="prefill" if admitted else self._step_kind)
        self._shutdown()

    def failure_message(self) -> str:
        """What requests hear once ``failed`` is set."""
        f = self.failed
        why = f"{type(f).__name__}: {str(f).splitlines()[0]}" if str(f) else type(f).__name__
        return f"the engine failed ({why}) and cannot serve: restart the server"

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
        self._advance(rows, self._gpu_wait(self._host.start(chosen)))
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
        carried = self._take_fused() if self.fused is not None and self.pieces else None
        self._step_kind = "fused" if carried is not None else "decode"
        embed = None
        if carried is not None:
            logits, embed = self._fused_step(B, span, carried)
        elif self.stepper.use_graphs:
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
        step = (rows, self._host.start(chosen), embed)
        if self.step_ahead:  # the GPU runs this step while the previous one's text is streamed
            previous, self._inflight = self._inflight, step
            if previous is not None:
                self._take_tokens(previous)
        else:
            self._take_tokens(step)
        self.metrics.inc("mcr_exit_batches_total", kind="decode")
        self.metrics.inc("mcr_exit_blocks_executed_total", self.stepper.adapter.n_layers, kind="generation")

    def _fused_step(self, B: int, span: int, carried) -> tuple:
        """A decode step that carries embedding inputs (``_take_fused``): (logits, their vectors on the way)."""
        batch, E, index, mask = carried
        try:
            before = self.fused.captured, self.fused.capture_seconds
            logits, hidden = self.fused.run(B, span, E, lock=self.forward_lock)
            self._count_captures("fused", self.fused, *before)
            return logits, self._pool_to_host(batch, hidden[index], mask, self.fused.layer, True, kind="fused")
        except BaseException as exc:
            self._release_queued(batch)
            self._fail_embed(batch, exc)
            raise

    def _take_tokens(self, inflight) -> None:
        rows, copy, embed = inflight
        self._advance(rows, self._gpu_wait(copy))
        if embed is not None:
            self._collect_embed(embed)

    def _drop_inflight(self, exc: BaseException) -> None:
        """Forget the step in flight; the embedding inputs it carried get ``exc``."""
        inflight, self._inflight = self._inflight, None
        if inflight is not None and inflight[2] is not None:
            self._release_queued(inflight[2].batch)
            self._fail_embed(inflight[2].batch, exc)

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
        if not self.rows and self.fused is not None:  # the embedding lane takes the fusable inputs again
            with self.embed_cond:
                self.embed_cond.notify()
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
        self._drop_inflight(exc)
        for row in list(self.rows.values()):
            row.finished = True
            del self.rows[row.slot]
            self.stepper.pool.release(row.slot)
        for handle in {id(h): h for h in (*admitted, *running)}.values():
            self._error(handle, exc)  # first: the clients hear of it even if the device is gone
        if self.stepper.pool is not None:
            self.stepper.park(list(range(self.stepper.pool.n_slots)))
        if self.fused is not None:
            with self.embed_cond:
                self.embed_cond.notify()

    def _shutdown(self) -> None:
        exc = EngineNotReady(self.failure_message() if self.failed is not None else "the server is shutting down")
        with self.cond:
            waiting, self.waiting = list(self.waiting), deque()
        for handle in waiting:
            self._error(handle, exc)
        self._drop_inflight(exc)
        for row in list(self.rows.values()):
            row.finished = True
            del self.rows[row.slot]
            self.stepper.pool.release(row.slot)
            self._error(row.handle, exc)
        self._flush()
