"""Run a model over prompts and reduce every hidden state and attention block to statistics on the fly."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import threading
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from mcr_exit.metrics.attention import AttentionStats, summarize_heads
from mcr_exit.metrics.massive import TOP_TOKENS, is_delimiter, token_norm_ratios, top_tokens
from mcr_exit.metrics.registry import HEAD_METRICS
from mcr_exit.metrics.spectral import SpectralStats, finish_spectral, gram_eigenvalues, spectral_terms
from mcr_exit.metrics.spectral_estimate import ESTIMATE_MIN_SIZE, estimate_spectrum
from mcr_exit.models.attention_stats import collect_attention_stats
from mcr_exit.models.forward import run_blocks
from mcr_exit.models.loading import LoadedModel
from mcr_exit.models.tokens import collate, length_batches, pad_id_of

SPECTRAL_BACKENDS = ("device", "estimate")
SPECTRA_METHODS = ("auto", "exact", "estimate")
MAX_UNFINISHED = 2  # batches whose statistics may still be in flight (host memory and latency bound)


def spectral_backend_for(spectra: str, device: torch.device | str) -> str:
    """The reducer backend for a ``--spectra`` choice: "auto" estimates on GPUs, exact elsewhere."""
    if spectra not in SPECTRA_METHODS:
        raise ValueError(f"unknown spectra method '{spectra}': use {', '.join(SPECTRA_METHODS)}")
    if spectra == "estimate" or (spectra == "auto" and torch.device(device).type == "cuda"):
        return "estimate"
    return "device"


class SpectralReducer:
    """Turns each hidden state into SpectralStats.

    "device" computes the Gram matrix and its eigenvalues where the hidden state lives. "estimate" keeps
    float32 Gram matrices until ``chunk`` of them are waiting and then gets entropy and top eigenvalues
    for all of them at once from matrix products (``metrics/spectral_estimate.py``); Gram matrices
    smaller than ESTIMATE_MIN_SIZE still get exact eigenvalues. Other ways of running the exact
    eigensolver (thread pools, side streams: benchmarks/spectral_backends.py) subclass this, override
    ``exact`` and register under their own name with ``register_reducer``.
    """

    BACKENDS: tuple[str, ...] = SPECTRAL_BACKENDS

    def __init__(
        self, backend: str = "device", dtype: torch.dtype = torch.float64, chunk: int = 64,
        estimate_options: dict | None = None,
    ):
        if backend not in self.BACKENDS:
            raise ValueError(f"unknown spectral backend '{backend}': use {', '.join(self.BACKENDS)}")
        self.estimate_options = dict(estimate_options or {})
        chunk = self.estimate_options.pop("chunk", chunk)
        self.backend, self.dtype, self.chunk = backend, dtype, chunk
        self.side: ThreadPoolExecutor | None = None  # the estimate's worker thread (GPUs)
        self.streams: dict[torch.device, torch.cuda.Stream] = {}
        # Work is counted in units (one per ``submit``). ``waiting`` holds Gram matrices not yet estimated,
        # ``pending`` the jobs under way as (first unit, last unit + 1, future); ``ready(t)`` says whether
        # units 0..t-1 are finished, so that a batch can be read out while later batches still run.
        self.submitted = 0
        self.pending: list[tuple[int, int, Future]] = []
        self.waiting: list[tuple[dict, torch.Tensor, Callable[[SpectralStats], None], int]] = []

    def _estimate(self, waiting: list) -> None:
        by_shape: dict[tuple, list[int]] = {}
        for n, (_, gram, _, _) in enumerate(waiting):
            by_shape.setdefault((gram.shape[-1], gram.device), []).append(n)
        for idx in by_shape.values():
            summary = estimate_spectrum(torch.cat([waiting[n][1] for n in idx]), **self.estimate_options)
            terms = {k: torch.cat([waiting[n][0][k] for n in idx]) for k in waiting[idx[0]][0]}
            allstats = finish_spectral(terms, summary).as_dict()  # once for the chunk, then sliced per layer
            offset = 0
            for n in idx:
                rows = slice(offset, offset + waiting[n][1].shape[0])
                offset = rows.stop
                waiting[n][2](SpectralStats(**{k: v[rows] for k, v in allstats.items()}))

    def _flush_estimates(self) -> None:
        """Estimate the waiting Gram matrices: inline on CPUs; on a GPU in a worker thread on its own CUDA
        stream, so that the estimate's host work and its few synchronizations (small eigenproblems) overlap
        the next layers' forward pass instead of draining the GPU's queue. A model spread over several
        GPUs gets one job per device, each on that device's side stream."""
        waiting, self.waiting = self.waiting, []
        by_device: dict[torch.device, list] = {}
        for w in waiting:
            by_device.setdefault(w[1].device, []).append(w)
        for device, group in by_device.items():
            if device.type == "cuda":
                self._estimate_on_side(device, group)
            else:
                self._estimate(group)

    def _estimate_on_side(self, device: torch.device, waiting: list) -> None:
        if self.side is None:
            self.side = ThreadPoolExecutor(1, thread_name_prefix="mcr-spectra")
        ready = torch.cuda.Event()
        with torch.cuda.device(device):
            ready.record(torch.cuda.current_stream(device))

        def work() -> None:
            if device not in self.streams:  # one side stream per device, made once
                self.streams[device] = torch.cuda.Stream(device=device)
            stream = self.streams[device]
            stream.wait_event(ready)
            with torch.cuda.device(device), torch.cuda.stream(stream), torch.inference_mode():
                for terms, gram, _, _ in waiting:  # made on the main stream, read on this one
                    gram.record_stream(stream)
                    for v in terms.values():
                        v.record_stream(stream)
                self._estimate(waiting)
            stream.synchronize()  # the results are complete before the main thread reads them

        self.pending.append((waiting[0][3], waiting[-1][3] + 1, self.side.submit(work)))

    def submit(self, h: torch.Tensor, lengths: torch.Tensor, store: Callable[[SpectralStats], None],
               padded: bool | None = None) -> None:
        unit = self.submitted
        self.submitted += 1
        if self.backend == "estimate":
            T, d = h.shape[-2], h.shape[-1]
            if min(T, d) >= ESTIMATE_MIN_SIZE:
                terms, gram = spectral_terms(h, lengths.to(h.device), compute_dtype=self.dtype,
                                             gram_dtype=torch.float32, padded=padded)
                self.waiting.append((terms, gram, store, unit))
                if sum(w[1].shape[0] for w in self.waiting) >= self.chunk:
                    self._flush_estimates()
                return
        terms, gram = spectral_terms(h, lengths.to(h.device), compute_dtype=self.dtype)
        self.exact(terms, gram, store, unit)

    def exact(self, terms: dict, gram: torch.Tensor, store: Callable[[SpectralStats], None], unit: int) -> None:
        """Exact eigenvalues of one Gram matrix, here and now (subclasses may defer: add to ``pending``)."""
        store(finish_spectral(terms, gram_eigenvalues(gram)))

    def ticket(self) -> int:
        """A mark for all work submitted so far (``ready`` takes it)."""
        return self.submitted

    def ready(self, ticket: int, wait: bool = False) -> bool:
        """Whether the statistics of every unit before ``ticket`` have been stored; with ``wait``, make it so
        (estimating Gram matrices still waiting for a full chunk). A failed job raises here."""
        if self.waiting and self.waiting[0][3] < ticket:
            if not wait:
                return False
            self._flush_estimates()
        for start, _, f in self.pending:
            if start < ticket and not (wait or f.done()):
                return False
        for start, _, f in self.pending:
            if start < ticket:
                f.result()
        self.pending = [p for p in self.pending if p[1] > ticket]
        return True

    def drain(self) -> None:
        self.ready(self.submitted, wait=True)

    def close(self) -> None:
        self.drain()
        if self.side is not None:
            self.side.shutdown()


