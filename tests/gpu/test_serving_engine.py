"""The serving engine on a GPU: decode steps replayed from CUDA graphs against eager decode and ``generate``.

Skipped without a GPU (CI has none). Float32 on the GPU: the graph path and ``generate`` use other
attention kernels (a masked span rounded up to a bucket vs. the exact length), so a near-tie between
two logits can go either way; the test asks for a high share of identical greedy tokens, and for the
first tokens of every prompt (before any near-tie can compound) to agree exactly.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from tests.tiny import FAMILIES, build_tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

PROMPTS = ["The quick brown fox", "Question: Tom has 3 apples and buys 5 more.", "def add(a, b):",
           "Rivers flow into the sea; glaciers carve valleys", "A bee", "print(add(2, 3))",
           "Volcanoes erupt along plate boundaries and", "Answer: 3 + 5 ="]


def _engine_tokens(loaded, cuda_graphs: bool, max_tokens: int) -> tuple[list[list[int]], list[list[int]], dict]:
    from mcr_exit.serving import Engine, EngineConfig
    from mcr_exit.serving.jobs import GenerationRequest

    engine = Engine(loaded, None, EngineConfig(max_input_tokens=64, max_new_tokens=64, cuda_graphs=cuda_graphs),
                    embedding_layer=1)

    async def go():
        await engine.astart()
        try:
            ids = [engine.encode_texts([p])[0] for p in PROMPTS]
            outs = await asyncio.gather(*(engine.generate(GenerationRequest(prompt_ids=i, max_tokens=max_tokens,
                                                                            temperature=0)) for i in ids))
            return ids, [o.token_ids for o in outs]
        finally:
            await engine.astop()

    ids, toks = asyncio.run(go())
    return ids, toks, dict(engine.startup_report)


def _generate(model, tokenizer, ids: list[int], max_tokens: int) -> list[int]:
    """Greedy ``generate`` with the engine's end-of-sequence ids (the tokenizer's and the model's own)."""
    from mcr_exit.serving.engine import eos_ids_of

    eos = sorted(eos_ids_of(model, tokenizer))
    x = torch.tensor([ids], device="cuda")
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=eos)[0, len(ids):].tolist()
    return next((out[:i] for i, t in enumerate(out) if t in eos), out)


@pytest.mark.parametrize("family", FAMILIES)
def test_graph_decode_matches_generate(family, tokenizer):
    from mcr_exit.models import from_objects

    model = build_tiny_model(family, len(tokenizer), n_layers=3).cuda()
    loaded = from_objects(model, tokenizer, name=f"tiny-{family}")
    ids, graphs, report = _engine_tokens(loaded, True, 24)
    assert report.get("cuda_graphs", 0) > 0  # the decode steps really were captured
    _, eager, _ = _engine_tokens(loaded, False, 24)
    ref = [_generate(model, tokenizer, i, 24) for i in ids]
    pairs = [(a, b) for run in (graphs, eager) for a, b in zip(run, ref)]
    same = sum(x == y for a, b in pairs for x, y in zip(a, b))
    total = sum(max(len(a), len(b)) for a, b in pairs)
    firsts = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None) for a, b in pairs]
    print(f"{family}: {same}/{total} greedy tokens identical to generate; first differing position per prompt "
          f"(graphs, then eager): {firsts}; {report}")
    assert same / total >= 0.95
    assert all(a[:4] == b[:4] for a, b in pairs)


@pytest.mark.parametrize("family", FAMILIES)
def test_embedding_batches_from_graphs_equal_eager_ones(family, tokenizer):
    """With the engine warmed up (decode graphs, compiled blocks), embedding batches of a repeated bucket
    replay a captured graph, without ``forward_lock``, and give the eager batches' vectors."""
    from mcr_exit.models import from_objects
    from mcr_exit.serving import Engine, EngineConfig

    loaded = from_objects(build_tiny_model(family, len(tokenizer)).cuda(), tokenizer, name=f"tiny-{family}")
    engine = Engine(loaded, None, EngineConfig(max_input_tokens=64, max_new_tokens=8), embedding_layer=2)

    async def go():
        await engine.astart()
        try:
            graphs = engine.scheduler.embed_graphs
            assert graphs is not None and engine.startup_report["embed_cuda_graphs"] == "idle"
            ids = engine.encode_texts(PROMPTS)
            runs = [(await engine.embed(ids)).vectors for _ in range(3)]
            return runs, graphs.captured
        finally:
            await engine.astop()

    (eager, captured_run, replayed), captured = asyncio.run(go())
    assert captured == 1
    torch.testing.assert_close(torch.from_numpy(captured_run), torch.from_numpy(eager), atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(torch.from_numpy(replayed), torch.from_numpy(eager), atol=1e-4, rtol=1e-3)
