"""Architecture adapters: map role names (embed, blocks, attn, mlp, ln_final, unembed) to module paths.

One adapter per architecture family; adding an architecture means adding one file in this package that
subclasses ``ArchitectureAdapter`` and decorates it with ``register`` (the package imports every file).
"""

from __future__ import annotations

import difflib
from typing import ClassVar

import torch
from torch import nn

from mcr_exit.errors import ModelLoadError

_REGISTRY: dict[str, type[ArchitectureAdapter]] = {}


def register(cls: type[ArchitectureAdapter]) -> type[ArchitectureAdapter]:
    for model_type in cls.model_types:
        _REGISTRY[model_type] = cls
    return cls


def _resolve(root: nn.Module, path: str) -> nn.Module:
    """Follow a dotted path; ``a|b`` tries alternatives (module names change across transformers versions)."""
    if "|" in path:
        for alt in path.split("|"):
            try:
                return _resolve(root, alt)
            except ModelLoadError:
                continue
        raise ModelLoadError(f"{type(root).__name__} has none of the modules {path}: adapter does not fit this model")
    obj = root
    for part in path.split("."):
        if not hasattr(obj, part):
            raise ModelLoadError(
                f"{type(root).__name__} has no module at '{path}' (missing '{part}'): adapter does not fit this model"
            )
        obj = getattr(obj, part)
    return obj


class ArchitectureAdapter:
    """Module paths of a causal LM family, relative to the *ForCausalLM object."""

    model_types: ClassVar[tuple[str, ...]] = ()
    backbone_path: ClassVar[str] = "model"
    embed_path: ClassVar[str] = "model.embed_tokens"
    blocks_path: ClassVar[str] = "model.layers"
    ln_final_path: ClassVar[str] = "model.norm"
    unembed_path: ClassVar[str] = "lm_head"
    attn_name: ClassVar[str] = "self_attn"
    mlp_name: ClassVar[str] = "mlp"
    # The module whose output is added to the residual stream on the MLP branch (Gemma's sandwich norm).
    mlp_residual_name: ClassVar[str] = "mlp"

    def __init__(self, model: nn.Module):
        self.model = model
        self.family = type(self).__name__.removesuffix("Adapter").lower()
        blocks = _resolve(model, self.blocks_path)
        if not isinstance(blocks, (nn.ModuleList, list, tuple)) or len(blocks) == 0:
            raise ModelLoadError(f"'{self.blocks_path}' of {type(model).__name__} is not a list of blocks")
        self._blocks = list(blocks)
        for role in ("backbone", "embed", "ln_final", "unembed"):
            getattr(self, role)  # fail loudly now, not mid-run

    @property
    def n_layers(self) -> int:
        return len(self._blocks)

    @property
    def backbone(self) -> nn.Module:
        return _resolve(self.model, self.backbone_path)

    @property
    def embed(self) -> nn.Module:
        return _resolve(self.model, self.embed_path)

    @property
    def blocks(self) -> list[nn.Module]:
        return self._blocks

    @property
    def ln_final(self) -> nn.Module:
        return _resolve(self.model, self.ln_final_path)

    @property
    def unembed(self) -> nn.Module:
        return _resolve(self.model, self.unembed_path)

    def attn(self, block_index: int) -> nn.Module:
        return _resolve(self._blocks[block_index], self.attn_name)

    def mlp(self, block_index: int) -> nn.Module:
        return _resolve(self._blocks[block_index], self.mlp_name)

    def mlp_residual(self, block_index: int) -> nn.Module:
        """The module whose output the block adds to the residual stream on its MLP branch."""
        return _resolve(self._blocks[block_index], self.mlp_residual_name)

    def final_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., d) raw last-block output (or any hidden state, for a lens) -> (..., V) next-token logits:
        the final norm, then ``logits_from_normed``."""
        return self.logits_from_normed(self.ln_final(hidden))

    def logits_from_normed(self, normed: torch.Tensor) -> torch.Tensor:
        """(..., d) final-normed hidden state (the backbone's output) -> (..., V) logits: the unembedding.
        Families that post-process their logits override this."""
        return self.unembed(normed)

    def attention_index(self) -> dict[int, int]:
        """id(attention module) -> block index j (attention[j] reads hidden[j])."""
        return {id(self.attn(j)): j for j in range(self.n_layers)}


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


def adapter_for(model: nn.Module) -> ArchitectureAdapter:
    """Pick the adapter from ``config.model_type`` (GGUF-loaded configs carry no ``architectures``)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    cls = _REGISTRY.get(model_type)
    if cls is None:
        close = difflib.get_close_matches(str(model_type), _REGISTRY, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ModelLoadError(
            f"unsupported architecture '{model_type}'{hint}; supported: {', '.join(supported_model_types())}"
        )
    return cls(model)
