#!/usr/bin/env bash
# The CLI under torchrun on two GPUs (NCCL) against one process: a small random bf16 Llama saved as a folder,
# 12 prompts of ~1000 tokens. Run from the repository root on a machine with 2 GPUs: bash benchmarks/torchrun_cli_check.sh
# (results: results/multi_gpu_dp_h200x2.txt). Writes under /tmp.
export PYTHONPATH=$PWD
set -e
python - <<'PY'
import json, torch
from transformers import LlamaConfig, LlamaForCausalLM
from tests.tiny import build_tokenizer
cfg = LlamaConfig(vocab_size=600, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
torch.manual_seed(0)
m = LlamaForCausalLM(cfg)
tok = build_tokenizer(add_bos=True)
m.save_pretrained("/tmp/m"); tok.save_pretrained("/tmp/m")
with open("/tmp/p.jsonl", "w") as f:
    for i in range(12):
        f.write(json.dumps({"text": f"Prompt {i}: " + "the quick brown fox jumps over the lazy dog, again and again. " * (20 + 3 * i)}) + "\n")
PY
COMMON="analyze --model /tmp/m --data /tmp/p.jsonl --no-plots --no-mlflow --device cuda --dtype bfloat16"
torchrun --nproc-per-node 2 -m mcr_exit $COMMON --output-dir /tmp/dp 2>&1 | grep -v "Warning\|warn\|^W1" | tail -4
python -m mcr_exit $COMMON --output-dir /tmp/one 2>&1 | tail -2
python - <<'PY'
import pandas as pd
for t in ("layers.csv", "per_prompt.csv.gz"):
    a, b = pd.read_csv(f"/tmp/dp/{t}"), pd.read_csv(f"/tmp/one/{t}")
    num = a.select_dtypes("number").columns
    d = ((a[num] - b[num]).abs() / b[num].abs().clip(lower=1)).max()
    print(t, a.shape, "largest |dp - one| / max(1, |one|):", f"{d.max():.2e}", d.idxmax(), "mean tokens", a["n_tokens"].mean() if "n_tokens" in a else "")
PY
