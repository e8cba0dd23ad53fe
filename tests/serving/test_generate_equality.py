"""Greedy generation through the engine equals transformers ``generate`` token for token (CPU float32).

32 prompts of 8 lengths (1..60 tokens after BOS, so Gemma 3's window of 8 is passed) are sent at once:
they queue for 12 KV slots, share prefills and decode steps, and finish at their own ``max_tokens``
or stop string. The expected text is ``generate``'s text cut at the first stop string; the engine's
token ids are ``generate``'s up to that point.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from mcr_exit.models import from_objects
from mcr_exit.serving import Engine, EngineConfig
from mcr_exit.serving.engine import eos_ids_of
from mcr_exit.serving.jobs import GenerationRequest
from tests.serving.conftest import greedy_reference
from tests.tiny import FAMILIES, TRAIN_TEXT, build_tiny_model

NEW_TOKENS = 64
LENGTHS = (1, 2, 5, 9, 14, 23, 37, 60)  # prompt tokens after BOS


def make_prompts(engine, n: int, lengths: tuple[int, ...] = LENGTHS) -> list[list[int]]:
    """``n`` prompts cut from the training text at different offsets, cycling through ``lengths``."""
    corpus = engine.loaded.tokenizer.encode(" ".join(TRAIN_TEXT[:4]), add_special_tokens=False)
    bos = [engine.bos.token_id] if engine.bos.prepend else []
    prompts = []
    for i in range(n):
        length = lengths[i % len(lengths)]
        start = (i * 13) % (len(corpus) - length)
        prompts.append(bos + corpus[start:start + length])
    return prompts


def plan_requests(tok, prompts, refs):
    """Per-request max_tokens and stop strings; returns (requests, expected texts)."""
    reqs, expected = [], []
    for i, (p, ref) in enumerate(zip(prompts, refs)):
        max_tokens = NEW_TOKENS if i % 3 else 8 + i  # some stop by length early
        text = tok.decode(ref[:max_tokens], skip_special_tokens=True)
        stop: tuple[str, ...] = ()
        if i % 4 == 1:  # a stop string taken from the middle of the expected text
            mid = next((text[j:j + 2] for j in range(len(text) // 2, len(text) - 1)
                        if text[j:j + 2].strip() and "\ufffd" not in text[j:j + 2]), None)
            stop = ("never-seen-zz", mid) if mid else ()
        reqs.append(GenerationRequest(prompt_ids=p, max_tokens=max_tokens, temperature=0, stop=stop))
        expected.append(text[: text.find(stop[1])] if stop else text)
    return reqs, expected


def check_equal(engine, prompts, n_new: int = NEW_TOKENS) -> dict:
    tok = engine.loaded.tokenizer
    refs = greedy_reference(engine.loaded, prompts, n_new, eos_ids_of(engine.loaded.model, tok))
    reqs, expected = plan_requests(tok, prompts, refs)
    assert sum(1 for r in reqs if r.stop) >= len(reqs) // 8, "the plan should include stop strings"
    assert any(r.max_tokens < n_new for r in reqs) and any(r.max_tokens == n_new for r in reqs)

    async def run_all():
        await engine.astart()
        try:
            return await asyncio.gather(*(engine.generate(r) for r in reqs))
        finally:
            await engine.astop()

    t0 = time.perf_counter()
    outs = asyncio.run(run_all())
    seconds = time.perf_counter() - t0
    for i, (req, ref, want, out) in enumerate(zip(reqs, refs, expected, outs)):
        n = len(out.token_ids)
        assert out.token_ids == ref[:n], f"prompt {i} ({len(req.prompt_ids)} tokens) differs from generate"
        assert out.text == want, f"prompt {i}: text differs"
        if req.stop and req.stop[1] in tok.decode(ref[:req.max_tokens], skip_special_tokens=True):
            assert out.finish_reason == "stop" and n <= req.max_tokens
        else:
            assert n == min(len(ref), req.max_tokens)
            assert out.finish_reason == ("length" if n == req.max_tokens else "stop")
        assert out.prompt_tokens == len(req.prompt_ids) and out.completion_tokens == n
    decode_steps = engine.metrics.get("mcr_exit_batches_total", kind="decode")
    tokens = sum(len(o.token_ids) for o in outs)
    assert decode_steps < tokens / 2, "the requests did not share decode steps"
    assert engine.stepper.pool.n_used == 0 and not engine.scheduler.rows
    return {"seconds": seconds, "decode_steps": decode_steps, "tokens": tokens}


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_equals_generate_for_every_family(tokenizer, family):
    loaded = from_objects(build_tiny_model(family, len(tokenizer), n_layers=2), tokenizer, name=f"tiny-{family}")
    engine = Engine(loaded, None, EngineConfig(max_input_tokens=64, max_new_tokens=NEW_TOKENS,
                                               kv_cache_tokens=12 * 128), embedding_layer=1)
    assert engine.context_len == 128
    prompts = make_prompts(engine, 32)
    assert {len(p) for p in prompts} == {n + engine.bos.prepend for n in LENGTHS}
    check_equal(engine, prompts)
    assert engine.startup_report["kv_slots"] == 12


@pytest.mark.real_model
def test_greedy_equals_generate_on_smollm2(real_model):
    """16 prompts of the 8 lengths on the real model (8 KV slots: half of them wait); 32 pass too, in
    about twice the time (50 s on an idle 2-core CPU)."""
    engine = Engine(real_model, None, EngineConfig(max_input_tokens=64, max_new_tokens=NEW_TOKENS,
                                                   kv_cache_tokens=8 * 128), embedding_layer=19)
    check_equal(engine, make_prompts(engine, 16))


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_steps_queued_ahead_give_the_same_tokens(tokenizer, family):
    """The GPU's way of decoding (each step queued before the previous step's tokens are taken in, so a
    finished sequence runs one step past its end) forced on the CPU: the same tokens as ``generate``, and a
    request that fills its KV slot to the last position (prompt + max_tokens = the context) keeps its
    extra step inside the slot."""
    loaded = from_objects(build_tiny_model(family, len(tokenizer), n_layers=2), tokenizer, name=f"tiny-{family}")
    engine = Engine(loaded, None, EngineConfig(max_input_tokens=64, max_new_tokens=NEW_TOKENS,
                                               kv_cache_tokens=12 * 128), embedding_layer=1)
    engine.scheduler.step_ahead = True
    stats = check_equal(engine, make_prompts(engine, 24))
    assert stats["tokens"] > 0

    prompt = make_prompts(engine, 1, lengths=(engine.context_len - NEW_TOKENS - engine.bos.prepend,))[0]
    assert len(prompt) + NEW_TOKENS == engine.context_len
    [ref] = greedy_reference(engine.loaded, [prompt], NEW_TOKENS, eos_ids_of(engine.loaded.model, tokenizer))

    async def one():
        await engine.astart()
        try:
            return await engine.generate(GenerationRequest(prompt_ids=prompt, max_tokens=NEW_TOKENS, temperature=0))
        finally:
            await engine.astop()

    out = asyncio.run(one())
    assert out.token_ids == ref[: len(out.token_ids)] and len(out.token_ids) == min(len(ref), NEW_TOKENS)
    assert engine.stepper.pool.n_used == 0
