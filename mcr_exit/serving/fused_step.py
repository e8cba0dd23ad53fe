"""Decode steps that carry embedding inputs: one pass over the weights for both.

While sequences generate, a decode step of B rows is bound by the weights' reads and the kernel
launches, not by arithmetic: a few hundred more tokens in the same matrix products cost the GPU
little. An embedding batch run beside the step on a stream of its own costs far more: each of the
step's small kernels waits for the batch's blocks to leave the multiprocessors, and generation slows
by half. So when embedding inputs of the served layer k wait, the scheduler runs a fused step: one
forward of 1 x (B + E) tokens through transformers' own blocks, where

- the first B tokens are the decode rows (slot b at ``positions[b]``, attending over the first
  ``span`` positions of its KV slot, as in ``ModelStepper.step``), and
- the last E tokens are embedding inputs packed one after another (each from position 0, attending
  causally within its own input, padding after the last one), with no KV written for them;
- after block k - 1 the embedding tokens leave the pass: hidden[k] of them is kept, and blocks
  k.. run on the B decode rows only (the early exit of ``models.forward``: later blocks never see
  the embedding tokens). With k = L, hidden[L] is the last block's raw output, before the final norm.

E is rounded up to a bucket (64, 128, 192, 256, 384, 512, 768, 1024, .., at most
``EngineConfig.fused_embed_tokens``: at most a third of a step's carried tokens are padding above 128); on a GPU each
(batch bucket, span bucket, E) step is captured as a CUDA graph the first time it is needed (at most
``MAX_GRAPHS``, least recently used first out; all in the decode graphs' memory pool: one lane replays
them one at a time). On the CPU the same forward runs eagerly (tests compare it with ``hidden_at`` and
with the plain decode step).

How the blocks are driven: for the duration of a fused forward, each block's call goes through a small
wrapper (installed as the module's ``_compiled_call_impl``, which ``nn.Module.__call__`` prefers) that
cuts the token dimension of the block's arguments to the decode rows from block k on; the attention
function ``mcr_exit_fused`` splits queries into the decode rows (against the KV pool) and the packed
inputs (against their own keys, with a block-diagonal causal mask). Both run outside any compiled
region (``torch.compiler.disable``), where the layer index may pick the pool's tensors.
"""

from __future__ import annotations

import functools
import itertools
import time
from collections import OrderedDict
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F

from mcr_exit.models.cuda_graph import capture
from mcr_exit.models.tokens import to_device
from mcr_exit.serving.model_step import _decode_attention

FUSED_ATTENTION = "mcr_exit_fused"
MAX_GRAPHS = 64
MIN_TOKENS = 64


def token_buckets(max_tokens: int) -> list[int]:
    """Packed-token buckets up to ``max_tokens``: 64, 128, then steps of x1.5 and x4/3 by turns (192, 256,
    384, 512, 768, 1024, ..), and ``max_tokens`` itself. Carried tokens past what the decode rows need are
    arithmetic the step pays for: padding to a 4x bucket cost generation more than the graphs it saved."""
    out, b, grow = [], min(MIN_TOKENS, max_tokens), itertools.cycle(((3, 2), (4, 3)))
    while b < max_tokens:
        out.append(b)
        if b < 2 * MIN_TOKENS:
            b *= 2
        else:
            num, den = next(grow)
            b = b * num // den
    return out + [max_tokens]

_running: FusedStep | None = None  # the fused forward being run (or captured) now: one lane runs them


@torch.compiler.disable
def _fused_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                     sliding_window=None, **kwargs):
    """query (1, H, B + E, D) or (1, H, B, D) after the embedding inputs left; key/value as written."""
    fs = _running
    B, span = fs.B, fs.span
    pool = fs.stepper.pool
    li = module.layer_idx
    q_dec = query[0, :, :B].transpose(0, 1).unsqueeze(2)  # (B, H, 1, D)
    sliding = sliding_window is not None and fs.stepper.layer_types is not None
    out, _ = _decode_attention(module, q_dec, pool.k[li][:B, :, :span], pool.v[li][:B, :, :span],
                               fs.decode_masks["sliding" if sliding else "full"], scaling=scaling)
    out = out.transpose(0, 1)  # (1, B, H, D)
    if query.shape[2] == B:
        return out, None
    q, k, v = query[:, :, B:], key[:, :, B:], value[:, :, B:]
    if q.shape[1] != k.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # (as repeat_kv orders the heads)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    emb = F.scaled_dot_product_attention(q, k, v, attn_mask=fs.embed_masks["sliding" if sliding else "full"],
                                         scale=scaling)
    return torch.cat([out, emb.transpose(1, 2)], dim=1).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(FUSED_ATTENTION, _fused_attention)


class _FusedCache:
    """The cache the attention layers see in a fused forward: the B decode rows' keys and values go to
    their slots at their positions; the packed inputs' are used in place and never stored."""

    def __init__(self, fused: FusedStep):
        self.fused = fused

    @torch.compiler.disable
    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        fs = self.fused
        pool, B = fs.stepper.pool, fs.B
        rows, positions = fs.stepper.rows[:B], fs.stepper.positions[:B]
        pool.k[layer_idx][rows, :, positions] = key[0, :, :B].transpose(0, 1)
        pool.v[layer_idx][rows, :, positions] = value[0, :, :B].transpose(0, 1)
        return key, value

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # positions are always passed explicitly


