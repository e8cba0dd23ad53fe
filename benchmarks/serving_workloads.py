"""Client workloads of the serving benchmark, each through ``openai.AsyncOpenAI`` against the real server.

Inputs and prompts are token-id lists (the random-weight models have no real tokenizer); embeddings use
the client's default encoding (base64), streams ask for usage so completion tokens are counted exactly.
Concurrent streams come from several client processes (``StreamClients``), as separate users' would: one
Python process parsing thousands of SSE chunks a second is itself the bottleneck well before the server.
"""

from __future__ import annotations

import asyncio
import math
import signal
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


async def _closed_loop(client, inputs: list[list[int]], *, clients: int, per_request: int, rounds: int,
                       offset: int = 0) -> list[float]:
    """``clients`` closed-loop clients (numbered from ``offset``), each sending ``rounds`` requests of
    ``per_request`` inputs; the latency of every request."""
    latencies: list[float] = []

    async def one(c: int):
        for r in range(rounds):
            start = ((offset + c) * rounds + r) * per_request % max(1, len(inputs) - per_request)
            t0 = time.perf_counter()
            resp = await client.embeddings.create(model="m", input=inputs[start: start + per_request])
            latencies.append(time.perf_counter() - t0)
            assert len(resp.data) == per_request

    await asyncio.gather(*(one(c) for c in range(clients)))
    return latencies


async def embed_throughput(client, inputs: list[list[int]], *, clients: int, per_request: int, rounds: int) -> dict:
    """``clients`` closed-loop clients, each sending ``rounds`` requests of ``per_request`` inputs."""
    t0 = time.perf_counter()
    latencies = await _closed_loop(client, inputs, clients=clients, per_request=per_request, rounds=rounds)
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


async def mixed_embed_latency(client, streams: StreamClients, inputs, prompts, n: int, *, max_tokens: int,
                              settle_s: float) -> dict:
    """Single-embedding latency (from this process) while len(prompts) streams generate in the client
    processes; the probe starts ``settle_s`` after the streams (once they are past their prefill)."""
    gen = asyncio.ensure_future(streams.run(prompts, max_tokens))
    await asyncio.sleep(0.3 + settle_s)
    lat = await embed_latency(client, inputs, n=n)
    probe_end = time.time()
    res = await gen
    return {**lat, "streams_running_at_end": sum(e > probe_end for e in res["ends"])}


async def streams_under_embedding_load(client, streams: StreamClients, prompts, max_tokens: int, inputs, *,
                                       rate: float) -> dict:
    """Generation throughput of len(prompts) streams while embeddings arrive at ``rate`` sequences/s
    (open loop, 8 inputs per request); and the embeddings served while the streams ran: the sequences/s that
    finished in that window, and the latency of the requests sent in it."""
    stop = asyncio.Event()
    sent = 0
    times: list[tuple[float, float]] = []  # (sent, done) of each embedding request

    async def one(batch):
        t = time.perf_counter()
        await client.embeddings.create(model="m", input=batch)
        times.append((t, time.perf_counter()))

    async def embedder():
        nonlocal sent
        t0, tasks = time.perf_counter(), []
        while not stop.is_set():
            due = int((time.perf_counter() - t0) * rate / 8)
            while sent < due:
                start = sent * 8 % max(1, len(inputs) - 8)
                tasks.append(asyncio.ensure_future(one(inputs[start:start + 8])))
                sent += 1
            await asyncio.sleep(0.005)
        await asyncio.gather(*tasks)

    emb = asyncio.ensure_future(embedder())
    await asyncio.sleep(0.5)
    w0 = time.perf_counter()
    gen = await streams.run(prompts, max_tokens)
    w1 = time.perf_counter()
    stop.set()
    await emb
    lat = [done - t for t, done in times if w0 <= t <= w1]
    served = {"embedding_seq_s_served": 8 * sum(w0 <= done <= w1 for _, done in times) / (w1 - w0),
              "embedding_p50_s": _pct(lat, 0.5) if lat else math.nan,
              "embedding_p99_s": _pct(lat, 0.99) if lat else math.nan}
    return {**gen, "embedding_seq_s_offered": rate, "embedding_requests": sent, **served}


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


