"""Helpers of the ``--engine vllm`` tests: a tiny Llama vLLM's CPU build accepts, and the real server in a
child process (vLLM's engine core is a process of its own, so the server is one too).

These tests run only where ``vllm`` is installed (``bash scripts/vllm_env.sh`` builds that environment).
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                reason="vllm is not installed here (bash scripts/vllm_env.sh builds its environment)")

ROOT = Path(__file__).resolve().parents[2]


def save_tiny_llama(path: Path, tokenizer, *, n_layers: int = 4, hidden: int = 128, intermediate: int = 256,
                    seed: int = 0) -> Path:
    """A random Llama as a transformers folder with its tokenizer. Heads of 32 (vLLM's CPU attention takes
    32 and up), grouped KV heads, and the EOS row of the output layer zeroed so greedy runs go long."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=n_layers,
                      num_attention_heads=hidden // 32, num_key_value_heads=max(1, hidden // 64),
                      intermediate_size=intermediate, max_position_embeddings=4096,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():
        model.lm_head.weight[tokenizer.eos_token_id] = 0.0
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_env() -> dict:
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache on a CPU (vLLM's default is larger)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def get_json(url: str, timeout: float = 10) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def metric(base: str, name: str, **labels) -> float:
    with urllib.request.urlopen(base + "/metrics", timeout=10) as r:
        text = r.read().decode()
    want = name + ("{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}" if labels else "")
    for line in text.splitlines():
        if line.startswith(want + " "):
            return float(line.split()[-1])
    return 0.0


def _start(model_dir: Path | None, profile: Path, extra: tuple[str, ...], ready_timeout: float):
    """Start the server on a free port and wait until it is ready: (base URL, Popen, log file), or None when
    the port was taken between ``free_port`` and the server's bind (vLLM's engine core opens sockets of its
    own on ports the system hands out, and may get that one first)."""
    port = free_port()
    log = open(Path(profile).with_suffix(f".{port}.log"), "w")  # noqa: SIM115 - the caller closes it
    cmd = [sys.executable, "-m", "mcr_exit", "serve", "--engine", "vllm", "--enforce-eager", "--dtype", "float32",
           "--max-model-len", "4096", *(["--model", str(model_dir)] if model_dir else []), "--profile", str(profile), "--port", str(port),
           "--max-input-tokens", "256", "--max-new-tokens", "3000", *extra]
    proc = subprocess.Popen(cmd, env=vllm_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    while True:
        if proc.poll() is not None:
            log.close()
            if "address already in use" in Path(log.name).read_text():
                return None
            raise RuntimeError(f"the server exited with {proc.returncode}; see {log.name}")
        try:
            if get_json(base + "/health/ready", timeout=5)["status"] == "ready":
                return base, proc, log
        except OSError:
            pass
        if time.monotonic() - t0 > ready_timeout:
            _stop(proc)
            log.close()
            raise RuntimeError(f"the server was not ready after {ready_timeout:g} s; see {log.name}")
        time.sleep(1)


def _stop(proc) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@contextmanager
def vllm_server(model_dir: Path | None, profile: Path, *extra: str, ready_timeout: float = 600):
    """``mcr-exit serve --engine vllm`` in a child process (``model_dir`` None: the built-in model); yields (base URL, Popen) once /health/ready is 200."""
    for _ in range(3):
        started = _start(model_dir, profile, extra, ready_timeout)
        if started is not None:
            break
    else:
        raise RuntimeError("three free ports were taken before the server could bind them")
    base, proc, log = started
    try:
        yield base, proc
    finally:
        _stop(proc)
        log.close()


def tree_rss(pid: int) -> int:
    """Resident memory in bytes of a process and all its descendants."""
    import psutil

    root = psutil.Process(pid)
    total = 0
    for p in [root, *root.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total
