"""The KV cache: one preallocated pool of slots, and the cache object transformers' attention writes into.

Layout per layer: K and V of shape (n_slots, kv_heads, slot_len, head_dim). A generation request holds
one slot from prefill to its last token; position p of its sequence lives at index p of its slot.
Free slots are handed out lowest first, so the running rows stay packed at the front and a decode
step runs over slots 0..B-1 without gathering.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch

from mcr_exit.errors import ConfigError


@dataclass(frozen=True)
class LayerShape:
    kv_heads: int
    head_dim: int


class KVPool:
    def __init__(self, shapes: list[LayerShape], *, n_slots: int, slot_len: int, dtype: torch.dtype,
                 device: torch.device):
        if n_slots < 1 or slot_len < 2:
            raise ConfigError(f"the KV cache needs at least one slot of 2 tokens, got {n_slots} x {slot_len}")
        self.n_slots, self.slot_len, self.dtype, self.device = n_slots, slot_len, dtype, device
        self.k = [torch.zeros(n_slots, s.kv_heads, slot_len, s.head_dim, dtype=dtype, device=device) for s in shapes]
        self.v = [torch.zeros_like(k) for k in self.k]
        self._free = list(range(n_slots))
        heapq.heapify(self._free)

    @staticmethod
    def bytes_per_token(shapes: list[LayerShape], dtype: torch.dtype) -> int:
        item = torch.empty((), dtype=dtype).element_size()
        return sum(2 * s.kv_heads * s.head_dim * item for s in shapes)

    @property
    def n_free(self) -> int:
        return len(self._free)

    @property
    def n_used(self) -> int:
        return self.n_slots - len(self._free)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))

    def alloc(self) -> int | None:
        """The lowest free slot, or None when the pool is full."""
        return heapq.heappop(self._free) if self._free else None

    def release(self, slot: int) -> None:
        heapq.heappush(self._free, slot)


class SlotCache:
    """What a transformers attention layer sees as its cache (``update(key, value, layer_idx, ...)``).

    prefill: the batch's rows are prompts starting at position 0, written to ``slots``; attention runs
    over the prompt's own keys. decode: row b is slot b at position ``positions[b]``; attention runs
    over the first ``span`` positions of each slot (the mask hides what lies beyond a row's position).
    """

    def __init__(self, pool: KVPool):
        self.pool = pool
        self.slots: torch.Tensor | None = None
        self.rows: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None
        self.span = 0

    def for_prefill(self, slots: torch.Tensor) -> SlotCache:
        self.slots, self.rows = slots, None
        return self

    def for_decode(self, rows: torch.Tensor, positions: torch.Tensor, span: int) -> SlotCache:
        self.slots, self.rows, self.positions, self.span = None, rows, positions, span
        return self

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        K, V = self.pool.k[layer_idx], self.pool.v[layer_idx]
        if self.rows is None:  # prefill: (B, H, T, D) at positions 0..T-1 of each row's slot
            T = key.shape[2]
            K[self.slots, :, :T] = key
            V[self.slots, :, :T] = value
            return key, value
        B = key.shape[0]
        K[self.rows, :, self.positions] = key[:, :, 0]
        V[self.rows, :, self.positions] = value[:, :, 0]
        return K[:B, :, : self.span], V[:B, :, : self.span]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # positions are always passed explicitly


class ShapeProbe:
    """A cache that records each layer's key shape during one forward (to size the pool)."""

    def __init__(self):
        self.shapes: dict[int, LayerShape] = {}

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        self.shapes[layer_idx] = LayerShape(kv_heads=key.shape[1], head_dim=key.shape[3])
        return key, value

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0
