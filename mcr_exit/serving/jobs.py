"""What the engine's callers hand it and get back: requests, results and the handles between them.

Nothing here imports torch or the scheduler; the engine (public API), the scheduler (the step loop)
and the routes all share these types.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from mcr_exit.serving.errors import RequestTimeout


@dataclass(kw_only=True)
class GenerationRequest:
    """One completion: prompt token ids and sampling parameters (temperature 0 = greedy)."""

    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    on_text: Callable[[str], None] | None = None  # called on the engine thread with each new piece of text
    cancelled: threading.Event = field(default_factory=threading.Event)


@dataclass(frozen=True, kw_only=True)
class GenerationOutput:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (EOS or a stop string), "length", or "abort" (cancelled)


class GenerationHandle:
    """A generation request inside the engine.

    The engine thread reports through ``events`` (an asyncio queue on the caller's loop, filled once per
    engine step, possibly shared by the handles of one request): ``(handle, "text", str)`` pieces when
    streaming, then ``(handle, "done", GenerationOutput)`` or ``(handle, "error", exception)``.
    ``future`` (thread-safe) holds the final result too.
    """

    def __init__(self, req: GenerationRequest, loop: asyncio.AbstractEventLoop | None, *, stream: bool,
                 events: asyncio.Queue | None = None):
        self.req = req
        self.loop = loop
        self.stream = stream
        self.events = events if events is not None else (asyncio.Queue() if loop is not None else None)
        self.future: Future = Future()
        self.submitted = time.monotonic()
        self.last_progress = self.submitted  # the engine thread moves it on with every token

    @property
    def cancelled(self) -> threading.Event:
        return self.req.cancelled

    def cancel(self) -> None:
        self.req.cancelled.set()


@dataclass(eq=False, kw_only=True)
class EmbedJob:
    """One embedding request: its inputs are run in pieces, possibly across several forward batches."""

    ids: list[list[int]]
    layer: int
    pooling: str
    normalize: bool
    deadline: float
    future: Future = field(default_factory=Future)
    cancelled: threading.Event = field(default_factory=threading.Event)
    vectors: list = field(default_factory=list)  # filled by the engine thread, one row per input
    remaining: int = 0
    arrived: float = field(default_factory=time.monotonic)

    def __post_init__(self):
        self.vectors = [None] * len(self.ids)
        self.remaining = len(self.ids)

    @property
    def n_tokens(self) -> int:
        return sum(len(x) for x in self.ids)


def _live(pieces: deque, dropped: list[int]):
    """Take waiting inputs from the front of ``pieces`` as the caller asks for them, skipping (and counting
    the tokens of) those whose job was cancelled, is done, or is past its deadline (it gets RequestTimeout)."""
    now = time.monotonic()
    while pieces:
        job, i = pieces.popleft()
        if job.cancelled.is_set() or job.future.done() or now > job.deadline:
            dropped[0] += len(job.ids[i])
            if not job.future.done():
                job.future.set_exception(RequestTimeout("the embedding request timed out in the queue"))
            continue
        yield job, i


def take_embed_batch(pieces: deque, *, max_batch_size: int, max_batch_tokens: int
                     ) -> tuple[list[tuple[EmbedJob, int]], deque, int]:
    """One batch of waiting embedding inputs ``(job, index)``: one layer, in arrival order, within the row
    and padded-token budgets. Inputs of jobs cancelled, done or past their deadline are dropped (a job past
    its deadline gets RequestTimeout). Returns (batch, the inputs left waiting, tokens dropped)."""
    batch, kept, longest, layer, dropped = [], deque(), 0, None, [0]
    for job, i in _live(pieces, dropped):
        n = len(job.ids[i])
        fits = (layer in (None, job.layer) and len(batch) < max_batch_size
                and max(longest, n) * (len(batch) + 1) <= max_batch_tokens)
        if fits or not batch:
            batch.append((job, i))
            layer, longest = job.layer, max(longest, n)
        else:
            kept.append((job, i))
            if len(batch) >= max_batch_size:
                break
    kept.extend(pieces)
    return batch, kept, dropped[0]


def take_packed(pieces: deque, *, fits, max_tokens: int, max_rows: int, look_ahead: int = 16
                ) -> tuple[list[tuple[EmbedJob, int]], deque, int]:
    """Waiting embedding inputs ``(job, index)`` for which ``fits(job, index)`` holds, from the front in arrival
    order, while their tokens together stay within ``max_tokens`` (packed one after another: no padding) and
    they are at most ``max_rows``. Past the first input that no longer fits, at most ``look_ahead`` more are
    looked at (a shorter one may still fit): a decode step takes its inputs in time independent of the queue's
    length. Every other input keeps its place; ``pieces`` is changed in place. Inputs of jobs cancelled, done
    or past their deadline are dropped as in ``take_embed_batch``. Returns (batch, ``pieces``, tokens dropped)."""
    batch, skipped, total, dropped, left = [], [], 0, [0], None
    for job, i in _live(pieces, dropped):
        n, ok = len(job.ids[i]), fits(job, i)
        if ok and total + n <= max_tokens and len(batch) < max_rows:
            batch.append((job, i))
            total += n
        else:
            skipped.append((job, i))
            if not ok:
                continue
            left = look_ahead if left is None else left
        if left is not None:
            left -= 1
            if left < 0 or total >= max_tokens or len(batch) >= max_rows:
                break
    pieces.extendleft(reversed(skipped))
    return batch, pieces, dropped[0]
