"""GPTNeoXAdapter: Pythia-style parallel residual, blocks under gpt_neox.layers."""

from mcr_exit.models.adapters.gpt_neox import GPTNeoXAdapter
from tests.models.adapters.contract import check_adapter
from tests.tiny import build_tiny_model


def test_gpt_neox(tokenizer):
    model = build_tiny_model("gpt_neox", len(tokenizer))
    adapter = check_adapter(model, GPTNeoXAdapter, "gptneox")
    assert adapter.blocks[0] is model.gpt_neox.layers[0] and adapter.ln_final is model.gpt_neox.final_layer_norm
