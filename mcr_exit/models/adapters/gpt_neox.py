"""GPT-NeoX / Pythia: parallel residual by default; the MLP output at a position is still one additive term."""

from mcr_exit.models.adapters.base import ArchitectureAdapter, register


@register
class GPTNeoXAdapter(ArchitectureAdapter):
    model_types = ("gpt_neox",)
    backbone_path = "gpt_neox"
    embed_path = "gpt_neox.embed_in"
    blocks_path = "gpt_neox.layers"
    ln_final_path = "gpt_neox.final_layer_norm"
    unembed_path = "lm_head|embed_out"
    attn_name = "attention"
    mlp_name = "mlp"
    mlp_residual_name = "mlp"
