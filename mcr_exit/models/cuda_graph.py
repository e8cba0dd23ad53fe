"""Capturing a CUDA graph beside other work: the one capture helper of the spectral estimate and the server."""

from __future__ import annotations

import torch


def capture(fn, args: tuple, kwargs: dict | None = None, *, pool=None, stream: torch.cuda.Stream | None = None):
    """(graph, outputs): ``fn(*args, **kwargs)`` captured; ``graph.replay()`` reruns it on the same tensors.

    Captured on the caller's stream (a fresh one when the caller is on the default stream, where no
    capture may run) in thread-local mode: other threads keep running their own work meanwhile
    (allocations, synchronizations, kernels on their streams), which the global mode forbids to every
    thread and which would invalidate the capture. Unlike ``torch.cuda.graph``, no device synchronization
    and no emptying of the allocator's cache before the capture (both would stall the other threads).
    ``pool``: a ``torch.cuda.graph_pool_handle()`` shared with other graphs that never run at the same time.
    ``stream``: capture there instead (where another thread queues work on the caller's stream, which a
    capture would take in or refuse).
    """
    graph = torch.cuda.CUDAGraph()
    caller = torch.cuda.current_stream()
    if stream is None:
        stream = torch.cuda.Stream() if caller == torch.cuda.default_stream() else caller
    stream.wait_stream(caller)
    with torch.cuda.stream(stream):
        graph.capture_begin(pool=pool, capture_error_mode="thread_local")
        try:
            out = fn(*args, **(kwargs or {}))
        finally:
            graph.capture_end()
    caller.wait_stream(stream)
    return graph, out
