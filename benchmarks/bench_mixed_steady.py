"""Generation under embedding load in a steady window: one server, 64 streams alone, then the same streams
while embeddings arrive at a fixed rate, each twice, with longer streams than ``bench_serving.py``'s
(384 new tokens by default), so that the ramp of a burst weighs less. Prints the tokens/s of each burst,
the embeddings served while the streams ran, and the server's work per burst from its ``/metrics``.

    python benchmarks/bench_mixed_steady.py --config llama-3-8b --fused-embed-tokens 256 --rate 154
    python benchmarks/bench_mixed_steady.py --config smollm2-135m --rate 1000 --profile-dir /tmp/prof

``--profile-dir`` records the server with ``py-spy record --gil`` (if installed) over the second burst of
each kind: where the thread holding the interpreter lock spends its time.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_serving import with_server  # noqa: E402
from serving_models import CONFIGS, DEFAULT_LAYER  # noqa: E402
from serving_workloads import StreamClients, server_work, streams_under_embedding_load, work_table  # noqa: E402


def _spy(pid: int, path: Path, seconds: int):
    exe = shutil.which("py-spy")
    if exe is None:
        return None
    return subprocess.Popen([exe, "record", "-p", str(pid), "-d", str(seconds), "-r", "250", "--gil", "-f", "raw",
                             "--nonblocking", "-o", str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def drive(a, url: str, proc, prompts, inputs) -> list[str]:
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="bench", max_retries=0, timeout=600)
    await asyncio.gather(*(client.embeddings.create(model="m", input=inputs[i:i + 8]) for i in range(0, 512, 8)))
    clients = StreamClients(url, a.client_procs)
    lines, work = [], {"start": await server_work(url)}
    try:
        await clients.run(prompts[:8], 8)  # warm the path
        for kind in ("alone", "under embeddings"):
            for i in range(2):
                spy = _spy(proc.pid, Path(a.profile_dir) / f"{a.config}_{kind.replace(' ', '_')}.txt", 3) \
                    if a.profile_dir and i else None
                if kind == "alone":
                    r = await clients.run(prompts, a.max_tokens)
                    lines.append(f"| 64 streams alone, burst {i + 1} | {r['tok_s']:.0f} | - | - |")
                else:
                    r = await streams_under_embedding_load(client, clients, prompts, a.max_tokens, inputs, rate=a.rate)
                    lines.append(f"| 64 streams, embeddings offered at {a.rate:.0f} seq/s, burst {i + 1} | "
                                 f"{r['tok_s']:.0f} | {r['embedding_seq_s_served']:.0f} | "
                                 f"{r['embedding_p50_s'] * 1e3:.0f} / {r['embedding_p99_s'] * 1e3:.0f} ms |")
                work[f"{kind}, burst {i + 1}"] = await server_work(url)
                if spy is not None:
                    spy.wait()
    finally:
        clients.close()
    return ["| burst | tokens/s | embeddings served while the streams ran, seq/s | their p50 / p99 |",
            "| --- | ---: | ---: | ---: |", *lines, "", *work_table(work)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=sorted(CONFIGS), default="smollm2-135m")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--rate", type=float, required=True, help="Embedding sequences/s offered (8 inputs a request).")
    p.add_argument("--max-tokens", type=int, default=384, help="New tokens per stream.")
    p.add_argument("--fuse-embeddings", choices=("auto", "on", "off"), default="auto")
    p.add_argument("--fused-embed-tokens", type=int, default=1024)
    p.add_argument("--client-procs", type=int, default=4)
    p.add_argument("--profile-dir", default=None)
    p.add_argument("--output", default=None)
    a = p.parse_args()
    vocab = CONFIGS[a.config]["vocab_size"]
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, vocab, (128,), generator=g).tolist() for _ in range(64)]
    inputs = [torch.randint(3, vocab, (150,), generator=g).tolist() for _ in range(2048)]
    server = SimpleNamespace(config=a.config, model=None, device=a.device, dtype=a.dtype, max_input_tokens=512,
                             max_new_tokens=max(1024, a.max_tokens), kv_cache_memory=None, max_batch_tokens=16384,
                             max_batch_size=128, embed_cuda_graphs="auto", fuse_embeddings=a.fuse_embeddings,
                             fused_embed_tokens=a.fused_embed_tokens, sample_stacks=None, switch_interval_ms=None)
    if a.profile_dir:
        Path(a.profile_dir).mkdir(parents=True, exist_ok=True)
    info, rows = with_server(server, DEFAULT_LAYER[a.config], lambda url, proc: drive(a, url, proc, prompts, inputs))
    text = "\n".join([f"## 64 streams under embeddings, steady: random-{a.config} on {a.device}, {a.dtype}", "",
                      f"- command: `python benchmarks/bench_mixed_steady.py {' '.join(sys.argv[1:])}`",
                      f"- torch {torch.__version__}; prompts of 128 tokens, {a.max_tokens} new tokens, greedy, "
                      f"streamed from {a.client_procs} client processes; embeddings of 150 tokens, 8 a request; "
                      f"engine start-up {info['startup']}", "", *rows])
    print(text)
    if a.output:
        Path(a.output).write_text(text)


if __name__ == "__main__":
    main()