REDUCERS: dict[str, type[SpectralReducer]] = {name: SpectralReducer for name in SPECTRAL_BACKENDS}


def register_reducer(cls: type[SpectralReducer]) -> type[SpectralReducer]:
    """Make ``cls`` available to ``collect_statistics(spectral_backend=...)`` under each of its BACKENDS."""
    for name in cls.BACKENDS:
        REDUCERS[name] = cls
    return cls


@dataclass(kw_only=True)
class LayerStatistics:
    """Per-prompt statistics. ``hidden[m]`` is (N, L+1); ``attention[m]`` is (N, L); ``heads[m]`` is (N, L, H);
    ``tokens["top_position"]`` and ``tokens["top_ratio"]`` are (N, L+1, k): the k largest-norm tokens of
    each prompt at each hidden index (position, norm / median norm), largest first."""

    n_layers: int
    n_heads: int
    lengths: np.ndarray  # (N,)
    hidden: dict[str, np.ndarray] = field(default_factory=dict)
    final_normed: dict[str, np.ndarray] = field(default_factory=dict)  # (N,) each
    attention: dict[str, np.ndarray] = field(default_factory=dict)
    heads: dict[str, np.ndarray] = field(default_factory=dict)
    tokens: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def n_prompts(self) -> int:
        return len(self.lengths)


