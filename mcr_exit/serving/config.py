"""The engine's settings (the server's flags) and its results, shared by the built-in and the vLLM engine."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mcr_exit.errors import ConfigError
from mcr_exit.metrics.massive import MASSIVE_RATIO
from mcr_exit.metrics.pooling import DEFAULT_POOLING, POOLING_ALIASES, POOLINGS


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    max_queue: int = 128  # generation requests waiting for a KV slot; one more is answered 429
    max_queue_tokens: int = 1 << 20  # embedding input tokens waiting; a request that would pass it gets 429
    max_batch_tokens: int = 8192  # padded tokens per embedding forward and per prefill
    max_batch_size: int = 64  # inputs per embedding forward
    max_running: int = 64  # sequences generating at once (at most one KV slot each)
    kv_cache_tokens: int | None = None  # KV pool size in tokens ...
    kv_cache_memory: float | None = None  # ... or as a fraction of the GPU's memory (default 0.9 on a GPU)
    max_inputs: int = 256  # inputs per embedding request
    max_prompts: int = 16  # prompts per completions request, at most max_queue (each takes a queue place)
    max_request_tokens: int = 65536  # input tokens per embedding request, all inputs together
    max_input_tokens: int = 2048  # tokens per input or prompt (BOS included)
    max_new_tokens: int = 1024  # cap on a request's max_tokens
    max_layer: int | None = None  # highest hidden index a request may ask for; None = L
    request_timeout_s: float = 120.0  # an embedding request, in total
    stall_timeout_s: float = 60.0  # a generation request without a new token for this long: 504
    queue_timeout_s: float = 30.0  # a generation request waiting this long for a KV slot: 429
    embed_batch_wait_s: float = 0.01  # while sequences generate, a non-full embedding batch waits this long
    pooling: str = DEFAULT_POOLING
    normalize: bool = True
    massive_ratio: float = MASSIVE_RATIO  # mean_no_massive's rule; the profile's massive_activations.rule wins
    warmup: bool = True  # warm forwards, and CUDA graphs of the decode steps on a GPU
    cuda_graphs: bool = True
    embed_cuda_graphs: str = "auto"  # embedding batches from CUDA graphs: auto, on, off (serving/embed_graphs.py)
    compile: bool = True  # on a GPU, compile the blocks of the captured decode steps (torch.compile)
    fuse_embeddings: str = "auto"  # decode steps carry waiting embedding inputs: auto (GPU graphs), on, off
    fused_embed_tokens: int = 1024  # embedding tokens one decode step may carry (fused_step.py)

    def __post_init__(self):
        if POOLING_ALIASES.get(self.pooling, self.pooling) not in POOLINGS:
            raise ConfigError(f"--pooling must be one of {', '.join(POOLINGS)}, got {self.pooling!r}")
        for name in ("max_queue", "max_queue_tokens", "max_batch_tokens", "max_batch_size", "max_running",
                     "max_inputs", "max_prompts", "max_request_tokens", "max_input_tokens", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.kv_cache_tokens is not None and self.kv_cache_memory is not None:
            raise ConfigError("give --kv-cache-tokens or --kv-cache-memory, not both")
        if self.kv_cache_memory is not None and not 0 < self.kv_cache_memory <= 1:
            raise ConfigError(f"--kv-cache-memory must be a fraction in (0, 1], got {self.kv_cache_memory}")
        for name in ("request_timeout_s", "stall_timeout_s", "queue_timeout_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.fuse_embeddings not in ("auto", "on", "off"):
            raise ConfigError(f"--fuse-embeddings must be auto, on or off, got {self.fuse_embeddings!r}")
        if self.fused_embed_tokens < 1:
            raise ConfigError(f"--fused-embed-tokens must be at least 1, got {self.fused_embed_tokens}")
        if self.embed_cuda_graphs not in ("auto", "on", "off"):
            raise ConfigError(f"--embed-cuda-graphs must be auto, on or off, got {self.embed_cuda_graphs!r}")
        if not 0 <= self.embed_batch_wait_s <= 1:
            raise ConfigError(f"--embed-batch-wait must be within 0..1000 ms, got {self.embed_batch_wait_s * 1e3:g} ms")


@dataclass(frozen=True, kw_only=True)
class EmbeddingResult:
    vectors: np.ndarray  # (N, d) float32
    layer: int
    prompt_tokens: int



def served_layers(n_layers: int, config: EngineConfig, profile, embedding_layer: int | None) -> tuple[int, int]:
    """(embedding layer k, highest layer a request may ask for): k from the argument, else the profile,
    else the last hidden index; both within hidden 0..L and k <= the maximum."""
    L = n_layers
    k = embedding_layer if embedding_layer is not None else (profile.embedding_layer if profile else L)
    top = L if config.max_layer is None else config.max_layer
    if not 0 <= k <= L or not 0 <= top <= L:
        raise ConfigError(f"embedding layer {k} / max layer {top} outside hidden 0..{L}")
    if k > top:
        raise ConfigError(f"--max-layer {top} is below the embedding layer {k}")
    return k, top
