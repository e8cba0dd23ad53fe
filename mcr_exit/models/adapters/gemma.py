"""Gemma 2/3: sandwich norms, so the MLP branch adds post_feedforward_layernorm(mlp(.)) to the residual."""

from mcr_exit.models.adapters.base import ArchitectureAdapter, register


@register
class GemmaAdapter(ArchitectureAdapter):
    model_types = ("gemma2", "gemma3_text", "gemma3")
    mlp_residual_name = "post_feedforward_layernorm"


@register
class Gemma1Adapter(ArchitectureAdapter):
    """Gemma 1 has no sandwich norm: the MLP output is added as is."""

    model_types = ("gemma",)