class _BatchBuffer:
    """Holds one batch's statistics on their device and moves them to the host in one copy.

    One transfer per batch instead of one per (metric, layer) keeps the GPU from waiting on the host.
    """

    def __init__(self):
        self.items: list[tuple[dict, str, tuple, object, torch.Tensor]] = []
        self.lock = threading.Lock()

    def add(self, target: dict, key: str, shape: tuple, col, values: torch.Tensor) -> None:
        with self.lock:
            self.items.append((target, key, shape, col, values.detach()))

    def flush(self, rows: list[int]) -> None:
        if not self.items:
            return
        by_kind: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for n, item in enumerate(self.items):
            by_kind.setdefault((item[4].device, item[4].dtype), []).append(n)
        host: dict[int, np.ndarray] = {}
        for idx in by_kind.values():  # one concatenation, one conversion and one copy per device and dtype
            flat = torch.cat([self.items[n][4].reshape(-1) for n in idx]).to(torch.float64).cpu().numpy()
            offset = 0
            for n in idx:
                size = self.items[n][4].numel()
                host[n] = flat[offset : offset + size].reshape(self.items[n][4].shape)
                offset += size
        for n, (target, key, shape, col, _) in enumerate(self.items):
            if key not in target:
                target[key] = np.full(shape, np.nan, dtype=np.float64 if len(shape) < 3 else np.float32)
            if col is None:
                target[key][rows] = host[n]
            else:
                target[key][np.ix_(rows, col) if isinstance(col, list) else (rows, col)] = host[n]
        self.items.clear()


def delimiter_flags(tokenizer, ids: list[list[int]]) -> list[list[bool]]:
    """Per prompt and position: whether the token is a delimiter (metrics/massive.py), decided once per id.
    A tokenizer that cannot decode (a stand-in in tests) marks no token as a delimiter."""
    decode = getattr(tokenizer, "decode", None)
    if decode is None:
        return [[False] * len(row) for row in ids]
    seen: dict[int, bool] = {}
    out = []
    for row in ids:
        for t in row:
            if t not in seen:
                seen[t] = is_delimiter(decode([t]))
        out.append([seen[t] for t in row])
    return out


def _reduce_top_tokens(h: torch.Tensor, lengths: torch.Tensor, delimiters: torch.Tensor):
    """The largest-norm tokens of one hidden state (B, T, d), reduced at once: (B, k) positions and ratios,
    and per row the top token's ratio and whether it sits at position 0 or on a delimiter."""
    ratios = token_norm_ratios(h, lengths)
    pos, val = top_tokens(ratios, TOP_TOKENS)
    first = pos[:, 0]
    at0 = first == 0
    at_delim = delimiters.to(first.device).gather(1, first[:, None])[:, 0] & ~at0
    return pos, val, {"max_norm_ratio": val[:, 0], "max_at_position0": at0.float(),
                      "max_at_delimiter": at_delim.float()}