def _warm_client_process(_: int) -> None:
    import openai  # noqa: F401 - import once, outside the timed runs

    time.sleep(0.5)  # hold this worker so that the others take the other warm-up tasks


def _streams_in_process(url: str, prompts: list[list[int]], max_tokens: int, start_at: float,
                        tolerate: bool) -> dict:
    """One client process: its share of the streams on one event loop, from wall-clock time ``start_at``."""
    import openai

    async def main() -> dict:
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="bench", max_retries=0, timeout=600)
        await asyncio.sleep(max(0.0, start_at - time.time()))
        first: list[float] = []
        ends: list[float] = []
        c0 = time.process_time()

        async def one(p):
            n = await _stream(client, p, max_tokens, first, tolerate)
            ends.append(time.time())
            return n

        counts = await asyncio.gather(*(one(p) for p in prompts))
        await client.close()
        return {"counts": counts, "first": first, "ends": ends, "cpu_s": time.process_time() - c0}

    return asyncio.run(main())


def _embeds_in_process(url: str, inputs: list[list[int]], clients: int, per_request: int, rounds: int,
                       offset: int, start_at: float) -> dict:
    """One client process: ``clients`` closed-loop embedding clients on one event loop (``_closed_loop``),
    from wall-clock time ``start_at``."""
    import openai

    async def main() -> dict:
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="bench", max_retries=0, timeout=600)
        await asyncio.sleep(max(0.0, start_at - time.time()))
        c0 = time.process_time()
        latencies = await _closed_loop(client, inputs, clients=clients, per_request=per_request, rounds=rounds,
                                       offset=offset)
        end = time.time()
        await client.close()
        return {"latencies": latencies, "end": end, "cpu_s": time.process_time() - c0}

    return asyncio.run(main())


