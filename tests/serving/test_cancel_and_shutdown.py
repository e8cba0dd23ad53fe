"""A client that drops its stream frees the KV slot at once; SIGINT / SIGTERM to a real `mcr-exit serve`
process cancels the open stream and the process exits within 2 s."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from mcr_exit.serving.app import create_app
from tests.serving.conftest import build_engine, make_profile, on_release, running_server, slow_decode

ROOT = Path(__file__).resolve().parents[2]
MODEL = "tiny-llama"


def test_dropped_stream_frees_its_slot(tiny4, tiny4_profile, monkeypatch):
    engine = build_engine(tiny4, tiny4_profile, max_input_tokens=32, max_new_tokens=200)
    with running_server(create_app(engine)) as url:
        slow_decode(monkeypatch, engine, 0.01)  # 190 tokens would take >= 1.9 s
        freed = on_release(monkeypatch, engine, engine.stepper.pool.n_slots)
        handles, real_submit = [], engine.scheduler.submit_generation
        monkeypatch.setattr(engine.scheduler, "submit_generation", lambda h: (real_submit(h), handles.append(h)))
        body = {"model": MODEL, "prompt": "a stream nobody reads to the end", "max_tokens": 190, "temperature": 0,
                "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            got = [next(ln for ln in lines if ln) for _ in range(3)]
            assert engine.stepper.pool.n_used == 1 and all(g.startswith("data: {") for g in got)
            t0 = time.perf_counter()
        # leaving the block closed the connection mid-stream
        assert freed.wait(10), "the dropped stream kept its KV slot"
        freed_after = time.perf_counter() - t0
        out = handles[0].future.result(10)
        assert out.finish_reason == "abort" and 3 <= out.completion_tokens < 190
        assert freed_after < 1.0 and engine.stepper.pool.n_used == 0 and not engine.scheduler.rows


@pytest.fixture(scope="module")
def long_model_dir(tmp_path_factory, tokenizer):
    """A tiny Llama with a 4096-token context saved as a model folder, and a profile for it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                                         max_position_embeddings=4096)).eval()
    path = tmp_path_factory.mktemp("long") / "tiny-long"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    profile = make_profile(path.parent / "phase_profile.json", name=path.name, model_type="llama", n_layers=2,
                           hidden_size=64, k=1)
    return path, profile


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LongStream(threading.Thread):
    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url, self.lines, self.error = url, [], None
        self.flowing = threading.Event()

    def run(self):
        body = {"prompt": "Rivers flow into the sea", "max_tokens": 4000, "temperature": 0, "stream": True}
        try:
            with httpx.stream("POST", self.url + "/v1/completions", json=body, timeout=30) as r:
                for ln in r.iter_lines():
                    if ln:
                        self.lines.append(ln)
                        if len(self.lines) >= 5:
                            self.flowing.set()
        except httpx.HTTPError as exc:  # the server went away mid-stream
            self.error = exc
        finally:
            self.flowing.set()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_stops_streams_and_exits_within_2s(long_model_dir, sig):
    path, profile = long_model_dir
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "mcr_exit", "serve", "--model", str(path), "--profile",
                             str(profile), "--port", str(port), "--max-input-tokens", "64",
                             "--max-new-tokens", "4000"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:  # another process: poll its readiness
            try:
                if httpx.get(url + "/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        assert proc.poll() is None, proc.stderr.read()
        stream = LongStream(url)
        stream.start()
        assert stream.flowing.wait(60) and stream.error is None and len(stream.lines) >= 5
        t0 = time.perf_counter()
        proc.send_signal(sig)
        proc.wait(timeout=15)
        exit_s = time.perf_counter() - t0
        stream.join(10)
        print(f"\n{sig.name}: exited {exit_s:.2f} s after the signal, stream had {len(stream.lines)} lines")
        assert exit_s < 3.0, f"exit took {exit_s:.2f} s (goal: 2 s)"
        assert not stream.is_alive(), "the stream did not end"
        assert len(stream.lines) < 4000  # cut short: an in-band 503, or the connection closed
        assert stream.error is not None or (stream.lines[-1] == "data: [DONE]" and "shutting down" in stream.lines[-2])
        assert proc.returncode in (0, -sig, 128 + sig), proc.returncode
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_a_stream_whose_client_left_closes_its_generator_at_once():
    """The client is gone, so ``send`` raises on the second chunk: the stream's body generator is closed
    when the response ends (its ``finally`` cancels the generation), not whenever the garbage collector
    gets to it (collection is off here)."""
    import asyncio
    import gc

    from mcr_exit.serving.routes import sse_response_class

    closed = []

    async def body():
        try:
            for i in range(1000):
                yield f"data: {i}\n\n"
        finally:
            closed.append(True)

    sent = []

    async def send(message):
        if message["type"] == "http.response.body" and any(m["type"] == "http.response.body" for m in sent):
            raise OSError("the client closed the connection")
        sent.append(message)

    async def receive():
        await asyncio.sleep(3600)

    response = sse_response_class()(body(), media_type="text/event-stream")
    scope = {"type": "http", "asgi": {"spec_version": "2.4"}, "method": "GET", "path": "/", "headers": []}
    async def serve_and_look():
        with pytest.raises(Exception):  # Starlette's ClientDisconnect
            await response(scope, receive, send)
        return list(closed)  # while the loop runs (asyncio.run closes left-over generators when it ends)

    gc.disable()
    try:
        assert asyncio.run(serve_and_look()) == [True] and len(sent) == 2  # the start and one chunk
    finally:
        gc.enable()
