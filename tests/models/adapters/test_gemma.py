"""GemmaAdapter: sandwich norms (the MLP branch writes post_feedforward_layernorm's output) and the final
logit soft-cap, which lives in the adapter, so every lens and early exit applies it."""

import torch

from mcr_exit.models.adapters.gemma import Gemma1Adapter, GemmaAdapter
from tests.models.adapters.contract import check_adapter
from tests.tiny import build_tiny_model


def test_gemma3(tokenizer):
    model = build_tiny_model("gemma3", len(tokenizer))
    adapter = check_adapter(model, GemmaAdapter, "gemma")
    assert adapter.mlp_residual(0) is model.model.layers[0].post_feedforward_layernorm


def test_final_soft_cap_matches_the_models_own_logits(tokenizer):
    model = build_tiny_model("gemma3", len(tokenizer))
    with torch.no_grad():  # large logits, so that a cap of 0.5 changes them a lot
        model.lm_head.weight.mul_(50.0)
    model.config.final_logit_softcapping = 0.5
    adapter = check_adapter(model, GemmaAdapter, "gemma")  # equal to model(...).logits, capped
    h = torch.randn(2, 64) * 10
    assert adapter.final_logits(h).abs().max() <= 0.5
    assert adapter.unembed(adapter.ln_final(h)).abs().max() > 0.5


def test_gemma1_is_registered_without_sandwich_norm():
    assert Gemma1Adapter.model_types == ("gemma",) and Gemma1Adapter.mlp_residual_name == "mlp"
