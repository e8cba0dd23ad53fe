"""Pure metric functions on tensors: no model, no I/O.

The names below load lazily, so that ``mcr_exit.metrics.registry`` (the metric names, no torch) can be
imported without torch.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "AttentionStats": "attention",
    "attention_head_stats": "attention",
    "summarize_heads": "attention",
    "SpectralStats": "spectral",
    "spectral_stats": "spectral",
    "delta_correlation": "correlation",
    "fisher_z_mean": "correlation",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"mcr_exit.metrics.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'mcr_exit.metrics' has no attribute '{name}'")
