"""Serving benchmark: the real HTTP server, driven by the official async OpenAI client, next to offline anchors.

In one run, for one model:
  1. offline anchors in this process: the truncated forward to hidden k (the embeddings' floor), transformers
     ``generate`` at batch 1, 16 and 64, the decode-step memory floor (weight bytes / measured copy bandwidth),
     and greedy tokens of ``generate`` for the correctness check;
  2. the server (``benchmarks/serving_models.py serve``: ``create_app`` + ``run_server``, as ``mcr-exit serve``)
     in a child process, driven over loopback HTTP by ``openai.AsyncOpenAI`` (base64 embeddings, its default):
     embedding throughput with 64 clients, streamed generation with 1 / 16 / 64 clients, single-embedding
     latency idle and under 64 streams, generation throughput under half the embedding capacity, the share of
     greedy tokens equal to ``generate``'s, and the time from SIGINT to exit with streams open.

    python benchmarks/bench_serving.py --config llama-3-8b --device cuda --output benchmarks/results/serving_gpu_h200.md
    python benchmarks/bench_serving.py --device cpu --output benchmarks/results/serving_cpu.md   # built-in SmolLM2
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from serving_models import DEFAULT_LAYER, load  # noqa: E402
from serving_report import report  # noqa: E402
from serving_workloads import (  # noqa: E402
    embed_latency,
    embed_throughput,
    greedy_texts,
    StreamClients,
    mixed_embed_latency,
    server_work,
    sigint_to_exit,
    streams_under_embedding_load,
)


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device, repeats: int = 3) -> float:
    fn()
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def offline_anchors(args, loaded, k: int, inputs: list[list[int]], prompts: list[list[int]]) -> dict:
    from mcr_exit.models.forward import hidden_at
    from mcr_exit.models.tokens import collate

    dev, out = loaded.input_device, {}
    with torch.inference_mode():
        B = min(64, len(inputs))
        ids, mask = collate(inputs[:B], 0, dev)
        out["truncated_seq_s"] = B / _timed(lambda: hidden_at(loaded.adapter, ids, mask, k), dev)
        vocab = int(loaded.model.get_input_embeddings().num_embeddings)
        long_ids = torch.randint(3, vocab, (B, 256), device=dev)
        out["truncated_seq_s_256"] = B / _timed(
            lambda: hidden_at(loaded.adapter, long_ids, torch.ones_like(long_ids), k), dev)
        gen = {}
        for batch in args.generate_batches:
            x = torch.tensor(prompts[:batch], device=dev)
            kw = dict(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=args.max_tokens,
                      min_new_tokens=args.max_tokens, do_sample=False, pad_token_id=0)
            seconds = _timed(lambda: loaded.model.generate(**kw), dev, repeats=1)
            gen[batch] = batch * args.max_tokens / seconds
        out["generate_tok_s"] = gen
        from mcr_exit.models.tokens import resolve_bos
        from mcr_exit.serving.engine import eos_ids_of

        eos = sorted(eos_ids_of(loaded.model, loaded.tokenizer)) or None
        bos = resolve_bos(loaded.tokenizer, "auto")  # the server prepends it to token-id prompts too
        refs = []
        for p in prompts[: args.check_prompts]:  # one at a time: no padding in the reference
            x = torch.tensor([[bos.token_id, *p] if bos.prepend else p], device=dev)
            ids = loaded.model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False,
                                        max_new_tokens=args.check_tokens, eos_token_id=eos,
                                        pad_token_id=0)[0, x.shape[1]:].tolist()
            refs.append(next((ids[:i] for i, t in enumerate(ids) if eos and t in eos), ids))
        out["reference_texts"] = [loaded.tokenizer.decode(r, skip_special_tokens=True) for r in refs]
        weight_bytes = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
        out["weight_bytes"] = weight_bytes
        if torch.device(dev).type == "cuda":
            buf = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
            dst = torch.empty_like(buf)
            seconds = _timed(lambda: dst.copy_(buf), dev, repeats=5)
            out["bandwidth"] = 2 * buf.numel() / seconds  # bytes read + written
            out["floor_ms"] = 1e3 * weight_bytes / out["bandwidth"]
            del buf, dst
    return out


async def engine_in_process(args, loaded, k: int, inputs, prompts) -> dict:
    """The same engine without HTTP: what the server adds on top of the engine is the difference."""
    from mcr_exit.serving import Engine, EngineConfig
    from mcr_exit.serving.jobs import GenerationRequest

    cfg = EngineConfig(max_input_tokens=args.max_input_tokens, max_new_tokens=args.max_new_tokens,
                       max_batch_tokens=args.max_batch_tokens, max_batch_size=args.max_batch_size,
                       kv_cache_tokens=64 * (args.max_input_tokens + args.max_new_tokens), max_queue=4096,
                       request_timeout_s=600, embed_cuda_graphs=args.embed_cuda_graphs,
                       fuse_embeddings=args.fuse_embeddings, fused_embed_tokens=args.fused_embed_tokens)
    engine = Engine(loaded, None, cfg, embedding_layer=k)
    await engine.astart()
    out = {}
    try:
        for n in args.stream_counts:
            reqs = [GenerationRequest(prompt_ids=p, max_tokens=args.max_tokens, temperature=0) for p in prompts[:n]]
            await engine.generate(GenerationRequest(prompt_ids=prompts[0], max_tokens=4, temperature=0))
            t0 = time.perf_counter()
            outs = await asyncio.gather(*(engine.generate(r) for r in reqs))
            out[f"gen_{n}"] = sum(o.completion_tokens for o in outs) / (time.perf_counter() - t0)
        chunks = [inputs[i:i + 8] for i in range(0, len(inputs), 8)]
        await asyncio.gather(*(engine.embed(c, layer=k) for c in chunks))  # untimed: as the server's first pass
        t0 = time.perf_counter()
        await asyncio.gather(*(engine.embed(c, layer=k) for c in chunks))
        out["embed_seq_s"] = len(inputs) / (time.perf_counter() - t0)
    finally:
        await engine.astop()
    return out


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, k: int, port: int) -> subprocess.Popen:
    cmd = [sys.executable, str(Path(__file__).with_name("serving_models.py")), "serve", "--port", str(port),
           "--layer", str(k), "--device", args.device, "--dtype", args.dtype,
           "--max-input-tokens", str(args.max_input_tokens), "--max-new-tokens", str(args.max_new_tokens)]
    cmd += ["--config", args.config] if args.config else (["--model", args.model] if args.model else [])
    if args.kv_cache_memory:
        cmd += ["--kv-cache-memory", str(args.kv_cache_memory)]
    cmd += ["--max-batch-tokens", str(args.max_batch_tokens), "--max-batch-size", str(args.max_batch_size)]
    cmd += ["--embed-cuda-graphs", args.embed_cuda_graphs, "--fuse-embeddings", args.fuse_embeddings,
            "--fused-embed-tokens", str(args.fused_embed_tokens)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if args.sample_stacks:
        env["MCR_EXIT_STACK_SAMPLES"] = args.sample_stacks
    if args.switch_interval_ms:
        env["MCR_EXIT_SWITCH_INTERVAL_MS"] = str(args.switch_interval_ms)
    return subprocess.Popen(cmd, stdout=sys.stderr, stderr=sys.stderr, env=env)


def with_server(args, k: int, work) -> tuple[dict, object]:
    """Start the server (``start_server``), wait until it is ready, run ``work(url, proc)`` (a coroutine) against
    it, and stop it. Returns (its /v1/models ``mcr_exit`` block, what ``work`` returned)."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(args, k, port)
    try:
        info = asyncio.run(wait_ready(url, proc, 600))
        return info, asyncio.run(work(url, proc))
    finally:
        if proc.poll() is None:
            proc.kill()