class StreamClients:
    """Streams spread over ``procs`` client processes, each with its own event loop and AsyncOpenAI client."""

    def __init__(self, url: str, procs: int):
        self.url, self.procs = url, procs
        self.pool = ProcessPoolExecutor(procs, mp_context=get_context("spawn"))
        list(self.pool.map(_warm_client_process, range(procs)))

    def close(self) -> None:
        self.pool.shutdown(cancel_futures=True)

    async def run(self, prompts: list[list[int]], max_tokens: int, *, tolerate: bool = False,
                  start_in: float = 0.3) -> dict:
        """Aggregate completion tokens/s from the common start to the last stream's end, time to first token,
        the clients' CPU use, and each stream's end (wall-clock time)."""
        loop = asyncio.get_running_loop()
        n_proc = min(self.procs, len(prompts))
        start_at = time.time() + start_in
        outs = await asyncio.gather(*(
            loop.run_in_executor(self.pool, _streams_in_process, self.url, prompts[i::n_proc], max_tokens,
                                 start_at, tolerate) for i in range(n_proc)))
        ends = sorted(e for o in outs for e in o["ends"])
        first = [f for o in outs for f in o["first"]]
        tokens = sum(sum(o["counts"]) for o in outs)
        wall = ends[-1] - start_at
        return {"tok_s": tokens / wall, "tokens": tokens, "ttft_p50_s": _pct(first, 0.5) if first else None,
                "ttft_max_s": max(first) if first else None, "wall_s": wall, "start_at": start_at, "ends": ends,
                "client_cpu": sum(o["cpu_s"] for o in outs) / wall, "client_procs": n_proc}


    async def embed(self, inputs: list[list[int]], *, clients: int, per_request: int, rounds: int,
                    start_in: float = 0.3) -> dict:
        """``embed_throughput``'s closed-loop clients, spread over the client processes: sequences/s from the
        common start to the last response, the latency percentiles, and the clients' CPU use."""
        loop = asyncio.get_running_loop()
        n_proc = min(self.procs, clients)
        start_at = time.time() + start_in
        share = [clients // n_proc + (i < clients % n_proc) for i in range(n_proc)]
        outs = await asyncio.gather(*(
            loop.run_in_executor(self.pool, _embeds_in_process, self.url, inputs, share[i], per_request, rounds,
                                 sum(share[:i]), start_at) for i in range(n_proc)))
        wall = max(o["end"] for o in outs) - start_at
        lat = [x for o in outs for x in o["latencies"]]
        n = clients * rounds * per_request
        return {"seq_s": n / wall, "p50_s": _pct(lat, 0.5), "p99_s": _pct(lat, 0.99), "sequences": n,
                "client_cpu": sum(o["cpu_s"] for o in outs) / wall, "client_procs": n_proc}


WORK = ("mcr_exit_batches_total", "mcr_exit_cuda_graph_captures_total", "mcr_exit_cuda_graph_capture_seconds_total",
        "mcr_exit_step_seconds_total", "mcr_exit_device_wait_seconds_total",
        "mcr_exit_forward_lock_wait_seconds_total", "mcr_exit_fused_tokens_total")


async def server_work(url: str) -> dict:
    """The server's counters of work (forward batches, step and wait seconds, carried tokens, graphs captured
    while serving), by kind or lane, from its /metrics."""
    import httpx

    async with httpx.AsyncClient() as http:
        text = (await http.get(url + "/metrics")).text
    out = {}
    for line in text.splitlines():
        name = line.split("{")[0].split(" ")[0]
        if name in WORK:
            label = next((line.split(f'{k}="')[1].split('"')[0] for k in ("kind", "lane") if f'{k}="' in line), "")
            out[f"{name.replace('mcr_exit_', '').replace('_total', '')}:{label}"] = float(line.rsplit(" ", 1)[1])
    return out


def _derived(d: dict) -> dict:
    """Per phase: the mean decode step (plain and fused together), and the tokens a fused step carried."""
    steps = d.get("batches:decode", 0)
    seconds = d.get("step_seconds:decode", 0) + d.get("step_seconds:fused", 0)
    fused = d.get("batches:fused", 0)
    return {"ms per decode step": 1e3 * seconds / steps if steps else 0,
            "tokens carried per fused step": d.get("fused_tokens:carried", 0) / fused if fused else 0}


def work_table(work: dict) -> list[str]:
    """What the server ran in each phase (differences of its /metrics counters), in two tables."""
    names = list(work)
    diffs = {name: {k: work[name].get(k, 0) - work[prev].get(k, 0) for k in set(work[name]) | set(work[prev])}
             for prev, name in zip(names, names[1:])}
    for d in diffs.values():
        d.update(_derived(d))
    keys = sorted({k for d in diffs.values() for k in d})
    counts = [k for k in keys if k.startswith(("batches", "cuda_graph", "fused_tokens"))]
    times = [k for k in keys if k not in counts]
    out = ["The server's work in each phase, from its /metrics: forward batches by kind, CUDA graphs captured while "
           "serving (and the seconds that took), embedding tokens carried by decode steps (and their buckets); then "
           "the generation lane's step seconds by kind, the seconds each lane waited for the device and for the "
           "other's eager forward, the mean decode step and the tokens a fused step carried:", ""]
    for cols in (counts, times):
        out += ["| phase | " + " | ".join(cols) + " |", "| --- |" + " ---: |" * len(cols)]
        out += [f"| {name} | " + " | ".join(f"{d.get(k, 0):.4g}" for k in cols) + " |" for name, d in diffs.items()]
        out.append("")
    return out


async def sigint_to_exit(proc) -> float:
    """SIGINT, then the time until the process has exited."""
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    while proc.poll() is None and time.monotonic() - t0 < 30:
        await asyncio.sleep(0.02)
    return time.monotonic() - t0


def uvicorn_stack() -> str:
    import importlib.metadata

    from mcr_exit.cli.serve_checks import server_stack

    loop, http = server_stack()
    return f"uvicorn {importlib.metadata.version('uvicorn')}, {loop} loop, {http} parser"
