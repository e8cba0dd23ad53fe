"""Figures in the style of the paper: Figure 1 triptych, Figure 3/15 bounds, Figure 6 head maps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _phase_marks(ax, phases: dict) -> None:
    if not phases.get("found"):
        return
    ax.axvspan(phases["compress_start"] - 0.5, phases["refine_start"] - 0.5, color="tab:orange", alpha=0.08)
    for key in ("compress_start", "refine_start"):
        ax.axvline(phases[key] - 0.5, color="gray", ls=":", lw=1)


def _band(ax, x, table: pd.DataFrame, key: str, label: str, color: str) -> None:
    m, s = table[key].to_numpy(), table[f"{key}_std"].to_numpy()
    ax.plot(x, m, color=color, marker="o", ms=3, label=label)
    ax.fill_between(x, m - s, m + s, color=color, alpha=0.2)


def plot_triptych(table: pd.DataFrame, phases: dict, title: str, path: Path) -> Path:
    """Normalized entropy, BOS sink rate and BOS vs other-token norms across depth (paper Figure 1)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    x = table["index"].to_numpy()
    _band(axes[0], x, table, "entropy_norm", "normalized entropy", "tab:blue")
    axes[0].set(xlabel="hidden index i", ylabel="H(X) / log min(T, d)", title="Matrix entropy", ylim=(0, None))
    xa = x[:-1]
    sr = table.iloc[:-1]
    axes[1].plot(xa, sr["sink_rate"], color="tab:red", marker="o", ms=3, label="sink rate")
    axes[1].fill_between(xa, sr["sink_rate"] - sr["sink_rate_std"], sr["sink_rate"] + sr["sink_rate_std"],
                         color="tab:red", alpha=0.2)
    axes[1].plot(xa, sr["mixing_score"], color="tab:green", ls="--", label="mixing score")
    axes[1].set(xlabel="attention block j (reads hidden j)", ylabel="share of heads", title="BOS sink rate",
                ylim=(-0.02, 1.02))
    axes[1].legend(fontsize=8)
    _band(axes[2], x, table, "bos_norm", "BOS (position 0)", "tab:orange")
    _band(axes[2], x, table, "other_norm", "other tokens (mean)", "tab:gray")
    axes[2].set(xlabel="hidden index i", ylabel="L2 norm", title="Token norms", yscale="log")
    axes[2].legend(fontsize=8)
    for ax in axes:
        _phase_marks(ax, phases)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_bounds(table: pd.DataFrame, phases: dict, title: str, path: Path) -> Path:
    """Theorem 1 terms and Corollary 2 bounds against measured values (paper Figures 3 and 15)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 4, figsize=(19, 4))
    x = table["index"].to_numpy()
    ax = axes[0]
    ax.plot(x, table["frob_sq"], label=r"$\|X\|_F^2 = M + R$", color="black")
    ax.plot(x, table["sigma1_sq"], label=r"$\sigma_1^2$", color="tab:blue", marker="o", ms=3)
    ax.plot(x, table["sigma1_sq_bound"], label=r"$M + \alpha R$ (Thm. 1)", color="tab:green", ls="--")
    ax.plot(x, table["M"], label=r"$M = \|x_0\|^2$", color="tab:gray", ls=":")
    ax.set(yscale="log", title="Theorem 1", xlabel="hidden index i")
    panels = [
        (axes[1], "dominance", r"$\sigma_1^2 / \sum_{j\geq2}\sigma_j^2$", "log"),
        (axes[2], "anisotropy", r"anisotropy $p_1$", "linear"),
        (axes[3], "entropy", "entropy H(X) [nats]", "linear"),
    ]
    for ax, key, label, scale in panels:
        ax.plot(x, table[key], label="measured", color="tab:blue", marker="o", ms=3)
        ax.plot(x, table[f"{key}_bound"], label=r"bound ($\alpha$ form)", color="tab:green", ls="--")
        ax.plot(x, table[f"{key}_bound_weak"], label=r"weak bound ($\alpha = 0$)", color="tab:gray", ls=":")
        ax.set(title=label, yscale=scale, xlabel="hidden index i")
    for ax in axes:
        _phase_marks(ax, phases)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title + " (bounds from per-prompt values, averaged)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_head_maps(maps: dict[tuple[int, int], np.ndarray], title: str, path: Path) -> Path:
    """Attention maps of representative heads across depth (paper Figure 6)."""
    plt = _plt()
    keys = sorted(maps)
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 4), squeeze=False)
    for ax, (block, head) in zip(axes[0], keys):
        a = maps[(block, head)]
        ax.imshow(np.power(a, 0.5), cmap="viridis", vmin=0, vmax=1)
        ax.set(title=f"block {block}, head {head}", xlabel="key", ylabel="query")
    fig.suptitle(title + " (sqrt of attention weights)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def representative_heads(heads: pd.DataFrame, phases: dict, n_layers: int) -> dict[int, list[int]]:
    """One head per phase: most mixing early, most sink-like mid, most diagonal late."""
    if phases.get("found"):
        early = max(0, phases["compress_start"] // 2)
        mid = (phases["compress_start"] + phases["refine_start"]) // 2
        late = min(n_layers - 1, max(phases["refine_start"], n_layers - 1))
    else:
        early, mid, late = 0, n_layers // 2, n_layers - 1
    pick: dict[int, list[int]] = {}
    for block, key in ((early, "mixing_score"), (mid, "sink_score"), (late, "diag_score")):
        rows = heads[heads["block"] == block]
        head = int(rows.loc[rows[key].idxmax(), "head"])
        pick.setdefault(block, []).append(head)
    return pick
