"""``mcr-exit serve --engine vllm`` end to end over HTTP: early-exit embeddings from vLLM's own model equal
the transformers path, blocks after k never run, tokens stream as they come, embeddings and streams mix,
a client that leaves is aborted in vLLM, and SIGTERM ends open streams and the process.

One server (a child process) serves the module; the shutdown test runs last and stops it."""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import threading
import time

import numpy as np
import pytest

from tests.serving.conftest import make_profile
from tests.serving.vllm_server import metric, needs_vllm, save_tiny_llama, vllm_server

pytestmark = needs_vllm

K, L = 2, 4
# The context of the module's server: room for a stream that lasts minutes (see the abort test).
LONG_CONTEXT, LONG_STREAM = 32768, 30000
TEXTS = ["The quick brown fox jumps over the lazy dog.", "Rivers flow into the sea.", "def add(a, b):",
         "Tom has 3 apples and buys 5 more."]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    path = save_tiny_llama(tmp_path_factory.mktemp("vllm") / "tiny-vllm-llama", tokenizer, n_layers=L)
    config = path / "config.json"  # plain RoPE: the number of positions allowed changes no computation
    config.write_text(json.dumps({**json.loads(config.read_text()), "max_position_embeddings": LONG_CONTEXT}))
    return path


@pytest.fixture(scope="module")
def served(model_dir, tmp_path_factory):
    profile = make_profile(tmp_path_factory.mktemp("vllm-profile") / "phase_profile.json", name=model_dir.name,
                           model_type="llama", n_layers=L, hidden_size=128, k=K)
    with vllm_server(model_dir, profile, "--max-model-len", str(LONG_CONTEXT),
                     "--max-new-tokens", str(LONG_STREAM)) as (base, proc):
        yield base, proc


@pytest.fixture(scope="module")
def reference(model_dir):
    """hidden_at(layer) + pool_hidden on the transformers copy (in the test process only)."""
    import torch

    from mcr_exit.metrics.pooling import pool_hidden
    from mcr_exit.models import load_model
    from mcr_exit.models.forward import hidden_at
    from mcr_exit.models.tokens import collate, encode_prompts, pad_id_of, resolve_bos

    loaded = load_model(str(model_dir), dtype="float32")
    bos = resolve_bos(loaded.tokenizer, "auto")

    def embed(texts, layer, pooling="mean_no_first", normalize=True):
        ids = encode_prompts(loaded.tokenizer, texts, bos, max_length=10**9).ids
        x, mask = collate(ids, pad_id_of(loaded.tokenizer), torch.device("cpu"))
        with torch.inference_mode():
            h = hidden_at(loaded.adapter, x, mask, layer)
        return pool_hidden(h, mask, pooling, normalize=normalize).numpy()

    return embed


def _client(base):
    import openai

    return openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)


def _vectors(resp) -> np.ndarray:
    rows = []
    for d in resp.data:
        e = d.embedding
        rows.append(np.frombuffer(base64.b64decode(e), dtype="<f4") if isinstance(e, str) else np.asarray(e))
    return np.stack(rows)


def test_embeddings_equal_the_transformers_path_and_later_blocks_never_run(served, reference):
    base, _ = served
    client = _client(base)
    before = [metric(base, "mcr_exit_embedding_block_calls_total", block=str(b)) for b in range(L)]
    got = _vectors(client.embeddings.create(model="tiny-vllm-llama", input=TEXTS))  # default layer k
    assert np.abs(got - reference(TEXTS, K)).max() < 1e-4
    after = [metric(base, "mcr_exit_embedding_block_calls_total", block=str(b)) for b in range(L)]
    ran = [a - b for a, b in zip(after, before)]
    assert all(n >= 1 for n in ran[:K]) and ran[K:] == [0.0] * (L - K)  # blocks k+1..L never called
    for layer, pooling, normalize in [(0, "mean", False), (1, "last", True), (L, "mean_no_first", False)]:
        resp = client.embeddings.create(model="tiny-vllm-llama", input=TEXTS, encoding_format="float",
                                        extra_body={"layer": layer, "pooling": pooling, "normalize": normalize})
        assert np.abs(_vectors(resp) - reference(TEXTS, layer, pooling, normalize)).max() < 1e-4


def test_tokens_stream_as_they_come(served):
    base, _ = served
    client = _client(base)
    pieces = []
    for chunk in client.completions.create(model="tiny-vllm-llama", prompt="The quick brown fox", max_tokens=40,
                                           temperature=0, stream=True):
        if chunk.choices and chunk.choices[0].text:
            pieces.append(chunk.choices[0].text)
    full = client.completions.create(model="tiny-vllm-llama", prompt="The quick brown fox", max_tokens=40,
                                     temperature=0)
    assert full.usage.completion_tokens == 40
    # The first piece came alone, long before the whole text: the stream is not one piece at the end.
    assert len(pieces) >= 10 and len(pieces[0]) < len(full.choices[0].text)
    assert "".join(pieces) == full.choices[0].text


