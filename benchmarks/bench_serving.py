"""Serving benchmark (engine level, no HTTP): embedding throughput at layer k vs full depth, generation tokens/s.

Runs the same Engine the server uses (worker thread, token-budget batching, the one early-exit path),
fed by concurrent asyncio clients, so it needs neither fastapi/uvicorn nor mlflow.

    python benchmarks/bench_serving.py                              # built-in SmolLM2 on CPU
    python benchmarks/bench_serving.py --device cuda --config llama-3-8b   # random bf16 weights, 8B shapes

Prints a markdown table (and writes it with --output).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mcr_exit.models import from_objects, load_model  # noqa: E402
from mcr_exit.serving import Engine, EngineConfig  # noqa: E402
from mcr_exit.serving.generation import GenerationRequest  # noqa: E402

# Shapes of public checkpoints (random weights: the GPU box has no model files).
CONFIGS = {
    "smollm2-135m": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         intermediate_size=1536, vocab_size=49152),
    "llama-3.2-1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                         intermediate_size=8192, vocab_size=128256),
    "llama-3-8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       intermediate_size=14336, vocab_size=128256),
}


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
        return " ".join(map(str, ids))

    def convert_ids_to_tokens(self, i):
        return str(i)


def build_random(name: str, device: str, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**CONFIGS[name], max_position_embeddings=8192, eos_token_id=None, bos_token_id=None,
                      pad_token_id=0, attn_implementation="sdpa")
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    model.generation_config.eos_token_id = None
    return from_objects(model, IdTokenizer(cfg.vocab_size), name=f"random-{name}")


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


async def embed_throughput(engine, inputs, layer, per_request: int, device: str) -> float:
    """Sequences per second: all inputs sent at once as concurrent requests of ``per_request`` inputs."""
    chunks = [inputs[i: i + per_request] for i in range(0, len(inputs), per_request)]
    _sync(device)
    t0 = time.perf_counter()
    await asyncio.gather(*(engine.embed(c, layer=layer) for c in chunks))
    _sync(device)
    return len(inputs) / (time.perf_counter() - t0)


async def gen_throughput(engine, prompts, max_tokens: int, device: str) -> tuple[float, int]:
    """Completion tokens per second for len(prompts) concurrent greedy requests."""
    _sync(device)
    t0 = time.perf_counter()
    outs = await asyncio.gather(*(engine.generate(GenerationRequest(prompt_ids=p, max_tokens=max_tokens,
                                                                     temperature=0.0)) for p in prompts))
    _sync(device)
    n = sum(o.completion_tokens for o in outs)
    return n / (time.perf_counter() - t0), n


async def run(args) -> str:
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}[args.dtype] \
        if args.dtype != "auto" else (torch.float32 if args.device == "cpu" else torch.bfloat16)
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    t_load = time.perf_counter()
    if args.config:
        loaded = build_random(args.config, args.device, dtype)
    else:
        loaded = load_model(args.model, dtype=str(dtype).removeprefix("torch."), device=args.device)
    t_load = time.perf_counter() - t_load
    L = loaded.n_layers
    if args.layer is not None:
        k = args.layer
    elif args.profile:
        from mcr_exit.analysis.profile import read_profile

        k = int(read_profile(args.profile)["embedding_layer"])
    else:
        k = max(1, round(2 * L / 3))  # SmolLM2's profile gives hidden 20 of 30 (compress-phase midpoint)
    engine = Engine(loaded, None, EngineConfig(max_batch_tokens=args.batch_tokens, max_batch_size=256,
                                               max_gen_batch=args.gen_batch, max_queue=100_000,
                                               max_input_tokens=args.seq_len + 1, max_new_tokens=args.max_tokens,
                                               request_timeout_s=3600), embedding_layer=k)
    await engine.astart()
    g = torch.Generator().manual_seed(0)
    vocab = engine.vocab_size
    inputs = [torch.randint(3, vocab, (args.seq_len,), generator=g).tolist() for _ in range(args.n_inputs)]
    inputs = engine.encode_token_ids(inputs)
    runs: dict[int, list[float]] = {k: [], L: []}
    for layer in (k, L):
        await embed_throughput(engine, inputs[: args.per_request * 2], layer, args.per_request, args.device)
    for _ in range(args.repeats):  # interleaved, so drifting load on a shared machine hits both alike
        for layer in (k, L):
            runs[layer].append(await embed_throughput(engine, inputs, layer, args.per_request, args.device))
    rows = [(layer, statistics.median(runs[layer])) for layer in (k, L)]
    prompts = [torch.randint(3, vocab, (args.prompt_len,), generator=g).tolist() for _ in range(args.gen_batch)]
    await gen_throughput(engine, prompts, 2, args.device)
    singles, batches = [], []
    for _ in range(args.repeats):  # interleaved like the embeddings
        singles.append((await gen_throughput(engine, prompts[:1], args.max_tokens, args.device))[0])
        batches.append(await gen_throughput(engine, prompts, args.max_tokens, args.device))
    single = statistics.median(singles)
    batched, n_tok = statistics.median(b[0] for b in batches), batches[0][1]
    await engine.astop()

    dev = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else (platform.processor() or
                                                                                  platform.machine())
    model_name = loaded.spec.name
    lines = [
        f"# Serving benchmark: {model_name} on {args.device} ({dev}), {str(dtype).removeprefix('torch.')}",
        "",
        f"- command: `python benchmarks/bench_serving.py {' '.join(sys.argv[1:])}`",
        f"- torch {torch.__version__}, {torch.get_num_threads()} CPU threads, Python {platform.python_version()}; "
        f"model build/load {t_load:.1f} s; {L} blocks; 1-min load average {load_before:.1f} before, "
        f"{os.getloadavg()[0] if hasattr(os, 'getloadavg') else float('nan'):.1f} after (shared machines are noisy)",
        f"- embeddings: {args.n_inputs} inputs of {args.seq_len} random token ids (+BOS if the tokenizer has one), "
        f"{args.per_request} inputs per request, all requests concurrent; token budget {args.batch_tokens} per "
        f"forward; median of {args.repeats}",
        f"- generation: prompts of {args.prompt_len} tokens, up to {args.max_tokens} new tokens, greedy, "
        f"transformers generate, the batch's requests sent concurrently; median of {args.repeats}",
        "",
        "| workload | hidden index | blocks run | sequences/s | tokens/s | speed-up vs full depth |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    full = rows[1][1]
    for layer, sps in rows:
        label = "embeddings at profile layer k" if layer == k else "embeddings at full depth L"
        lines.append(f"| {label} | {layer} | {layer} | {sps:.1f} | {sps * len(inputs[0]):.0f} | {sps / full:.2f}x |")
    lines += [
        "",
        "| generation | requests | completion tokens | tokens/s |",
        "| --- | ---: | ---: | ---: |",
        f"| single stream | 1 | {args.max_tokens} | {single:.1f} |",
        f"| batched | {args.gen_batch} | {n_tok} | {batched:.1f} |",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="Hub id, folder or .gguf; default: built-in SmolLM2.")
    p.add_argument("--config", choices=sorted(CONFIGS), default=None, help="Random weights with these shapes.")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--layer", type=int, default=None, help="Hidden index k; default: --profile's, else round(2L/3).")
    p.add_argument("--profile", default=None, help="A phase_profile.json file whose embedding_layer is k.")
    p.add_argument("--n-inputs", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--per-request", type=int, default=8)
    p.add_argument("--batch-tokens", type=int, default=8192)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--gen-batch", type=int, default=8)
    p.add_argument("--output", default=None, help="Also write the markdown here.")
    args = p.parse_args()
    report = asyncio.run(run(args))
    print(report)
    if args.output:
        Path(args.output).write_text(report)


if __name__ == "__main__":
    main()