def collect_statistics(
    loaded: LoadedModel,
    ids: list[list[int]],
    *,
    tau: float = 0.3,
    max_batch: int = 8,
    max_tokens: int = 8192,
    spectral_dtype: torch.dtype = torch.float64,
    spectral_backend: str = "device",
    spectral_options: dict | None = None,
    attention_method: str = "auto",
    progress: Callable[[int], None] | None = None,
) -> LayerStatistics:
    """Per-prompt statistics of every hidden state (0..L) and every attention block (0..L-1).

    Prompts are grouped by length into right-padded batches; padding never enters a statistic,
    so results do not depend on the batching.
    """
    adapter = loaded.adapter
    L = adapter.n_layers
    N = len(ids)
    n_heads = int(getattr(loaded.model.config, "num_attention_heads", 0) or 0)
    stats = LayerStatistics(n_layers=L, n_heads=n_heads, lengths=np.array([len(x) for x in ids]))
    pad = pad_id_of(loaded.tokenizer)
    device = loaded.input_device
    delims = delimiter_flags(loaded.tokenizer, ids)
    if spectral_backend not in REDUCERS:
        raise ValueError(f"unknown spectral backend '{spectral_backend}': use {', '.join(REDUCERS)}")
    reducer = REDUCERS[spectral_backend](spectral_backend, spectral_dtype, estimate_options=spectral_options)
    # Batches whose statistics are still being computed (spectra in a worker thread): each is read out
    # once ``reducer.ready`` says so, so the spectra of one batch overlap the next batch's forward pass.
    unfinished: list[tuple[list[int], _BatchBuffer, int]] = []

    def read_out(wait: bool) -> None:
        while unfinished:
            rows, buf, ticket = unfinished[0]
            # wait when more than MAX_UNFINISHED batches are in flight, unless they hold fewer hidden states than
            # two chunks of the estimate (small batches: waiting would estimate a chunk before it is full)
            in_flight = (L + 1) * sum(len(r) for r, _, _ in unfinished)
            too_many = len(unfinished) > MAX_UNFINISHED and in_flight > 2 * reducer.chunk
            if not reducer.ready(ticket, wait=wait or too_many):
                return
            buf.flush(rows)
            unfinished.pop(0)
            if progress is not None:
                progress(len(rows))

    for batch in length_batches([len(x) for x in ids], max_tokens, max_batch):
        input_ids, mask = collate([ids[i] for i in batch], pad, device)
        lengths = mask.sum(1)
        padded = len({len(ids[i]) for i in batch}) > 1  # known on the host, without a device read
        buffer = _BatchBuffer()
        delim = collate([[int(f) for f in delims[i]] for i in batch], 0)[0].bool()

        def on_hidden(i: int, h: torch.Tensor, buffer: _BatchBuffer = buffer, delim=delim) -> None:
            def store(s: SpectralStats) -> None:
                for key, val in s.as_dict().items():
                    buffer.add(stats.hidden, key, (N, L + 1), i, val)

            reducer.submit(h, lengths, store, padded)
            pos, val, per_row = _reduce_top_tokens(h, lengths, delim)
            for key, v in per_row.items():
                buffer.add(stats.hidden, key, (N, L + 1), i, v)
            buffer.add(stats.tokens, "top_position", (N, L + 1, pos.shape[1]), i, pos)
            buffer.add(stats.tokens, "top_ratio", (N, L + 1, pos.shape[1]), i, val)

        layers: dict[int, AttentionStats] = {}
        with collect_attention_stats(adapter, lengths, layers.__setitem__, method=attention_method):
            final = run_blocks(adapter, input_ids, mask, on_hidden)
        if layers:  # all layers' head statistics summarized at once, not layer by layer
            js = sorted(layers)
            cols = slice(js[0], js[-1] + 1) if js == list(range(js[0], js[-1] + 1)) else js
            on = getattr(layers[js[0]], HEAD_METRICS[0]).device  # layers of a model on several GPUs: one device
            heads = AttentionStats(**{key: torch.stack([getattr(layers[j], key).to(on) for j in js], 1)
                                      for key in HEAD_METRICS})  # (B, layers, H)
            for key, val in summarize_heads(heads, tau).items():
                buffer.add(stats.attention, key, (N, L), cols, val)
            for key in HEAD_METRICS:
                buffer.add(stats.heads, key, (N, L, heads.sink_score.shape[2]), cols, getattr(heads, key))
        if final is not None:

            def store_final(s: SpectralStats, buffer: _BatchBuffer = buffer) -> None:
                for key in ("entropy", "entropy_norm", "anisotropy", "bos_norm", "other_norm", "norm_ratio"):
                    buffer.add(stats.final_normed, key, (N,), None, getattr(s, key))

            reducer.submit(final, lengths, store_final)
        unfinished.append((batch, buffer, reducer.ticket()))
        read_out(wait=False)
    reducer.close()
    read_out(wait=True)
    if stats.heads:
        stats.n_heads = next(iter(stats.heads.values())).shape[2]
    return stats


def capture_head_maps(
    loaded: LoadedModel, ids: list[int], heads: dict[int, list[int]]
) -> dict[tuple[int, int], np.ndarray]:
    """Full attention maps (T, T) of a few (block, head) pairs for one prompt (Figure 6 style plots)."""
    maps: dict[tuple[int, int], np.ndarray] = {}
    input_ids, mask = collate([ids], pad_id_of(loaded.tokenizer), loaded.input_device)

    def on_map(j: int, m: torch.Tensor) -> None:
        for k, h in enumerate(heads[j]):
            maps[(j, h)] = m[0, k].float().numpy()

    with collect_attention_stats(loaded.adapter, mask.sum(1), lambda j, a: None, capture=heads, on_map=on_map):
        run_blocks(loaded.adapter, input_ids, mask, lambda i, h: None)
    return maps
