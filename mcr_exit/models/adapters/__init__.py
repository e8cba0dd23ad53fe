"""One adapter per architecture family; importing this package registers them all."""

from mcr_exit.models.adapters import gemma, gpt2, gpt_neox, llama  # noqa: F401  (registration)
from mcr_exit.models.adapters.base import ArchitectureAdapter, adapter_for, supported_model_types

__all__ = ["ArchitectureAdapter", "adapter_for", "supported_model_types"]
