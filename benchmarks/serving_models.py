"""Models for the serving benchmark: random weights of real shapes, or a real model, plus the server entry.

    python benchmarks/serving_models.py serve --config llama-3-8b --device cuda --port 8011 [engine flags]

runs the real mcr-exit HTTP server (``create_app`` + ``run_server``, as ``mcr-exit serve`` does) on a
random-weight model, so the benchmark can drive it from another process like any client would.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Shapes of public checkpoints (random weights: speed does not depend on the values).
CONFIGS = {
    "smollm2-135m": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True),
    "llama-3.2-1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                         intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True),
    "llama-3-8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       intermediate_size=14336, vocab_size=128256),
    # A model that costs (almost) nothing: what is left is the server's own work per request and token.
    "host-overhead": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          intermediate_size=128, vocab_size=4096),
}
# The embedding layer k of each shape: SmolLM2's profile gives hidden 20 of 30; 2L/3 elsewhere.
DEFAULT_LAYER = {"smollm2-135m": 20, "llama-3.2-1b": 11, "llama-3-8b": 21, "host-overhead": 1}


class IdTokenizer:
    """Stands in for a tokenizer on a random-weight model: inputs are token ids, no BOS, no EOS."""

    bos_token = bos_token_id = eos_token_id = unk_token_id = chat_template = None
    pad_token_id = 0

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def __call__(self, text, add_special_tokens=True):
        return type("Enc", (), {"input_ids": [hash(w) % self.vocab_size for w in text.split()]})()

    def __len__(self):
        return self.vocab_size

    def decode(self, ids, skip_special_tokens=True):
        return "".join(f" {i}" for i in ids)

    def convert_ids_to_tokens(self, i):
        return str(i)


def build_random(name: str, device: str, dtype: torch.dtype, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    from mcr_exit.models import from_objects

    cfg = LlamaConfig(**CONFIGS[name], max_position_embeddings=8192, eos_token_id=None, bos_token_id=None,
                      pad_token_id=0, attn_implementation="sdpa")
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    model.generation_config.eos_token_id = None
    return from_objects(model, IdTokenizer(cfg.vocab_size), name=f"random-{name}")


def load(config: str | None, model: str | None, device: str, dtype: str):
    from mcr_exit.models import load_model
    from mcr_exit.models.loading import resolve_dtype

    if config:
        return build_random(config, device, resolve_dtype(dtype, device))
    return load_model(model, dtype=dtype, device=device)


def serve(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="serving_models.py serve")
    p.add_argument("--config", choices=sorted(CONFIGS))
    p.add_argument("--model", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--layer", type=int, required=True)
    p.add_argument("--max-input-tokens", type=int, default=512)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--max-batch-tokens", type=int, default=16384)
    p.add_argument("--max-batch-size", type=int, default=128)
    p.add_argument("--max-running", type=int, default=64)
    p.add_argument("--kv-cache-memory", type=float, default=None)
    p.add_argument("--kv-cache-tokens", type=int, default=None)
    p.add_argument("--no-cuda-graphs", action="store_true")
    p.add_argument("--embed-cuda-graphs", choices=("auto", "on", "off"), default="auto")
    p.add_argument("--fuse-embeddings", choices=("auto", "on", "off"), default="auto")
    p.add_argument("--fused-embed-tokens", type=int, default=1024)
    a = p.parse_args(argv)
    from stack_sampler import start_from_env

    start_from_env()  # MCR_EXIT_STACK_SAMPLES: where the server's threads spend their time (a diagnostic)
    from mcr_exit.cli.serve import run_server
    from mcr_exit.serving import Engine, EngineConfig
    from mcr_exit.serving.app import create_app

    loaded = load(a.config, a.model, a.device, a.dtype)
    cfg = EngineConfig(max_input_tokens=a.max_input_tokens, max_new_tokens=a.max_new_tokens,
                       max_batch_tokens=a.max_batch_tokens, max_batch_size=a.max_batch_size,
                       max_running=a.max_running, kv_cache_memory=a.kv_cache_memory,
                       kv_cache_tokens=a.kv_cache_tokens, max_queue=4096,
                       max_inputs=256, cuda_graphs=not a.no_cuda_graphs, request_timeout_s=600,
                       embed_cuda_graphs=a.embed_cuda_graphs, fuse_embeddings=a.fuse_embeddings,
                       fused_embed_tokens=a.fused_embed_tokens, max_queue_tokens=1 << 24)
    engine = Engine(loaded, None, cfg, embedding_layer=a.layer)
    run_server(create_app(engine, max_body_bytes=64 << 20, served_model_names=("m",)), engine, host="127.0.0.1",
               port=a.port, log_level="warning",
               **({"switch_interval_s": float(os.environ["MCR_EXIT_SWITCH_INTERVAL_MS"]) / 1e3}
                  if os.environ.get("MCR_EXIT_SWITCH_INTERVAL_MS") else {}))


if __name__ == "__main__":
    if sys.argv[1:2] != ["serve"]:
        sys.exit("usage: python benchmarks/serving_models.py serve --config NAME --port N --layer K ...")
    serve(sys.argv[2:])
