"""The built-in SmolLM2-135M-Instruct on the vLLM engine: vLLM loads the one-time safetensors conversion of
its GGUF, and the early-exit embeddings equal the transformers path's to within 1e-4."""

from __future__ import annotations

import numpy as np
import pytest

from tests.serving.vllm_server import needs_vllm, vllm_server

pytestmark = [needs_vllm, pytest.mark.real_model]

TEXTS = ["The cat sat on the mat.", "Paris is the capital of France.", "def add(a, b): return a + b",
         "Glaciers carve valleys over thousands of years."]


def test_smollm2_embeddings_equal_the_transformers_path(real_model, tmp_path):
    import openai
    import torch

    from mcr_exit.metrics.pooling import pool_hidden
    from mcr_exit.models.forward import hidden_at
    from mcr_exit.models.tokens import collate, encode_prompts, pad_id_of, resolve_bos
    from tests.serving.conftest import make_profile

    k, L = 20, real_model.n_layers
    ids = encode_prompts(real_model.tokenizer, TEXTS, resolve_bos(real_model.tokenizer, "auto"), max_length=10**9).ids
    x, mask = collate(ids, pad_id_of(real_model.tokenizer), torch.device("cpu"))
    with torch.inference_mode():
        want = {layer: pool_hidden(hidden_at(real_model.adapter, x, mask, layer), mask, "mean_no_first",
                                   normalize=True).numpy() for layer in (k, L)}
    profile = make_profile(tmp_path / "phase_profile.json", name=real_model.spec.name, model_type="llama",
                           n_layers=L, hidden_size=576, k=k)
    with vllm_server(None, profile) as (base, _):
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=300)
        for layer in (k, L):
            resp = client.embeddings.create(model=real_model.spec.name, input=TEXTS, encoding_format="float",
                                            extra_body={"layer": layer})
            got = np.asarray([d.embedding for d in resp.data], dtype=np.float32)
            assert np.abs(got - want[layer]).max() < 1e-4
        out = client.completions.create(model=real_model.spec.name, prompt="The capital of France is",
                                        max_tokens=8, temperature=0)
        assert out.usage.completion_tokens >= 1
