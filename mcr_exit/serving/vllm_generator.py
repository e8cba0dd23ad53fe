"""Optional generation backend on vLLM (``--engine vllm``, extra ``[vllm]``).

Embeddings never go through vLLM: they stay on the early-exit path of the engine's transformers copy
(vLLM runs one task per engine and cannot stop at block k). GPU memory is therefore split: the
transformers copy of the weights plus its embedding activations first, then vLLM takes
``gpu_memory_utilization`` of the *total* GPU memory for its own weights and KV cache, so that
fraction must leave room for the first part (see docs/serving.md).
"""

from __future__ import annotations

import importlib.util

from mcr_exit.errors import MissingExtraError
from mcr_exit.serving.jobs import GenerationOutput, GenerationRequest


def require_vllm() -> None:
    if importlib.util.find_spec("vllm") is None:
        raise MissingExtraError("vllm", "vllm")


class VllmGenerator:
    """Batched generation through ``vllm.LLM``; streaming requests get their text in one piece."""

    def __init__(self, model: str, *, tokenizer: str | None = None, dtype: str = "auto",
                 gpu_memory_utilization: float = 0.5, tensor_parallel_size: int = 1,
                 max_model_len: int | None = None):
        require_vllm()
        from vllm import LLM

        kwargs = {"model": model, "dtype": dtype, "gpu_memory_utilization": gpu_memory_utilization,
                  "tensor_parallel_size": tensor_parallel_size}
        if tokenizer:
            kwargs["tokenizer"] = tokenizer
        if max_model_len:
            kwargs["max_model_len"] = max_model_len
        self.llm = LLM(**kwargs)

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationOutput]:
        from vllm import SamplingParams

        params = [SamplingParams(temperature=r.temperature, top_p=r.top_p, max_tokens=r.max_tokens,
                                 stop=list(r.stop) or None, seed=r.seed) for r in requests]
        prompts = [{"prompt_token_ids": r.prompt_ids} for r in requests]
        results = self.llm.generate(prompts, params, use_tqdm=False)
        outputs = []
        for r, res in zip(requests, results):
            c = res.outputs[0]
            if r.on_text is not None and c.text:
                r.on_text(c.text)
            outputs.append(GenerationOutput(text=c.text, token_ids=list(c.token_ids),
                                            prompt_tokens=len(r.prompt_ids), completion_tokens=len(c.token_ids),
                                            finish_reason="length" if c.finish_reason == "length" else "stop"))
        return outputs