async def wait_ready(url: str, proc: subprocess.Popen, timeout: float) -> dict:
    import httpx

    t0 = time.monotonic()
    async with httpx.AsyncClient() as c:
        while time.monotonic() - t0 < timeout:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with {proc.returncode}")
            try:
                if (await c.get(url + "/health/ready")).status_code == 200:
                    return (await c.get(url + "/v1/models")).json()["data"][0]["mcr_exit"]
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.5)
    raise RuntimeError("the server did not get ready")


async def drive(args, url: str, inputs, prompts, proc) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="bench", max_retries=0, timeout=600)
    res = {}
    await embed_throughput(client, inputs[:64], clients=8, per_request=8, rounds=1)  # warm the path
    phases = res["phases"] = {}
    work = res["work"] = {"start": await server_work(url)}
    # 64 closed-loop embedding clients, spread over the client processes like the streams: one process sending
    # a few hundred requests a second and decoding their responses used most of a core itself
    clients = StreamClients(url, args.client_procs)
    try:
        await clients.embed(inputs[:64], clients=8, per_request=8, rounds=1)  # warm the clients' path
        # One pass of the workload first, timed on its own: batch shapes the server meets for the first time
        # (graph captures, allocator growth) fall in it, as the offline anchor's warm-up call is not timed either.
        for key, phase, rounds in (("embed_first", "embeddings, 64 clients, first pass", 1),
                                   ("embed", "embeddings, 64 clients", args.embed_rounds)):
            s0, t = _cpu_seconds(proc.pid), time.time()
            res[key] = await clients.embed(inputs, clients=64, per_request=8, rounds=rounds)
            res[key]["server_cpu"] = (_cpu_seconds(proc.pid) - s0) / (time.time() - t)
            phases[phase] = (t, time.time())
            work[phase] = await server_work(url)
        res["embed_idle"] = await embed_latency(client, inputs, n=args.latency_n)
        work["single embeddings, idle"] = await server_work(url)
        res["gen"] = {}
        await clients.run(prompts[:8], 8)  # warm the path
        for n in args.stream_counts:
            s0, t0 = _cpu_seconds(proc.pid), time.time()
            res["gen"][n] = await clients.run(prompts[:n], args.max_tokens)
            res["gen"][n]["server_cpu"] = (_cpu_seconds(proc.pid) - s0) / (time.time() - t0)
            phases[f"{n} streams"] = (t0, time.time())
            work[f"{n} streams"] = await server_work(url)
        most = max(args.stream_counts)
        t0 = time.time()  # the same burst again: its first time may pay one-time costs of the server
        res["gen_again"] = await clients.run(prompts[:most], args.max_tokens)
        phases[f"{most} streams again"] = (t0, time.time())
        work[f"{most} streams again"] = await server_work(url)
        res["mixed_latency"] = await mixed_embed_latency(client, clients, inputs, prompts[:most], args.latency_n,
                                                         max_tokens=args.max_new_tokens,
                                                         settle_s=2 * res["gen"][most]["ttft_max_s"])
        work["single embeddings beside streams"] = await server_work(url)
        # twice, as the burst alone: the first time, step shapes met for the first time (fused steps' graphs)
        # are captured inside it
        for key, phase in (("gen_under_embed_first", "streams under embedding load"),
                           ("gen_under_embed", "streams under embedding load again")):
            t = time.time()
            res[key] = await streams_under_embedding_load(client, clients, prompts[:most], args.max_tokens,
                                                          inputs, rate=0.5 * res["embed"]["seq_s"])
            phases[phase] = (t, time.time())
            work[phase] = await server_work(url)
        res["greedy"] = await greedy_texts(client, prompts[: args.check_prompts], args.check_tokens)
        # shutdown with streams open
        streams = asyncio.ensure_future(clients.run(prompts[:most], args.max_new_tokens, tolerate=True))
        await asyncio.sleep(1.3)
        res["shutdown_s"] = await sigint_to_exit(proc)
        await asyncio.wait_for(streams, 30)
    finally:
        clients.close()
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="Hub id, folder or .gguf; default: the built-in SmolLM2.")
    p.add_argument("--config", default=None, help="Random weights of these shapes (serving_models.CONFIGS).")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--layer", type=int, default=None, help="Hidden index k (default: 20 for SmolLM2 shapes).")
    p.add_argument("--n-inputs", type=int, default=512)
    p.add_argument("--input-len", type=int, default=150)
    p.add_argument("--embed-rounds", type=int, default=4, help="Requests per embedding client.")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--stream-counts", default="1,16,64")
    p.add_argument("--generate-batches", default="1,16,64")
    p.add_argument("--latency-n", type=int, default=100)
    p.add_argument("--check-prompts", type=int, default=16)
    p.add_argument("--check-tokens", type=int, default=64)
    p.add_argument("--max-input-tokens", type=int, default=512)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--kv-cache-memory", type=float, default=None)
    p.add_argument("--max-batch-tokens", type=int, default=16384)
    p.add_argument("--max-batch-size", type=int, default=128)
    p.add_argument("--embed-cuda-graphs", choices=("auto", "on", "off"), default="auto",
                   help="the server's embedding CUDA graphs (EngineConfig.embed_cuda_graphs)")
    p.add_argument("--fuse-embeddings", choices=("auto", "on", "off"), default="auto",
                   help="decode steps that carry embedding inputs (EngineConfig.fuse_embeddings)")
    p.add_argument("--fused-embed-tokens", type=int, default=1024,
                   help="packed embedding tokens a fused step carries at most (EngineConfig.fused_embed_tokens)")
    p.add_argument("--no-engine", action="store_true", help="Skip the in-process engine rows.")
    p.add_argument("--client-procs", type=int, default=4, help="Client processes the streams and the embedding clients are spread over.")
    p.add_argument("--output", default=None)
    p.add_argument("--sample-stacks", default=None,
                   help="Sample the server's thread stacks into this JSON file and print where each phase's time went.")
    p.add_argument("--switch-interval-ms", type=float, default=None, help="sys.setswitchinterval of the server.")
    args = p.parse_args()
    args.stream_counts = [int(x) for x in args.stream_counts.split(",")]
    args.generate_batches = [int(x) for x in args.generate_batches.split(",")]

    loaded = load(args.config, args.model, args.device, args.dtype)
    L = loaded.n_layers
    k = args.layer if args.layer is not None else DEFAULT_LAYER.get(args.config or "smollm2-135m", round(2 * L / 3))
    vocab = int(loaded.model.get_input_embeddings().num_embeddings)
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randint(3, vocab, (args.input_len + int(torch.randint(-20, 21, (1,), generator=g)),),
                            generator=g).tolist() for _ in range(args.n_inputs)]
    prompts = [torch.randint(3, vocab, (args.prompt_len,), generator=g).tolist() for _ in range(64)]
    anchors = offline_anchors(args, loaded, k, inputs, prompts)
    anchors["engine"] = ({} if args.no_engine else asyncio.run(engine_in_process(args, loaded, k, inputs, prompts)))
    meta = SimpleNamespace(spec=loaded.spec, n_layers=L)
    del loaded  # the server process loads its own copy
    gc.collect()
    if torch.device(args.device).type == "cuda":
        torch.cuda.empty_cache()
    info, res = with_server(args, k, lambda url, proc: drive(args, url, inputs, prompts, proc))
    text = report(args, meta, k, anchors, res, info, sum(map(len, inputs)) / len(inputs))
    print(text)
    if args.sample_stacks:
        from stack_sampler import summarize

        for name, (t0, t1) in res["phases"].items():
            print(f"\nserver threads during '{name}' ({t1 - t0:.1f} s):\n{summarize(args.sample_stacks, t0, t1)}",
                  file=sys.stderr)
    if args.output:
        Path(args.output).write_text(text)


if __name__ == "__main__":
    main()
