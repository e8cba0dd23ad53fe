"""Decode steps through torch.compile of the blocks (what a GPU server captures) give the eager logits.

One compiled graph must serve every block: a recompile per block would make start-up scale with depth.
"""

from __future__ import annotations

import pytest
import torch

from mcr_exit.models.loading import from_objects
from mcr_exit.serving.kv_pool import KVPool
from mcr_exit.serving.model_step import ModelStepper
from tests.tiny import build_tiny_model, build_tokenizer


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_compiled_decode_equals_eager(family):
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    tok = build_tokenizer()
    loaded = from_objects(build_tiny_model(family, len(tok), n_layers=6), tok)
    stepper = ModelStepper(loaded)
    pool = KVPool(stepper.layer_shapes(), n_slots=4, slot_len=64, dtype=torch.float32, device=torch.device("cpu"))
    stepper.attach(pool)
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14], [20, 21, 22]]
    steps = [([3, 4], [10, 3]), ([7, 8], [11, 4]), ([9, 10, 11], [12, 5, 0])]
    with torch.inference_mode():
        def run():
            out = [stepper.prefill(prompts, [0, 1])]
            return out + [stepper.decode(t, p) for t, p in steps]

        eager = run()
        stepper.enable_compile()
        counters.clear()
        compiled = run()
        run()  # the same shapes again: no new graph
    for a, b in zip(eager, compiled):
        assert a.shape == b.shape
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    # per block: the part before the KV write and the part after it; batch 2 and 3 share one dynamic graph
    assert 0 < counters["stats"]["unique_graphs"] <= 8, dict(counters["stats"])
    # compiled modules are only switched on inside decode steps: prefill and embeddings run eagerly
    assert all(m._compiled_call_impl is None for m, _ in stepper.compiled)
    assert "update" not in vars(stepper.cache)
