"""Full-depth forward steps over the KV pool: batched prefill, and decode replayed from CUDA graphs.

The model code is transformers' own, called through the adapter's backbone with explicit position ids,
a prepared 4D additive mask (a dict per layer type where some layers use a sliding window) and a
``SlotCache``. Decode steps use an attention function that reads grouped KV heads in place (the query
heads of one KV head become its query rows), instead of transformers' copy of every KV head G times.
On CUDA every (batch bucket, length bucket) decode step is captured once as a CUDA graph at warm-up,
after its blocks were compiled regionally (``enable_compile``): one compiled graph serves every block.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from mcr_exit.models.tokens import to_device
from mcr_exit.serving.kv_pool import KVPool, LayerShape, ShapeProbe, SlotCache

DECODE_ATTENTION = "mcr_exit_decode"


def _decode_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                      **kwargs):
    """One query token per row: (B, H, 1, D) against (B, Hkv, S, D) keys without repeating them."""
    B, H, T, D = query.shape
    hkv = key.shape[1]
    mask = attention_mask[:, :, :, : key.shape[-2]] if attention_mask is not None else None
    if T == 1 and H != hkv:
        q = query.reshape(B, hkv, H // hkv, D)  # heads h = kv * G + g, as repeat_kv orders them
        out = F.scaled_dot_product_attention(q, key, value, attn_mask=mask, scale=scaling)
        out = out.reshape(B, H, 1, D)
    else:
        if H != hkv:
            key = key.repeat_interleave(H // hkv, dim=1)
            value = value.repeat_interleave(H // hkv, dim=1)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def _register_decode_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(DECODE_ATTENTION, _decode_attention)


def _pow2_buckets(lo: int, hi: int) -> list[int]:
    out, b = [], lo
    while b < hi:
        out.append(b)
        b *= 2
    return out + [hi]


class ModelStepper:
    """Prefill and decode forwards of one loaded model over one KV pool."""

    def __init__(self, loaded):
        self.adapter = loaded.adapter
        self.model = loaded.model
        self.backbone = loaded.adapter.backbone
        self.device = loaded.input_device
        self.dtype = loaded.adapter.embed.weight.dtype
        cfg = self.model.config
        params = inspect.signature(self.backbone.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        types = list(getattr(cfg, "layer_types", None) or [])
        self.layer_types = sorted(set(types)) if "sliding_attention" in types else None
        self.window = getattr(cfg, "sliding_window", None) if self.layer_types else None
        self.neg = torch.finfo(self.dtype).min
        self.pool: KVPool | None = None
        self.cache: SlotCache | None = None
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.use_graphs = False
        self.graph_pool = None  # the decode graphs' memory pool (fused steps' graphs share it)
        self.compiled: list[tuple[torch.nn.Module, object]] = []
        self._indices: dict[tuple[int, ...], torch.Tensor] = {}

    # ---- masks and the forward --------------------------------------------------------------
    def _mask(self, q_pos: torch.Tensor, span: int, key_valid: torch.Tensor | None, q_valid: torch.Tensor | None):
        """(B, 1, Tq, span) additive masks for queries at ``q_pos`` (B, Tq) over key positions 0..span-1."""
        k_pos = torch.arange(span, device=q_pos.device)
        allowed = k_pos[None, None, :] <= q_pos[:, :, None]
        if key_valid is not None:
            allowed = allowed & key_valid[:, None, :]
        if q_valid is not None:  # padded queries see key 0: a fully masked row would give NaN
            allowed = allowed | (~q_valid[:, :, None] & (k_pos == 0)[None, None, :])

        def additive(a):
            return torch.zeros(a.shape, dtype=self.dtype, device=a.device).masked_fill_(~a, self.neg)[:, None]

        if self.layer_types is None:
            return additive(allowed)
        sliding = allowed & (k_pos[None, None, :] > q_pos[:, :, None] - self.window)
        if q_valid is not None:
            sliding = sliding | (~q_valid[:, :, None] & (k_pos == 0)[None, None, :])
        return {t: additive(sliding if t == "sliding_attention" else allowed) for t in self.layer_types}

    def _forward(self, input_ids, position_ids, mask, cache) -> torch.Tensor:
        out = self.backbone(input_ids=input_ids, position_ids=position_ids, attention_mask=mask, use_cache=True,
                            **{self.cache_kw: cache})
        return out.last_hidden_state

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, d) final-normed hidden states -> (N, V) logits (with a family's post-processing, e.g. a soft-cap)."""
        return self.adapter.logits_from_normed(hidden)

    # ---- the pool ---------------------------------------------------------------------------
    def layer_shapes(self) -> list[LayerShape]:
        probe = ShapeProbe()
        ids = torch.zeros((1, 1), dtype=torch.long, device=self.device)
        pos = torch.zeros((1, 1), dtype=torch.long, device=self.device)
        with torch.inference_mode():
            self._forward(ids, pos, self._mask(pos, 1, None, None), probe)
        return [probe.shapes[i] for i in sorted(probe.shapes)]

    def attach(self, pool: KVPool) -> None:
        _register_decode_attention()  # decode steps need it, warmed up or not
        self.pool, self.cache = pool, SlotCache(pool)
        n = pool.n_slots
        self.tokens = torch.zeros(n, dtype=torch.long, device=self.device)
        self.positions = torch.zeros(n, dtype=torch.long, device=self.device)
        self.rows = torch.arange(n, device=self.device)
        self.batch_buckets = _pow2_buckets(1, n)
        self.span_buckets = _pow2_buckets(min(128, pool.slot_len), pool.slot_len)

    # ---- prefill ----------------------------------------------------------------------------
    def prefill(self, prompts: list[list[int]], slots: list[int]) -> torch.Tensor:
        """Run whole prompts (from position 0) into their slots; (B, V) logits of each last token."""
        T = max(len(p) for p in prompts)
        ids = torch.zeros((len(prompts), T), dtype=torch.long)
        valid = torch.zeros((len(prompts), T), dtype=torch.bool)
        for b, p in enumerate(prompts):
            ids[b, : len(p)] = torch.tensor(p)
            valid[b, : len(p)] = True
        ids, valid = to_device(ids, self.device), to_device(valid, self.device)
        pos = torch.arange(T, device=self.device).expand(len(prompts), T)
        slot_t = self.index(slots)
        hidden = self._forward(ids, pos, self._mask(pos, T, valid, valid), self.cache.for_prefill(slot_t))
        last = self.index([len(p) - 1 for p in prompts])
        return self.logits(hidden[torch.arange(len(prompts), device=self.device), last])

    # ---- decode -----------------------------------------------------------------------------
    @contextmanager
    def _decode_attention(self):
        cfg = self.model.config
        old = cfg._attn_implementation
        cfg._attn_implementation = DECODE_ATTENTION
        try:
            yield
        finally:
            cfg._attn_implementation = old

    def enable_compile(self) -> None:
        """Run decode steps through ``torch.compile`` of each block, the final norm and the rotary tables.

        Regional compilation: the blocks share one code path, so one compiled graph (per batch-size class)
        serves all of them; it fuses the norms, rotary, activation and residual adds that eager mode
        launches as dozens of small kernels per block. The KV write stays eager (a graph break), so the
        compiled graphs do not depend on the span. Only decode steps use it; prefill and embeddings run
        the model as it is.
        """
        mods = [*self.adapter.blocks, self.adapter.ln_final]
        mods += [m for m in self.backbone.children() if "Rotary" in type(m).__name__]
        self.compiled = [(m, torch.compile(m._call_impl, dynamic=True)) for m in mods]

    def compile_static(self) -> list[tuple[torch.nn.Module, object]]:
        """The modules of ``enable_compile`` compiled again for static shapes: each new input shape compiles
        anew (seconds each), and its kernels index tensors with constant strides (``bench_fused_step.py``
        times fused steps through them; the server does not use them)."""
        return [(m, torch.compile(m._call_impl, dynamic=False)) for m, _ in self.compiled]

    @contextmanager
    def _compiled_modules(self, compiled: list | None = None):
        """Run the modules through ``compiled`` (``enable_compile``'s by default) while inside."""
        compiled = self.compiled if compiled is None else compiled
        if not compiled:
            yield
            return
        import torch._dynamo
        import torch.fx.experimental._config as fx_config

        limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
        for mod, fn in compiled:
            mod._compiled_call_impl = fn
        # the KV write indexes the pool with the step's span: keep it out of the compiled graphs
        self.cache.update = torch.compiler.disable(SlotCache.update.__get__(self.cache))
        try:
            # block indices are ints on the modules: keep them symbolic, or each block would recompile
            with torch._dynamo.config.patch(allow_unspec_int_on_nn_module=True, **{limit: 64}), \
                    fx_config.patch(use_duck_shape=False):
                yield
        finally:
            for mod, _ in compiled:
                mod._compiled_call_impl = None
            del self.cache.update

    def _decode_eager(self, B: int, span: int) -> torch.Tensor:
        pos = self.positions[:B]
        mask = self._mask(pos[:, None], span, None, None)
        cache = self.cache.for_decode(self.rows[:B], pos, span)
        with self._decode_attention(), self._compiled_modules():
            hidden = self._forward(self.tokens[:B, None], pos[:, None], mask, cache)
        return self.logits(hidden[:, -1])

    @staticmethod
    def _bucket(n: int, buckets: list[int]) -> int:
        return next(b for b in buckets if b >= n)

    def index(self, values: list[int]) -> torch.Tensor:
        """``values`` as a long tensor on the device, queued without waiting for the GPU; the running rows'
        slots repeat step after step, so their index is kept (a few hundred at most)."""
        key = tuple(values)
        hit = self._indices.get(key)
        if hit is None:
            if len(self._indices) >= 512:
                self._indices.clear()
            hit = self._indices[key] = to_device(torch.tensor(values, dtype=torch.long), self.device)
        return hit

    def feed(self, slots: list[int], tokens: torch.Tensor, positions: list[int]) -> None:
        """Set the next decode input of ``slots``: (len(slots),) tokens on the device, and their positions."""
        idx = self.index(slots)
        self.tokens[idx] = tokens
        self.positions[idx] = to_device(torch.tensor(positions, dtype=torch.long), self.device)

    def advance(self, slots: list[int], tokens: torch.Tensor) -> None:
        """After a decode step: its chosen tokens are the next input of ``slots``, one position further."""
        idx = self.index(slots)
        self.tokens[idx] = tokens
        self.positions[idx] += 1

    def park(self, slots: list[int]) -> None:
        """Slots given back: position 0, so that a step covering them as idle rows writes inside the slot."""
        with torch.inference_mode():
            self.positions[self.index(slots)] = 0

    def step(self, B: int, span: int) -> torch.Tensor:
        """One decode step for slots 0..B-1 from the inputs on the device (``feed``/``advance``); idle slots
        in that range compute garbage into their own KV slot. ``span`` > every running row's position.
        Returns (B, V) logits."""
        if self.use_graphs:
            Bb, span = self._bucket(B, self.batch_buckets), self._bucket(span, self.span_buckets)
            graph, out = self.graphs[(Bb, span)]
            graph.replay()
            return out[:B]
        return self._decode_eager(B, span)

    def decode(self, tokens: list[int], positions: list[int]) -> torch.Tensor:
        """One token for rows 0..len(tokens)-1 (slot b at ``positions[b]``; idle rows: token 0 at 0).

        Returns (len(tokens), V) logits. With graphs, the batch and span are rounded up to buckets.
        """
        n = len(tokens)
        B = self._bucket(n, self.batch_buckets) if self.use_graphs else n
        pad = B - n
        self.tokens[:B].copy_(torch.tensor(tokens + [0] * pad), non_blocking=True)
        self.positions[:B].copy_(torch.tensor(positions + [0] * pad), non_blocking=True)
        return self.step(n, max(positions) + 1)

    def capture_graphs(self) -> int:
        """Capture every (batch bucket, span bucket) decode step; the pool must be idle. Returns the count."""
        self.positions.zero_()
        self.tokens.zero_()
        mempool = self.graph_pool = torch.cuda.graph_pool_handle()
        for B in reversed(self.batch_buckets):
            for span in reversed(self.span_buckets):
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    self._decode_eager(B, span)
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=mempool):
                    out = self._decode_eager(B, span)
                self.graphs[(B, span)] = (graph, out)
        torch.cuda.synchronize()
        self.use_graphs = True
        return len(self.graphs)
