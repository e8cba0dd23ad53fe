"""GPT-2: learned absolute positions, blocks under transformer.h; hidden[0] = wte + wpe (block 0's input)."""

from mcr_exit.models.adapters.base import ArchitectureAdapter, register


@register
class GPT2Adapter(ArchitectureAdapter):
    model_types = ("gpt2",)
    backbone_path = "transformer"
    embed_path = "transformer.wte"
    blocks_path = "transformer.h"
    ln_final_path = "transformer.ln_f"
    unembed_path = "lm_head"
    attn_name = "attn"
    mlp_name = "mlp"
    mlp_residual_name = "mlp"
