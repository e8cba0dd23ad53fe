"""GPT2Adapter: learned absolute positions, blocks under transformer.h."""

from mcr_exit.models.adapters.gpt2 import GPT2Adapter
from tests.models.adapters.contract import check_adapter
from tests.tiny import build_tiny_model


def test_gpt2(tokenizer):
    model = build_tiny_model("gpt2", len(tokenizer))
    adapter = check_adapter(model, GPT2Adapter, "gpt2")
    assert adapter.attn(1) is model.transformer.h[1].attn and adapter.embed is model.transformer.wte
