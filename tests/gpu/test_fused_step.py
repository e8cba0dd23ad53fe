"""Decode steps that carry embedding inputs, on a GPU: captured as CUDA graphs (over the compiled blocks)
and replayed by the engine while sequences generate. Skipped without a GPU (CI has none).

- A replayed fused step gives the plain decode graph's logits and ``hidden_at``'s hidden[k] (float32).
- Through the engine: embeddings asked for while 8 sequences generate ride in the decode steps, equal
  ``hidden_at`` + pooling, and the greedy tokens stay those of the engine without fused steps.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from tests.tiny import build_tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TEXTS = ["A bee lives in a hive.", "3 + 5 = 8", "The quick brown fox jumps over the lazy dog.",
         "def add(a, b):\n    return a + b"]


def _engine(loaded, **config):
    from mcr_exit.serving import Engine, EngineConfig

    return Engine(loaded, None, EngineConfig(max_input_tokens=64, max_new_tokens=64, **config), embedding_layer=2)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_a_replayed_fused_step_equals_the_decode_graph_and_hidden_at(family, tokenizer):
    from mcr_exit.models import from_objects
    from mcr_exit.models.forward import hidden_at
    from mcr_exit.models.tokens import collate

    loaded = from_objects(build_tiny_model(family, len(tokenizer), n_layers=4).cuda(), tokenizer)
    engine = _engine(loaded, fuse_embeddings="auto")

    async def start():
        await engine.astart()
        await engine.astop()

    asyncio.run(start())  # warm-up: compiled blocks, decode graphs, the fused step's compilation
    st, fused = engine.stepper, engine.scheduler.fused
    assert fused is not None and fused.use_graphs and engine.startup_report["fused_embeddings"].startswith("graphs")
    warm = fused.captured  # the warm-up captured the largest batch bucket's steps
    assert warm == len(fused.full_batch_keys()) == engine.startup_report["fused_cuda_graphs"] > 0
    assert all(key in fused.graphs for key in fused.full_batch_keys())
    prompts = [engine.encode_texts([t])[0] for t in TEXTS[:3]]
    inputs = [engine.encode_texts([t])[0] for t in TEXTS]
    with torch.inference_mode():
        def state():
            st.prefill(prompts, [0, 1, 2])
            st.feed([0, 1, 2], torch.tensor([3, 4, 5], device="cuda"), [len(p) for p in prompts])

        state()
        want = st.step(3, 40).clone()
        state()
        E, index, mask = fused.load(inputs)
        got, packed = fused.run(3, 40, E)
        got, h = got.clone(), packed[index].clone()
        state()
        again, packed = fused.run(3, 40, E)  # the second time: a replay of the graph captured above
        assert fused.captured == warm + 1  # 3 rows: a batch bucket the warm-up left to the first need
        ids, m = collate(inputs, engine.pad_id, "cuda")
        ref = hidden_at(loaded.adapter, ids, m, 2)
    torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(again, got)
    for r, x in enumerate(inputs):
        torch.testing.assert_close(h[r, : len(x)], ref[r, : len(x)], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_the_engine_carries_embeddings_in_decode_graphs(family, tokenizer):
    from mcr_exit.metrics.pooling import pool_hidden
    from mcr_exit.models import from_objects
    from mcr_exit.models.forward import hidden_at
    from mcr_exit.models.tokens import collate
    from mcr_exit.serving.jobs import GenerationRequest

    loaded = from_objects(build_tiny_model(family, len(tokenizer), n_layers=4).cuda(), tokenizer)
    prompts = ["Rivers flow into the sea; glaciers carve valleys", "Question: Tom has 3 apples and buys 5 more.",
               "print(add(2, 3))", "Volcanoes erupt along plate boundaries and"] * 2

    def run(fuse: str):
        engine = _engine(loaded, fuse_embeddings=fuse)

        async def go():
            await engine.astart()
            try:
                ids = [engine.encode_texts([p])[0] for p in prompts]
                gens = [asyncio.ensure_future(engine.generate(GenerationRequest(prompt_ids=i, max_tokens=60,
                                                                                temperature=0))) for i in ids]
                while not engine.scheduler.rows:
                    await asyncio.sleep(0.001)
                embs = await asyncio.gather(*(engine.embed(engine.encode_texts(TEXTS)) for _ in range(20)))
                running = bool(engine.scheduler.rows)
                return [g.token_ids for g in await asyncio.gather(*gens)], embs, running
            finally:
                await engine.astop()

        return (*asyncio.run(go()), engine)

    toks, embs, running, engine = run("auto")
    plain, _, _, _ = run("off")
    assert running
    assert engine.metrics.get("mcr_exit_batches_total", kind="fused") >= 1
    ids, m = collate(engine.encode_texts(TEXTS), engine.pad_id, "cuda")
    with torch.inference_mode():
        want = pool_hidden(hidden_at(loaded.adapter, ids, m, 2), m, engine.config.pooling, normalize=True).cpu()
    for res in embs:
        np.testing.assert_allclose(res.vectors, want.numpy(), atol=1e-4, rtol=1e-4)
    same = sum(x == y for a, b in zip(toks, plain) for x, y in zip(a, b))
    total = sum(max(len(a), len(b)) for a, b in zip(toks, plain))
    print(f"{family}: {engine.metrics.get('mcr_exit_batches_total', kind='fused')} fused steps; "
          f"{same}/{total} greedy tokens as without them")
    assert same / total >= 0.95
