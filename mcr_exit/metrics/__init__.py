"""Pure metric functions on tensors: no model, no I/O."""

from mcr_exit.metrics.attention import AttentionStats, attention_head_stats, summarize_heads
from mcr_exit.metrics.spectral import SpectralStats, spectral_stats
from mcr_exit.metrics.correlation import delta_correlation, fisher_z_mean

__all__ = [
    "AttentionStats",
    "SpectralStats",
    "attention_head_stats",
    "delta_correlation",
    "fisher_z_mean",
    "spectral_stats",
    "summarize_heads",
]