def test_embeddings_and_streams_at_once(served, reference):
    import openai

    base, _ = served
    want = reference(TEXTS, K)

    async def go():
        client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)

        async def streamer(i):
            n = 0
            stream = await client.completions.create(model="tiny-vllm-llama", prompt=TEXTS[i % 4], max_tokens=24,
                                                     temperature=0.8, seed=i, stream=True)
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].text:
                    n += 1
            return n

        async def embedder(i):
            out = []
            for r in range(3):
                resp = await client.embeddings.create(model="tiny-vllm-llama", input=TEXTS[i % 4:] + TEXTS[:i % 4])
                out.append((i % 4, _vectors(resp)))
            return out

        results = await asyncio.wait_for(asyncio.gather(*[streamer(i) for i in range(4)],
                                                        *[embedder(i) for i in range(8)]), timeout=300)
        await client.close()
        return results

    results = asyncio.run(go())
    assert all(n >= 1 for n in results[:4])
    for runs in results[4:]:
        for shift, vectors in runs:
            assert np.abs(vectors - np.roll(want, -shift, axis=0)).max() < 1e-4


def test_a_client_that_leaves_is_aborted_in_vllm(served):
    """A client reads one chunk of a stream and hangs up while vLLM is still generating it: the request is
    aborted at once.

    The stream must outlast the client's hang-up, or there is nothing left to abort. While vLLM's engine
    processes generate, a loaded machine with two cores can keep the test process off the CPU for seconds
    (the response sits unread in its socket): this tiny model's 3,000 tokens (about 7 s) could end before
    the client read its first chunk. So the stream asks for LONG_STREAM tokens (minutes), and the test
    checks that the client did leave it midway."""
    import httpx

    base, _ = served
    aborted = metric(base, "mcr_exit_vllm_aborted_total")
    before = metric(base, "mcr_exit_tokens_total", kind="completion")
    body = {"model": "tiny-vllm-llama", "prompt": "Rivers flow", "max_tokens": LONG_STREAM, "temperature": 0,
            "stream": True}
    with httpx.Client(timeout=60) as http, http.stream("POST", base + "/v1/completions", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break  # one chunk, then hang up
    generated = metric(base, "mcr_exit_tokens_total", kind="completion") - before  # no fewer than at the hang-up
    assert generated < LONG_STREAM, "the stream had ended before the client left it: nothing was left to abort"
    deadline = time.monotonic() + 30  # by the clock: a process kept off the CPU makes fewer polls
    while metric(base, "mcr_exit_vllm_aborted_total") == aborted and time.monotonic() < deadline:
        threading.Event().wait(0.1)
    assert metric(base, "mcr_exit_vllm_aborted_total") == aborted + 1, \
        f"not aborted within 30 s of the hang-up ({generated:g} tokens generated by then)"
    out = _client(base).completions.create(model="tiny-vllm-llama", prompt="Rivers flow", max_tokens=4)
    assert out.usage.completion_tokens == 4  # the server goes on serving


def test_sigterm_ends_open_streams_and_the_process(served):
    """Runs last in this module: it stops the module's server. The stream asks for the longest generation
    the server allows, so that no machine is fast enough to finish it before the signal lands."""
    import httpx
    import psutil

    base, proc = served
    children = psutil.Process(proc.pid).children(recursive=True)  # vLLM's engine core and worker
    assert children
    body = {"model": "tiny-vllm-llama", "prompt": "Once", "max_tokens": LONG_STREAM, "temperature": 0,
            "stream": True}
    lines, signalled = [], None
    with httpx.Client(timeout=60) as http, http.stream("POST", base + "/v1/completions", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data: {") and signalled is None:
                proc.send_signal(signal.SIGTERM)
                signalled = time.monotonic()
            if line:
                lines.append(line)
    ended_after = time.monotonic() - signalled
    assert lines[-1] == "data: [DONE]"
    assert "shutting down" in lines[-2], \
        f"the stream ended {ended_after:.1f} s after SIGTERM without the 503, {len(lines)} lines: {lines[-2][:200]}"
    assert ended_after < 30, f"the stream ended {ended_after:.1f} s after SIGTERM"  # a loaded 2-core machine reads slowly
    assert proc.wait(60) in (0, -signal.SIGTERM, 128 + signal.SIGTERM)  # uvicorn re-raises the signal it handled
    gone, alive = psutil.wait_procs(children, timeout=30)
    assert not alive  # vLLM's processes ended with the server
