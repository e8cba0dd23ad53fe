"""Client workloads of the serving benchmark, each through ``openai.AsyncOpenAI`` against the real server.

Inputs and prompts are token-id lists (the random-weight models have no real tokenizer); embeddings use
the client's default encoding (base64), streams ask for usage so completion tokens are counted exactly.
"""

from __future__ import annotations

import asyncio
import statistics
import time


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


async def embed_throughput(client, inputs: list[list[int]], *, clients: int, per_request: int, rounds: int) -> dict:
    """``clients`` closed-loop clients, each sending ``rounds`` requests of ``per_request`` inputs."""
    latencies: list[float] = []

    async def one(c: int):
        for r in range(rounds):
            start = (c * rounds + r) * per_request % max(1, len(inputs) - per_request)
            t0 = time.perf_counter()
            resp = await client.embeddings.create(model="m", input=inputs[start: start + per_request])
            latencies.append(time.perf_counter() - t0)
            assert len(resp.data) == per_request

    t0 = time.perf_counter()
    await asyncio.gather(*(one(c) for c in range(clients)))
    wall = time.perf_counter() - t0
    n = clients * rounds * per_request
    return {"seq_s": n / wall, "p50_s": _pct(latencies, 0.5), "p99_s": _pct(latencies, 0.99), "sequences": n}


async def embed_latency(client, inputs: list[list[int]], *, n: int) -> dict:
    """Single-input requests one after another (nothing else running)."""
    lat = []
    for i in range(n):
        t0 = time.perf_counter()
        await client.embeddings.create(model="m", input=[inputs[i % len(inputs)]])
        lat.append(time.perf_counter() - t0)
    return {"p50_s": _pct(lat, 0.5), "p99_s": _pct(lat, 0.99)}


async def _stream(client, prompt: list[int], max_tokens: int, first: list, tolerate: bool = False) -> int:
    t0 = time.perf_counter()
    tokens = 0
    try:
        stream = await client.completions.create(model="m", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                                 stream=True, stream_options={"include_usage": True})
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].text and len(first) < 10**6:
                if tokens == 0:
                    first.append(time.perf_counter() - t0)
                tokens = max(tokens, 1)
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
    except Exception:  # noqa: BLE001 - the shutdown workload ends streams on purpose
        if not tolerate:
            raise
    return tokens


async def stream_throughput(client, prompts: list[list[int]], max_tokens: int, tolerate: bool = False) -> dict:
    """len(prompts) concurrent greedy streams: aggregate completion tokens/s and time to first token."""
    first: list[float] = []
    t0 = time.perf_counter()
    counts = await asyncio.gather(*(_stream(client, p, max_tokens, first, tolerate) for p in prompts))
    wall = time.perf_counter() - t0
    return {"tok_s": sum(counts) / wall, "tokens": sum(counts), "ttft_p50_s": _pct(first, 0.5) if first else None,
            "wall_s": wall}


async def mixed_embed_latency(client, inputs, prompts, n: int, *, max_tokens: int) -> dict:
    """Single-embedding latency while len(prompts) streams generate (started first, long enough to outlast)."""
    first: list[float] = []
    streams = [asyncio.ensure_future(_stream(client, p, max_tokens, first)) for p in prompts]
    while len(first) < len(prompts) and not all(s.done() for s in streams):
        await asyncio.sleep(0.05)
    lat = await embed_latency(client, inputs, n=n)
    running = sum(not s.done() for s in streams)
    await asyncio.gather(*streams)
    return {**lat, "streams_running_at_end": running}


async def streams_under_embedding_load(client, prompts, max_tokens: int, inputs, *, rate: float) -> dict:
    """Generation throughput of len(prompts) streams while embeddings arrive at ``rate`` sequences/s
    (open loop, 8 inputs per request)."""
    stop = asyncio.Event()
    sent = 0

    async def embedder():
        nonlocal sent
        t0, tasks = time.perf_counter(), []
        while not stop.is_set():
            due = int((time.perf_counter() - t0) * rate / 8)
            while sent < due:
                start = sent * 8 % max(1, len(inputs) - 8)
                tasks.append(asyncio.ensure_future(client.embeddings.create(model="m", input=inputs[start:start + 8])))
                sent += 1
            await asyncio.sleep(0.005)
        await asyncio.gather(*tasks)

    emb = asyncio.ensure_future(embedder())
    await asyncio.sleep(0.5)
    gen = await stream_throughput(client, prompts, max_tokens)
    stop.set()
    await emb
    return {**gen, "embedding_seq_s_offered": rate, "embedding_requests": sent}


async def greedy_texts(client, prompts, max_tokens: int) -> list[str]:
    """Greedy completions of token-id prompts, as text."""
    outs = await asyncio.gather(*(client.completions.create(model="m", prompt=p, max_tokens=max_tokens,
                                                            temperature=0) for p in prompts))
    return [o.choices[0].text for o in outs]


def identical_share(ours: list[list[int]], ref: list[list[int]]) -> tuple[float, float]:
    """(share of positions with the same token, mean length of the identical prefix) over all rows."""
    same = total = 0
    prefixes = []
    for a, b in zip(ours, ref):
        n = min(len(a), len(b))
        same += sum(x == y for x, y in zip(a[:n], b[:n]))
        total += max(len(a), len(b))
        p = next((i for i in range(n) if a[i] != b[i]), n)
        prefixes.append(p)
    return same / max(1, total), statistics.mean(prefixes) if prefixes else 0.0
