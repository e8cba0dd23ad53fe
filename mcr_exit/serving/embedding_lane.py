"""The embedding lane of the step scheduler: embedding inputs run in batches, each batch stopping at its
layer k (``models.forward.hidden_at``, the analysis's own early-exit path), on a thread and (on a GPU) a
CUDA stream of its own. ``Scheduler`` (scheduler.py) holds the state it works on: ``embed_cond``,
``pieces``, ``queued_tokens``, ``forward_lock``, ``rows``, ``stopping``, ``stepper``, ``config``,
``metrics``, ``pad_id`` and ``embed_graphs`` (``embed_graphs.py``: on a GPU a batch may replay a CUDA
graph, without ``forward_lock``; every other batch runs eagerly, holding it)."""

from __future__ import annotations

import logging
import time
from collections import deque
from contextlib import nullcontext

import numpy as np
import torch

from mcr_exit.metrics.pooling import pool_hidden
from mcr_exit.models.forward import hidden_at
from mcr_exit.models.tokens import collate
from mcr_exit.serving.errors import EngineNotReady, Overloaded
from mcr_exit.serving.jobs import EmbedJob, take_embed_batch, take_packed

log = logging.getLogger("mcr_exit.serving")


class _EmbedBatch:
    """An embedding batch whose forward is queued: its pooled vectors (on the host once ``event`` is done)."""

    def __init__(self, batch, layer: int, queued: bool, n_tokens: int, kind: str = "embedding"):
        self.batch, self.layer, self.queued, self.n_tokens, self.kind = batch, layer, queued, n_tokens, kind
        self.vectors: dict[tuple, torch.Tensor] = {}
        self.event = None


class EmbeddingLane:
    """The embedding half of ``Scheduler``: submission, the lane's loop, and one batch's forward."""

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
            # inputs that decode steps will carry are no news to the lane: it would wake only to look through
            # the queue (the last sequence to finish wakes it, and it then takes them all)
            if not self._fusing() or not all(self._fusable(job, i) for i in range(len(job.ids))):
                self.embed_cond.notify()

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
                while not (self._lane_has_inputs() or self.stopping or pending):
                    self.embed_cond.wait()
                if self.stopping:
                    break
                full = self._embed_queue_full()
                if pending is None and not full and self.rows:
                    self._let_batch_fill()
                batch = self._take_embed_batch() if self._lane_has_inputs() and (pending is None or full) else []
            launched = None
            if batch:
                try:
                    with torch.inference_mode(), \
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

    # ---- the share of decode steps (fused_step.py) ----------------------------------------------
    def _fusing(self) -> bool:
        """While sequences generate, decode steps carry the inputs of the fused layer (``_fusable``)."""
        return self.fused is not None and bool(self.rows)

    def _fusable(self, job: EmbedJob, i: int) -> bool:
        return job.layer == self.fused.layer and self.fused.fits(len(job.ids[i]))

    def _lane_has_inputs(self) -> bool:
        """Inputs this lane runs: all waiting ones, or, while decode steps carry the fusable ones, the others."""
        if not self._fusing():
            return bool(self.pieces)
        return any(not self._fusable(job, i) for job, i in self.pieces)

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
        pieces, others = self.pieces, deque()
        if self._fusing():  # the decode steps take those
            others = deque(p for p in pieces if self._fusable(*p))
            pieces = deque(p for p in pieces if not self._fusable(*p))
        batch, left, dropped = take_embed_batch(pieces, max_batch_size=self.config.max_batch_size,
                                                max_batch_tokens=self.config.max_batch_tokens)
        others.extend(left)
        self.pieces = others
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
            graphs = self.embed_graphs
            hidden = None
            if graphs is not None and (graphs.always or not self.rows):
                before = graphs.captured, graphs.capture_seconds
                hidden = graphs.hidden(ids, mask, layer, lock=self.forward_lock)
                self._count_captures("embedding", graphs, *before)
            if hidden is None:
                with self.forward_lock:
                    hidden = hidden_at(self.stepper.adapter, ids, mask, layer)  # blocks layer+1.. never run
            return self._pool_to_host(batch, hidden, mask, layer, queued)
        except BaseException:
            if queued:
                self._release_queued(batch)
            raise

    def _count_captures(self, kind: str, graphs, captured: int, seconds: float) -> None:
        """CUDA graphs that ``graphs`` (``EmbedGraphs``, ``FusedStep``) captured since it counted ``captured``
        graphs and ``seconds``: in ``/metrics``, by kind."""
        if graphs.captured > captured:
            self.metrics.inc("mcr_exit_cuda_graph_captures_total", graphs.captured - captured, kind=kind)
            self.metrics.inc("mcr_exit_cuda_graph_capture_seconds_total", graphs.capture_seconds - seconds,
                             kind=kind)

    def _pool_to_host(self, batch, hidden: torch.Tensor, mask: torch.Tensor, layer: int, queued: bool,
                      kind: str = "embedding") -> _EmbedBatch:
        """Queue the pooling of a batch's hidden[layer] (R, T, d) and the vectors' copy to the host."""
        pooled = {key: pool_hidden(hidden, mask, key[0], normalize=key[1], massive_ratio=self.config.massive_ratio)
                  for key in {(job.pooling, job.normalize) for job, _ in batch}}
        done = _EmbedBatch(batch, layer, queued, sum(len(job.ids[i]) for job, i in batch), kind)
        if self.stepper.device.type == "cuda":
            for key, value in pooled.items():
                host = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
                done.vectors[key] = host.copy_(value, non_blocking=True)
            done.event = torch.cuda.Event()
            done.event.record()
        else:
            done.vectors = pooled
        return done

    def _take_fused(self):
        """Inputs for the next decode step to carry: (batch, packed E, index, mask), or None."""
        with self.embed_cond:
            batch, self.pieces, dropped = take_packed(self.pieces, fits=self._fusable,
                                                      max_tokens=self.fused.max_tokens,
                                                      max_rows=self.config.max_batch_size)
            self.queued_tokens -= dropped
            self.metrics.set("mcr_exit_queue_depth", self.queued_tokens, kind="embedding_tokens")
        if not batch:
            return None
        try:
            carried = (batch, *self.fused.load([job.ids[i] for job, i in batch]))
            self.metrics.inc("mcr_exit_fused_tokens_total", sum(len(job.ids[i]) for job, i in batch),
                             kind="carried")
            self.metrics.inc("mcr_exit_fused_tokens_total", carried[1], kind="bucket")
            return carried
        except BaseException as exc:
            self._release_queued(batch)
            self._fail_embed(batch, exc)
            raise

    def _release_queued(self, batch) -> None:
        with self.embed_cond:
            self.queued_tokens -= sum(len(job.ids[i]) for job, i in batch)
            self.metrics.set("mcr_exit_queue_depth", self.queued_tokens, kind="embedding_tokens")

    def _collect_embed(self, done: _EmbedBatch) -> None:
        try:
            if done.event is not None:
                t0 = time.perf_counter()
                done.event.synchronize()  # lets go of the GIL while the GPU finishes
                self.metrics.inc("mcr_exit_device_wait_seconds_total", time.perf_counter() - t0,
                                 lane="generation" if done.kind == "fused" else "embedding")
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
        self.metrics.inc("mcr_exit_batches_total", kind=done.kind)
        self.metrics.inc("mcr_exit_tokens_total", done.n_tokens, kind="embedding_input")
