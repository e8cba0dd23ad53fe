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
def running_server(app, *, wait_engine: bool = True):
    """Start uvicorn in a thread on a free port; yield the base URL once it listens and the engine is warm."""
    import uvicorn

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
    server = _Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
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
