"""The background kernel warm-up (mcr_exit/prepare.py) compiles what `analyze` then needs: after it, a run
over prompts of at least d tokens (of different lengths, so batches of different lengths) adds nothing to
Triton's cache.

Skipped without a GPU. Run on a GPU machine: ``python -m pytest tests/gpu``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _model_and_data(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.tiny import TRAIN_TEXT, build_tokenizer

    tok = build_tokenizer(bos="<bos>", add_bos=False)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=384, num_hidden_layers=2, num_attention_heads=6,
                      num_key_value_heads=2, intermediate_size=512, max_position_embeddings=2048)
    folder = tmp_path / "model"
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    words = " ".join(TRAIN_TEXT).split()
    texts = [" ".join(words[i:i + n]) for i, n in ((0, 130), (7, 160), (19, 200))]  # ~430-670 tokens
    lengths = [len(tok(t)["input_ids"]) for t in texts]
    assert min(lengths) > 384 and len(set(lengths)) == 3, lengths
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return folder, data


def _entries(cache) -> set[str]:
    return set(os.listdir(cache)) if cache.exists() else set()


def _kernels(cache, entries) -> list[str]:
    """The kernel names in these cache entries (each holds <name>.json and the binaries)."""
    return sorted(f for e in entries for f in os.listdir(cache / e) if f.endswith(".json"))


def _analyze(folder, data, out, env):
    cmd = [sys.executable, "-m", "mcr_exit", "analyze", "--model", str(folder), "--device", "cuda", "--dtype",
           "bfloat16", "--data", str(data), "--batch-size", "2", "--max-length", "1024", "--no-mlflow",
           "--no-plots", "--output-dir", str(out)]
    subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)


def test_after_the_warmup_the_run_compiles_nothing(tmp_path):
    folder, data = _model_and_data(tmp_path)
    base = dict(os.environ, MCR_EXIT_PREPARE="0", MCR_EXIT_WARM="0", MCR_EXIT_CACHE=str(tmp_path / "c"))

    cold = tmp_path / "triton-cold"  # the control: without the warm-up the run compiles its kernels
    _analyze(folder, data, tmp_path / "out-cold", dict(base, TRITON_CACHE_DIR=str(cold)))
    assert len(_entries(cold)) >= 3

    warm = tmp_path / "triton-warm"
    env = dict(base, TRITON_CACHE_DIR=str(warm))
    record = tmp_path / "record.json"
    subprocess.run([sys.executable, "-m", "mcr_exit.prepare", "kernels", "--model", str(folder), "--device", "cuda",
                    "--dtype", "bfloat16", "--record", str(record)], env=env, check=True, timeout=600)
    doc = json.loads(record.read_text())
    assert doc["shapes"] == {"hidden": 384, "heads": 6, "kv_heads": 2, "head_dim": 64}
    assert len(doc["ran"]) == 3
    before = _entries(warm)
    _analyze(folder, data, tmp_path / "out-warm", env)
    new = _entries(warm) - before
    assert not new, f"the run compiled kernels the warm-up had not: {_kernels(warm, new)}"
    # the same kernels, the same numbers
    for name in ("layers.csv", "per_head.csv"):
        assert (tmp_path / "out-warm" / name).read_text() == (tmp_path / "out-cold" / name).read_text()
