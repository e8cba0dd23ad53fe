"""End to end on the built-in SmolLM2 (the session's one real_model): openai client against the real server."""

from __future__ import annotations

import numpy as np
import pytest

from mcr_exit.models.forward import hidden_at
from mcr_exit.models.tokens import collate
from mcr_exit.serving.app import create_app
from mcr_exit.metrics.pooling import pool_hidden
from tests.serving.conftest import build_engine, make_profile, running_server

pytestmark = pytest.mark.real_model


def test_smollm2_embeddings_chat_and_stream(real_model, tmp_path):
    import openai

    cfg = real_model.model.config
    profile = make_profile(tmp_path / "phase_profile.json", name=real_model.spec.name, model_type=cfg.model_type,
                           n_layers=real_model.n_layers, hidden_size=cfg.hidden_size, k=19)
    engine = build_engine(real_model, profile, max_new_tokens=32)
    texts = ["The capital of France is Paris.", "def add(a, b):\n    return a + b"]
    with running_server(create_app(engine, api_key="key")) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="key", max_retries=0, timeout=120)
        resp = client.embeddings.create(model=real_model.spec.name, input=texts)  # base64 by default
        got = np.array([d.embedding for d in resp.data], dtype=np.float32)
        ids = engine.encode_texts(texts)
        assert all(x[0] == real_model.tokenizer.convert_tokens_to_ids("<|im_start|>") for x in ids)
        x, mask = collate(ids, engine.pad_id)
        ref = pool_hidden(hidden_at(real_model.adapter, x, mask, 19), mask, normalize=True).numpy()
        np.testing.assert_allclose(got, ref, atol=1e-4)
        msgs = [{"role": "user", "content": "What is 2 + 2? Answer with one number."}]
        chat = client.chat.completions.create(model=real_model.spec.name, messages=msgs, max_tokens=8,
                                              temperature=0)
        assert chat.choices[0].message.content.strip()
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model=real_model.spec.name, messages=msgs, max_tokens=8, temperature=0, stream=True) if c.choices)
        assert streamed == chat.choices[0].message.content
    assert engine.metrics.get("mcr_exit_blocks_executed_total", kind="embedding") % 19 == 0