def _cut(obj, n: int, keep: int):
    """``obj`` with every tensor's token dimension of length ``n`` cut to its first ``keep`` entries."""
    if isinstance(obj, torch.Tensor):
        if obj.dim() >= 2 and obj.shape[1] == n:
            return obj[:, :keep]
        if obj.dim() == 1 and obj.shape[0] == n:
            return obj[:keep]
        return obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_cut(x, n, keep) for x in obj)
    if isinstance(obj, dict):
        return {k: _cut(v, n, keep) for k, v in obj.items()}
    return obj


def _hidden_arg(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


class FusedStep:
    """Fused decode + embedding steps of one ``ModelStepper`` (attached to its pool), for layer ``layer``."""

    def __init__(self, stepper, *, layer: int, max_tokens: int, graphs: bool):
        _register()
        self.stepper, self.layer, self.max_tokens = stepper, layer, max_tokens
        self.use_graphs = graphs
        self.buckets = token_buckets(max_tokens)
        dev = stepper.device
        self.ids = torch.zeros(max_tokens, dtype=torch.long, device=dev)
        self.pos = torch.zeros(max_tokens, dtype=torch.long, device=dev)
        self.seg = torch.full((max_tokens,), -1, dtype=torch.long, device=dev)
        self.cache = _FusedCache(self)
        self.dummy_mask = torch.zeros((1, 1, 1, 1), dtype=stepper.dtype, device=dev)
        self.graphs: OrderedDict[tuple[int, int, int], tuple] = OrderedDict()
        self.captured = 0
        self.capture_seconds = 0.0
        self.B = self.span = self.N = 0
        self.decode_masks: dict = {}
        self.embed_masks: dict = {}
        self._kept: torch.Tensor | None = None
        # how the blocks run: "shared" (the decode steps' compiled modules, dynamic shapes), "static" (compiled
        # again for each step shape) or "eager"
        self.compile = "shared"
        self._static: list | None = None

    def fits(self, n_tokens: int) -> bool:
        return n_tokens <= self.max_tokens

    def bucket(self, n_tokens: int) -> int:
        return next(b for b in self.buckets if b >= n_tokens)

    # ---- inputs -------------------------------------------------------------------------------
    def load(self, inputs: list[list[int]]) -> tuple[int, torch.Tensor, torch.Tensor]:
        """Pack ``inputs`` into the static buffers. Returns (E bucket, (R, T) index of each input's tokens
        in the packed hidden states, (R, T) 0/1 mask), both on the device."""
        lengths = np.fromiter((len(x) for x in inputs), dtype=np.int64, count=len(inputs))
        total, T = int(lengths.sum()), int(lengths.max())
        E = self.bucket(total)
        starts = np.cumsum(lengths) - lengths
        ids = np.zeros(E, dtype=np.int64)
        pos = np.zeros(E, dtype=np.int64)
        seg = np.full(E, -1, dtype=np.int64)
        ids[:total] = np.fromiter(itertools.chain.from_iterable(inputs), dtype=np.int64, count=total)
        pos[:total] = np.arange(total) - np.repeat(starts, lengths)
        seg[:total] = np.repeat(np.arange(len(inputs)), lengths)
        offsets = np.arange(T)[None, :]
        mask = offsets < lengths[:, None]
        index = np.where(mask, starts[:, None] + offsets, 0)
        dev = self.stepper.device
        packed = to_device(torch.from_numpy(np.stack([ids, pos, seg])), dev)
        self.ids[:E].copy_(packed[0])
        self.pos[:E].copy_(packed[1])
        self.seg[:E].copy_(packed[2])
        return E, to_device(torch.from_numpy(index), dev), to_device(torch.from_numpy(mask.astype(np.int64)), dev)

    # ---- the forward --------------------------------------------------------------------------
    def _embed_masks(self, E: int) -> dict:
        st = self.stepper
        seg, pos = self.seg[:E], self.pos[:E]
        allowed = (seg[:, None] == seg[None, :]) & (pos[None, :] <= pos[:, None])

        def additive(a):
            return torch.zeros(a.shape, dtype=st.dtype, device=a.device).masked_fill_(~a, st.neg)[None, None]

        masks = {"full": additive(allowed)}
        if st.layer_types is not None:
            masks["sliding"] = additive(allowed & (pos[None, :] > pos[:, None] - st.window))
        return masks

    def _call_block(self, i: int, inner, *args, **kwargs):
        k, B, N = self.layer, self.B, self.N
        if i == k:  # hidden[k] is block k's input: keep the packed inputs' rows, run on without them
            self._kept = _hidden_arg(args, kwargs)[0, B:]
        if i >= k and N > B:
            args, kwargs = _cut(args, N, B), _cut(kwargs, N, B)
        out = inner(*args, **kwargs)
        if i + 1 < len(self.stepper.adapter.blocks):
            return out
        h = out[0] if isinstance(out, (tuple, list)) else out
        if k == i + 1:  # hidden[L]: the last block's raw output
            self._kept = h[0, B:]
            return out
        if N > B:  # the backbone's own code after the blocks may expect all N positions: zeros stand in
            h = torch.cat([h, h.new_zeros((h.shape[0], N - B, h.shape[2]))], dim=1)
            return (h, *out[1:]) if isinstance(out, (tuple, list)) else h
        return out

    def forward(self, B: int, span: int, E: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, V) logits of decode rows 0..B-1 and (E, d) hidden[k] of the packed inputs (what a graph
        captures). Decode inputs come from the stepper's device buffers (``feed``/``advance``)."""
        global _running
        st = self.stepper
        self.B, self.span, self.N = B, span, B + E
        pos_dec = st.positions[:B]
        masks = st._mask(pos_dec[:, None], span, None, None)
        if isinstance(masks, dict):
            self.decode_masks = {"full": masks["full_attention"], "sliding": masks["sliding_attention"]}
        else:
            self.decode_masks = {"full": masks}
        self.embed_masks = self._embed_masks(E)
        ids = torch.cat([st.tokens[:B], self.ids[:E]])[None]
        pos = torch.cat([pos_dec, self.pos[:E]])[None]
        mask_arg = ({t: self.dummy_mask for t in st.layer_types} if st.layer_types is not None else self.dummy_mask)
        blocks = st.adapter.blocks
        cfg = st.model.config
        old_impl = cfg._attn_implementation
        _running, self._kept = self, None
        if self.compile == "static" and self._static is None and st.compiled:
            self._static = st.compile_static()
        modules = (nullcontext() if self.compile == "eager" else
                   st._compiled_modules(self._static if self.compile == "static" else None))
        with modules:
            compiled = [blk._compiled_call_impl for blk in blocks]
            try:
                for i, blk in enumerate(blocks):
                    blk._compiled_call_impl = functools.partial(self._call_block, i, compiled[i] or blk._call_impl)
                cfg._attn_implementation = FUSED_ATTENTION
                out = st.backbone(input_ids=ids, position_ids=pos, attention_mask=mask_arg, use_cache=True,
                                  **{st.cache_kw: self.cache})
            finally:
                cfg._attn_implementation = old_impl
                for blk, fn in zip(blocks, compiled):
                    blk._compiled_call_impl = fn
                _running = None
        logits = st.logits(out.last_hidden_state[0, :B])
        return logits, self._kept

    # ---- graphs -------------------------------------------------------------------------------
    def run(self, B: int, span: int, E: int, *, lock=None) -> tuple[torch.Tensor, torch.Tensor]:
        """One fused step for decode rows 0..B-1 (``span`` > every running row's position) and the E packed
        tokens ``load`` left: a graph replay on a GPU (captured now if new), else the eager forward
        (holding ``lock``: it runs module code)."""
        st = self.stepper
        if not self.use_graphs:
            with lock if lock is not None else nullcontext():
                return self.forward(B, span, E)
        Bb, sb = st._bucket(B, st.batch_buckets), st._bucket(span, st.span_buckets)
        graph, (logits, hidden) = self._graph((Bb, sb, E), lock)
        graph.replay()
        return logits[:B], hidden

    def _graph(self, key: tuple[int, int, int], lock=None) -> tuple:
        """The graph of step shape ``key`` (batch bucket, span bucket, E), captured now if it is new."""
        entry = self.graphs.get(key)
        if entry is not None:
            self.graphs.move_to_end(key)
            return entry
        while len(self.graphs) >= MAX_GRAPHS:
            self.graphs.popitem(last=False)
        t0 = time.perf_counter()
        with lock if lock is not None else nullcontext():
            self.forward(*key)  # compilation and lazy initializations, outside the capture
            graph, out = capture(self.forward, key, pool=self.stepper.graph_pool)
        self.captured += 1
        self.capture_seconds += time.perf_counter() - t0
        entry = self.graphs[key] = (graph, out)
        return entry

    def full_batch_keys(self, limit: int = MAX_GRAPHS // 2) -> list[tuple[int, int, int]]:
        """The step shapes captured at warm-up: the largest batch bucket, with every token bucket, for as many
        of the shortest span buckets as ``limit`` graphs allow (at least one). That batch bucket is the one a
        loaded server runs (the highest slot in use sets it), where a capture while serving would stall every
        stream. Largest first, so that later captures reuse the memory pool's blocks."""
        st = self.stepper
        spans = st.span_buckets[: max(1, limit // len(self.buckets))]
        keys = [(st.batch_buckets[-1], span, E) for span in spans for E in self.buckets][: max(limit, 1)]
        return sorted(keys, key=lambda k: (k[1], k[2]), reverse=True)

    def capture_full_batch(self, limit: int = MAX_GRAPHS // 2) -> int:
        """At warm-up (the pool idle): capture ``full_batch_keys``; other shapes are captured the first time
        they are needed. Returns the number captured."""
        st = self.stepper
        st.positions.zero_()
        st.tokens.zero_()
        keys = self.full_batch_keys(limit)
        for key in keys:
            self._graph(key)
        return len(keys)
