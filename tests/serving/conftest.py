"""Serving fixtures: tiny engines, phase profiles, and a real uvicorn server on a free loopback port."""

from __future__ import annotations

import json
import socket
import threading
from contextlib import contextmanager

import pytest


def make_profile(path, *, name: str, model_type: str, n_layers: int, hidden_size: int, k: int):
    """A minimal valid phase_profile.json (schema 1) for a model; enough for the server."""
    doc = {
        "schema": "mcr-exit/phase-profile", "schema_version": 1,
        "model": {"name": name, "source": "object", "location": name, "revision": None, "dtype": "float32",
                  "device": "cpu", "architecture": "llama", "model_type": model_type, "n_heads": 4,
                  "hidden_size": hidden_size},
        "n_layers": n_layers,
        "phases": {"compress_start": max(1, k - 1), "refine_start": min(n_layers, k + 1), "found": True},
        "embedding_layer": k,
        "layers": [{"index": i} for i in range(n_layers + 1)],
        "mlflow_run_id": None,
    }
    path.write_text(json.dumps(doc))
    return path


@contextmanager
def running_server(app, *, wait_engine: bool = True, read_timeout: float = 30.0, http: str = "auto"):
    """Start uvicorn in a thread on a free port; yield the base URL once it listens and the engine is warm.

    The server uses the same HTTP protocol as ``mcr-exit serve`` (with its read deadline, ``read_timeout``)."""
    import uvicorn

    from mcr_exit.serving.http_timeouts import server_config

    class _Server(uvicorn.Server):
        def __init__(self, config):
            super().__init__(config)
            self.up = threading.Event()

        async def startup(self, sockets=None):
            await super().startup(sockets=sockets)
            self.up.set()

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = _Server(server_config(app, host="127.0.0.1", port=port, read_timeout=read_timeout, http=http,
                                   log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    if not server.up.wait(timeout=60) or (wait_engine and not app.state.engine.wait_ready(timeout=120)):
        raise RuntimeError("uvicorn or the engine warm-up did not finish")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@pytest.fixture(scope="session")
def tiny4(tokenizer):
    """A tiny 4-block Llama wrapped as a LoadedModel named tiny-llama."""
    from mcr_exit.models import from_objects
    from tests.tiny import build_tiny_model

    return from_objects(build_tiny_model("llama", len(tokenizer), n_layers=4), tokenizer, name="tiny-llama")


@pytest.fixture(scope="session")
def tiny4_profile(tmp_path_factory):
    path = tmp_path_factory.mktemp("profile") / "phase_profile.json"
    return make_profile(path, name="tiny-llama", model_type="llama", n_layers=4, hidden_size=64, k=2)


def build_engine(loaded, profile_path, **config):
    from mcr_exit.serving import Engine, EngineConfig
    from mcr_exit.serving.profile_source import load_profile_source

    profile = load_profile_source(str(profile_path))
    return Engine(loaded, profile, EngineConfig(**config))


@pytest.fixture(scope="module")
def server(tiny4, tiny4_profile):
    """(base_url, engine) of an open server on the tiny Llama (k = 2 of 4 blocks)."""
    from mcr_exit.serving.app import create_app

    engine = build_engine(tiny4, tiny4_profile, max_inputs=8, max_input_tokens=64, max_new_tokens=64)
    with running_server(create_app(engine, max_body_bytes=64 * 1024)) as url:
        yield url, engine


@pytest.fixture
def client(server):
    import openai

    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=60)


# ---- engine functions shared by the scheduler, equality and shutdown tests ---------------------------
def greedy_reference(loaded, prompts: list[list[int]], max_new_tokens: int, eos_ids) -> list[list[int]]:
    """transformers ``generate`` (greedy) per prompt, cut before the first EOS. Prompts of one length run
    as one batch without padding, so the reference is exactly what ``generate`` gives one prompt alone."""
    import torch

    out: list = [None] * len(prompts)
    by_len: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(len(p), []).append(i)
    eos = sorted(eos_ids)
    with torch.inference_mode():
        for n, idx in by_len.items():
            ids = torch.tensor([prompts[i] for i in idx])
            gen = loaded.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                        max_new_tokens=max_new_tokens, eos_token_id=eos,
                                        pad_token_id=loaded.tokenizer.pad_token_id)
            for row, i in enumerate(idx):
                toks = gen[row, n:].tolist()
                cut = next((j for j, t in enumerate(toks) if t in eos), len(toks))
                out[i] = toks[:cut]
    return out


@contextmanager
def engine_held(engine, prompt: str = "hold the engine"):
    """Stop both lanes: a generation's ``on_text`` callback blocks inside its prefill, which holds the
    forward lock, until the block exits. Generation requests then wait in the queue; the embedding lane
    takes at most one batch and waits for the lock."""
    from mcr_exit.serving.jobs import GenerationRequest

    release, holding = threading.Event(), threading.Event()
    tokens_at_hold = []

    def hold(_text):
        if not holding.is_set():
            tokens_at_hold.extend(len(r.tracker.ids) for r in engine.scheduler.rows.values()
                                  if r.handle.req.on_text is hold)
        holding.set()
        release.wait(60)

    ids = engine.encode_texts([prompt])[0]
    handle = engine.submit_generate(GenerationRequest(prompt_ids=ids, max_tokens=4, temperature=0, on_text=hold))
    try:
        if not holding.wait(60):
            raise RuntimeError("the engine thread never reached the blocking callback")
        if tokens_at_hold != [1]:  # a later token's callback runs outside the forward lock
            raise RuntimeError("the prompt's first token has no text: pick another prompt for engine_held")
        yield handle
    finally:
        release.set()
    handle.future.result(60)


def submissions(monkeypatch, engine, n: int) -> threading.Event:
    """An event set once ``n`` requests (embedding or generation) have reached the scheduler."""
    sched, done, count = engine.scheduler, threading.Event(), [0]
    lock = threading.Lock()

    def counted(real):
        def submit(item):
            real(item)
            with lock:
                count[0] += 1
                if count[0] >= n:
                    done.set()
        return submit

    monkeypatch.setattr(sched, "submit_embed", counted(sched.submit_embed))
    monkeypatch.setattr(sched, "submit_generation", counted(sched.submit_generation))
    return done


@contextmanager
def started(engine):
    """A started engine (warm-up done) for tests that drive it without HTTP; stopped afterwards."""
    engine.start()
    if not engine.wait_ready(120):
        raise RuntimeError("engine warm-up did not finish")
    try:
        yield engine
    finally:
        engine.stop()


def slow_decode(monkeypatch, engine, seconds: float) -> None:
    """Give every decode step a fixed extra cost (a CPU stand-in for a model big enough to take time)."""
    real, pause = engine.stepper.step, threading.Event()

    def step(B, span):
        pause.wait(seconds)  # never set: a fixed delay per step
        return real(B, span)

    monkeypatch.setattr(engine.stepper, "step", step)


def on_release(monkeypatch, engine, n_free: int) -> threading.Event:
    """An event set when a KV slot release leaves ``n_free`` slots free."""
    pool, done = engine.stepper.pool, threading.Event()
    real = pool.release

    def release(slot):
        real(slot)
        if pool.n_free >= n_free:
            done.set()

    monkeypatch.setattr(pool, "release", release)
    return done
