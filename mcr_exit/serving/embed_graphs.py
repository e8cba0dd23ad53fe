"""Embedding forwards replayed from CUDA graphs, for models whose embedding batches are bound by the host.

A small model's embedding batch costs the GPU a few milliseconds, and the host more: the eager forward
to layer k calls hundreds of kernels from Python, each call giving up and taking back the interpreter
lock that the HTTP event loop and the generation lane also need. A graph per (rows, positions, layer)
bucket runs the whole truncated forward in one call, and without ``forward_lock`` (no Python module code
runs, so the early-exit hooks of an eager forward on the other lane are never in its way).

- Buckets: rows rounded up to a multiple of 8, positions to a multiple of 32, within 1.25 x the batch
  token budget. A bucket is captured the second time it comes (the first runs eagerly, so that shapes met
  once cost no capture); at most ``MAX_GRAPHS`` are kept, whose hidden-state outputs hold at most
  ``MAX_OUTPUT_BYTES`` together, the least recently used going first, all in one memory pool (they never
  run at the same time: one lane, one stream, each graph's hidden state pooled and copied out before the
  next replay is queued). Closed-loop clients of 8 inputs make batches of 70-128 rows of 160 or 192
  positions: more buckets than a set of 12 could keep, and every capture then fell inside the measured
  traffic (0.1-0.4 s in each second of it, on an H200 with SmolLM2).
- Inside a graph the 0/1 mask becomes the prepared 4-D additive mask of the decode steps
  (``ModelStepper._mask``: padded rows and positions see key 0 only, so nothing turns NaN), and the blocks
  run to layer k through ``hidden_at``, the one early-exit path; the pooling runs after the replay,
  eagerly (its data-dependent selection of positions cannot be captured).
- When (``EngineConfig.embed_cuda_graphs``, ``mcr-exit serve --embed-cuda-graphs``): ``auto`` (the
  default) replays graphs for models of at most ``AUTO_MAX_PARAMETERS`` parameters while no sequence
  generates, and runs batches eagerly beside generation; ``on`` replays them always, for any model; ``off``
  never. Measured on an H200 with SmolLM2-135M through HTTP (benchmarks/results/serving_gpu_h200_smollm2*.md):
  replayed batches served 44-50 % of the offline truncated forward's embeddings/s against 38 % eager, and
  a single embedding's p99 while 64 streams generate fell from 322 to 28 ms; but beside 64 streams, graph
  batches (dense GPU work: each decode kernel waits for their blocks to leave the multiprocessors) cut
  generation by 45 % where eager batches (slow to launch, thin on the GPU) cut it by 7 %. Hence ``auto``: full speed for embeddings when
  the GPU is theirs, generation's speed kept when it is shared. A large model's embedding forward is bound
  by the GPU, and its graphs would hold activations beside the KV pool: ``auto`` leaves it eager.
- A capture that fails turns the graphs off with a warning: every batch then runs eagerly, as without them.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from contextlib import nullcontext

import torch

from mcr_exit.models.cuda_graph import capture
from mcr_exit.models.forward import hidden_at

log = logging.getLogger("mcr_exit.serving")

ROWS_STEP = 8
POSITIONS_STEP = 32
MAX_GRAPHS = 64
MAX_OUTPUT_BYTES = 1 << 30  # the graphs' output buffers together (their intermediates share the pool)
MIN_SEEN = 2  # a bucket is captured when it comes for the second time
AUTO_MAX_PARAMETERS = 3_000_000_000
TOKEN_SLACK = 1.25  # a bucket may hold this many times the batch token budget


def mode(setting: str, model: torch.nn.Module, device: torch.device) -> str | None:
    """When embedding batches of ``model`` replay graphs under ``setting`` (auto, on, off): "always",
    "idle" (while no sequence generates) or None (never)."""
    if device.type != "cuda" or setting == "off":
        return None
    if setting == "on":
        return "always"
    return "idle" if sum(p.numel() for p in model.parameters()) <= AUTO_MAX_PARAMETERS else None


def _round_up(n: int, step: int) -> int:
    return -(-n // step) * step


class EmbedGraphs:
    """Graph-captured embedding forwards of one ``ModelStepper``'s model (see the module description).

    ``graphs=False`` runs the same padded function eagerly instead of capturing it (what a graph would
    replay, on any device: the CPU tests compare it with ``hidden_at``)."""

    def __init__(self, stepper, *, max_batch_tokens: int, graphs: bool = True, always: bool = False):
        self.stepper = stepper
        self.always = always  # else the embedding lane uses these only while no sequence generates
        self.max_tokens = int(TOKEN_SLACK * max_batch_tokens)
        self.use_graphs = graphs
        self.entries: OrderedDict[tuple[int, int, int], tuple] = OrderedDict()  # -> (ids, mask, graph, hidden)
        self.seen: dict[tuple[int, int, int], int] = {}
        self.held_bytes = 0  # what the kept entries' buffers hold (``_bytes``)
        self.pool = None
        self.capture_stream = None
        self.off = False
        self.captured = 0
        self.capture_seconds = 0.0  # warm-up forwards and captures of buckets met while serving

    def _bytes(self, rows: int, positions: int) -> int:
        """What a bucket's graph keeps for itself: its (rows, positions, d) hidden state and its input buffers."""
        return rows * positions * (self.stepper.adapter.embed.weight.shape[1] * self.stepper.dtype.itemsize + 16)

    @staticmethod
    def bucket(rows: int, positions: int) -> tuple[int, int]:
        return _round_up(rows, ROWS_STEP), _round_up(positions, POSITIONS_STEP)

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, layer: int) -> torch.Tensor:
        """hidden[layer] of a padded (rows, positions) batch: what a graph captures."""
        rows, positions = ids.shape
        valid = mask.bool()
        q_pos = torch.arange(positions, device=ids.device).expand(rows, positions)
        return hidden_at(self.stepper.adapter, ids, self.stepper._mask(q_pos, positions, valid, valid), layer)

    def hidden(self, ids: torch.Tensor, mask: torch.Tensor, layer: int, *, lock=None) -> torch.Tensor | None:
        """hidden[layer] (B, T, d) of this right-padded batch from a graph, or None: run it eagerly.
        ``lock`` is held while a bucket is warmed up and captured (eager module code runs then)."""
        if self.off:
            return None
        B, T = ids.shape
        rows, positions = self.bucket(B, T)
        if rows * positions > self.max_tokens:
            return None
        key = (rows, positions, layer)
        entry = self.entries.get(key)
        if entry is None:
            self.seen[key] = self.seen.get(key, 0) + 1
            if self.seen[key] < MIN_SEEN:
                return None
            with lock if lock is not None else nullcontext():
                entry = self._make(key)
            if entry is None:
                return None
        else:
            self.entries.move_to_end(key)
        static_ids, static_mask, graph, out = entry
        static_mask.zero_()
        static_ids[:B, :T].copy_(ids)
        static_mask[:B, :T].copy_(mask)
        if graph is None:
            out = self._forward(static_ids, static_mask, layer)
        else:
            graph.replay()
        return out[:B, :T]

    def _make(self, key: tuple[int, int, int]) -> tuple | None:
        rows, positions, layer = key
        dev = self.stepper.device
        static_ids = torch.zeros((rows, positions), dtype=torch.long, device=dev)
        static_mask = torch.zeros((rows, positions), dtype=torch.long, device=dev)
        graph = out = None
        if self.use_graphs:
            t0 = time.perf_counter()
            try:
                self._forward(static_ids, static_mask, layer)  # lazy initializations, outside the capture
                if self.pool is None:
                    self.pool = torch.cuda.graph_pool_handle()
                    self.capture_stream = torch.cuda.Stream(dev)
                # on a stream of its own: the caller's may be the generation lane's, busy with decode steps
                graph, out = capture(self._forward, (static_ids, static_mask, layer), pool=self.pool,
                                     stream=self.capture_stream)
            except Exception as exc:  # noqa: BLE001 - a model or library call that cannot be captured
                self.off = True
                log.warning("embedding CUDA graphs are off (%s: %s); embedding batches run eagerly",
                            type(exc).__name__, exc)
                return None
            self.captured += 1
            self.capture_seconds += time.perf_counter() - t0
        size = self._bytes(rows, positions)
        while self.entries and (len(self.entries) >= MAX_GRAPHS or self.held_bytes + size > MAX_OUTPUT_BYTES):
            old_rows, old_positions, _ = self.entries.popitem(last=False)[0]
            self.held_bytes -= self._bytes(old_rows, old_positions)
        self.held_bytes += size
        self.entries[key] = (static_ids, static_mask, graph, out)
        return self.entries[key]
