"""Gemma 1/2/3. Gemma 2/3 use sandwich norms, so the MLP branch adds post_feedforward_layernorm(mlp(.))
to the residual; Gemma 2 (and any config that sets it) soft-caps its final logits."""

import torch

from mcr_exit.models.adapters.base import ArchitectureAdapter, register


class _GemmaFamily(ArchitectureAdapter):
    def logits_from_normed(self, normed: torch.Tensor) -> torch.Tensor:
        """Unembedding, then the final soft-cap cap * tanh(logits / cap) when configured."""
        logits = super().logits_from_normed(normed)
        cap = getattr(getattr(self.model, "config", None), "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits


@register
class GemmaAdapter(_GemmaFamily):
    model_types = ("gemma2", "gemma3_text", "gemma3")
    mlp_residual_name = "post_feedforward_layernorm"


@register
class Gemma1Adapter(_GemmaFamily):
    """Gemma 1 has no sandwich norm: the MLP output is added as is."""

    model_types = ("gemma",)
