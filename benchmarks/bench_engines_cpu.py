"""The built-in engine against the vLLM engine on a CPU, side by side through real HTTP.

Each engine runs as ``mcr-exit serve --engine {transformers,vllm}`` in a child process on the same model
(float32, the built-in SmolLM2-135M-Instruct by default; vLLM reads its one-time safetensors conversion),
driven over loopback by ``openai.AsyncOpenAI``: streamed greedy generation with 1 and 8 clients (tokens/s,
time to first token), embedding throughput at layer k (16 clients x 8 inputs), then the mixed load: 16
streams and 32 embedding clients for ``--mixed-seconds``, every request checked to finish.

Needs the vLLM environment (``bash scripts/vllm_env.sh``):

    bash scripts/vllm_env.sh run python benchmarks/bench_engines_cpu.py --output benchmarks/results/engines_cpu.md
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving_workloads import embed_throughput, stream_throughput  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def write_profile(path: Path, *, name: str, n_layers: int, hidden: int, k: int) -> Path:
    doc = {"schema": "mcr-exit/phase-profile", "schema_version": 1,
           "model": {"name": name, "source": "gguf", "location": name, "revision": None, "dtype": "float32",
                     "device": "cpu", "architecture": "llama", "model_type": "llama", "n_heads": 9,
                     "hidden_size": hidden},
           "n_layers": n_layers, "phases": {"compress_start": k - 8, "refine_start": k + 8, "found": True},
           "embedding_layer": k, "layers": [{"index": i} for i in range(n_layers + 1)], "mlflow_run_id": None}
    path.write_text(json.dumps(doc))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(engine: str, args, profile: Path, log: Path) -> tuple[subprocess.Popen, str, float]:
    port = free_port()
    cmd = [sys.executable, "-m", "mcr_exit", "serve", "--engine", engine, "--dtype", "float32", "--profile",
           str(profile), "--port", str(port), "--served-model-name", "m", "--max-input-tokens", "256",
           "--max-new-tokens", "256", "--max-running", "16", "--kv-cache-tokens" if engine == "transformers" else
           "--max-model-len", str(16 * 512) if engine == "transformers" else "512"]
    if args.model:
        cmd += ["--model", args.model]
    if engine == "vllm" and args.enforce_eager:
        cmd.append("--enforce-eager")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"{engine} server exited ({proc.returncode}); see {log}")
        try:
            with urllib.request.urlopen(base + "/health/ready", timeout=5) as r:
                if json.loads(r.read())["status"] == "ready":
                    break
        except OSError:
            pass
        time.sleep(1)
    return proc, base, time.perf_counter() - t0


async def mixed(client, prompts, inputs, *, seconds: float, streams: int, embedders: int) -> dict:
    """``streams`` streaming clients and ``embedders`` embedding clients in closed loops for ``seconds``."""
    stop = time.perf_counter() + seconds
    done = {"streams": 0, "stream_tokens": 0, "embeddings": 0}

    async def streamer(i):
        while time.perf_counter() < stop:
            r = await stream_throughput(client, [prompts[i % len(prompts)]], 32)
            done["streams"] += 1
            done["stream_tokens"] += r["tokens"]

    async def embedder(i):
        while time.perf_counter() < stop:
            resp = await client.embeddings.create(model="m", input=inputs[i % 8 * 4: i % 8 * 4 + 4])
            assert len(resp.data) == 4
            done["embeddings"] += 4

    t0 = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*[streamer(i) for i in range(streams)],
                                          *[embedder(i) for i in range(embedders)]), timeout=seconds + 300)
    wall = time.perf_counter() - t0
    return {**done, "wall_s": wall, "tok_s": done["stream_tokens"] / wall, "emb_s": done["embeddings"] / wall}


async def drive(base: str, args) -> dict:
    import openai

    rng = random.Random(0)
    prompts = [[rng.randrange(100, 40000) for _ in range(64)] for _ in range(16)]
    inputs = [[rng.randrange(100, 40000) for _ in range(rng.randrange(32, 96))] for _ in range(64)]
    client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=600)
    out = {}
    await stream_throughput(client, prompts[:1], 8)  # warm
    await embed_throughput(client, inputs, clients=2, per_request=8, rounds=1)
    out["gen1"] = await stream_throughput(client, prompts[:1], args.max_tokens)
    out["gen8"] = await stream_throughput(client, prompts[:8], args.max_tokens)
    out["emb"] = await embed_throughput(client, inputs, clients=16, per_request=8, rounds=2)
    out["mixed"] = await mixed(client, prompts, inputs, seconds=args.mixed_seconds, streams=16, embedders=32)
    await client.close()
    return out


def stop(proc: subprocess.Popen) -> float:
    t0 = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="default: the built-in SmolLM2-135M-Instruct")
    ap.add_argument("--layer", type=int, default=20)
    ap.add_argument("--n-layers", type=int, default=30)
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--mixed-seconds", type=float, default=30.0)
    ap.add_argument("--engines", default="transformers,vllm")
    ap.add_argument("--enforce-eager", action="store_true", help="vLLM without torch.compile")
    ap.add_argument("--workdir", default="/tmp/mcr-exit-bench-engines")
    ap.add_argument("--output", default=None)
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    name = Path(args.model).stem if args.model else "SmolLM2-135M-Instruct"
    profile = write_profile(work / "phase_profile.json", name=name, n_layers=args.n_layers, hidden=args.hidden,
                            k=args.layer)
    rows = {}
    for engine in args.engines.split(","):
        proc, base, startup = start(engine, args, profile, work / f"{engine}.log")
        try:
            res = asyncio.run(drive(base, args))
        finally:
            res_stop = stop(proc)
        rows[engine] = {**res, "startup_s": startup, "stop_s": res_stop}
        print(engine, json.dumps(rows[engine], default=float), flush=True)
    lines = [f"# Built-in engine vs vLLM engine on a CPU ({name}, float32, embeddings at hidden {args.layer})", "",
             f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared), "
             f"Python {platform.python_version()}; each server with OMP_NUM_THREADS=1"
             + ("; vLLM with --enforce-eager" if args.enforce_eager else "") + ".", "",
             "Command: `bash scripts/vllm_env.sh run python benchmarks/bench_engines_cpu.py "
             + " ".join(sys.argv[1:]) + "`", "",
             "| | " + " | ".join(rows) + " |", "| --- |" + " ---: |" * len(rows)]

    def row(label, fn):
        lines.append(f"| {label} | " + " | ".join(fn(r) for r in rows.values()) + " |")

    row("start-up to ready, s", lambda r: f"{r['startup_s']:.0f}")
    row(f"1 stream, tokens/s ({args.max_tokens} new tokens)", lambda r: f"{r['gen1']['tok_s']:.1f}")
    row("1 stream, time to first token, s", lambda r: f"{r['gen1']['ttft_p50_s']:.3f}")
    row("8 streams, tokens/s", lambda r: f"{r['gen8']['tok_s']:.1f}")
    row("8 streams, time to first token p50, s", lambda r: f"{r['gen8']['ttft_p50_s']:.3f}")
    row("embeddings/s (16 clients x 8 inputs of 32-96 tokens)", lambda r: f"{r['emb']['seq_s']:.1f}")
    row("embedding request p50 / p99, s", lambda r: f"{r['emb']['p50_s']:.2f} / {r['emb']['p99_s']:.2f}")
    row(f"mixed {args.mixed_seconds:g} s: 16 streams + 32 embedding clients, streams done / tokens/s",
        lambda r: f"{r['mixed']['streams']} / {r['mixed']['tok_s']:.1f}")
    row("mixed: embeddings done / embeddings/s", lambda r: f"{r['mixed']['embeddings']} / {r['mixed']['emb_s']:.1f}")
    row("mixed: wall time (all requests finished), s", lambda r: f"{r['mixed']['wall_s']:.1f}")
    row("SIGTERM to exit, s", lambda r: f"{r['stop_s']:.1f}")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.output:
        Path(args.output).write_text(text)


if __name__ == "__main__":
    main()
