"""LlamaAdapter: Llama-style pre-norm decoders (Llama, Qwen2, Mistral, ...)."""

import pytest

from mcr_exit.models.adapters.llama import LlamaAdapter
from tests.models.adapters.contract import check_adapter
from tests.tiny import build_tiny_model


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_llama_style_models(tokenizer, family):
    adapter = check_adapter(build_tiny_model(family, len(tokenizer)), LlamaAdapter, "llama")
    assert adapter.mlp_residual(0) is adapter.mlp(0)


def test_declares_its_model_types():
    assert {"llama", "qwen2", "mistral"} <= set(LlamaAdapter.model_types)
