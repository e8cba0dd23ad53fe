"""Llama-style decoders: pre-norm blocks with self_attn and mlp under model.layers."""

from mcr_exit.models.adapters.base import ArchitectureAdapter, register


@register
class LlamaAdapter(ArchitectureAdapter):
    model_types = ("llama", "mistral", "qwen2", "qwen3", "olmo", "olmo2", "phi3", "smollm3", "granite")
