"""Figures for ablations (paper Figure 4, 17-18), clipping (Figure 20), checkpoint sweeps (Figure 2)
and cross-model overlays against relative depth."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, plt, title: str, path: Path) -> Path:
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _three_panels(plt):
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].set(ylabel="entropy H(X) [nats]", title="Matrix entropy")
    axes[1].set(ylabel="share of heads", title="BOS sink rate", ylim=(-0.02, 1.02))
    axes[2].set(ylabel="L2 norm", title="Token norms", yscale="log")
    for ax in axes:
        ax.grid(alpha=0.3)
    return fig, axes


def plot_ablation_overlay(tables: dict[str, pd.DataFrame], title: str, path: Path,
                          blocks: tuple[int, ...] = ()) -> Path:
    """Entropy, sink rate and BOS/other norms per layer, one line style per variant (Figure 4)."""
    plt = _plt()
    fig, axes = _three_panels(plt)
    styles = ["-", "--", ":", "-."]
    for k, (name, t) in enumerate(tables.items()):
        ls = styles[k % len(styles)]
        x = t["index"].to_numpy()
        axes[0].plot(x, t["entropy"], ls=ls, marker="o", ms=3, color="tab:blue", label=name)
        axes[1].plot(x[:-1], t["sink_rate"].to_numpy()[:-1], ls=ls, marker="o", ms=3, color="tab:red", label=name)
        axes[2].plot(x, t["bos_norm"], ls=ls, color="tab:orange", label=f"BOS, {name}")
        axes[2].plot(x, t["other_norm"], ls=ls, color="tab:gray", label=f"others, {name}")
    for j in blocks:  # block j writes hidden j+1
        for ax in axes:
            ax.axvline(j + 1, color="black", lw=0.8, alpha=0.4)
    axes[0].set_xlabel("hidden index i")
    axes[1].set_xlabel("attention block j (reads hidden j)")
    axes[2].set_xlabel("hidden index i")
    for ax in axes:
        ax.legend(fontsize=7)
    return _save(fig, plt, title, path)


def plot_clip_sweep(tables: dict[float, pd.DataFrame], summary: pd.DataFrame, title: str, path: Path) -> Path:
    """Per-layer entropy and sink rate for each clipping value, and both against the spike's size (Fig. 20)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    cmap = plt.get_cmap("viridis")
    gammas = sorted(tables)
    for k, g in enumerate(gammas):
        t = tables[g]
        c = cmap(k / max(len(gammas) - 1, 1))
        label = "no clip" if not np.isfinite(g) else f"γ={g:.3g}"
        axes[0].plot(t["index"], t["entropy"], color=c, label=label)
        axes[1].plot(t["index"].to_numpy()[:-1], t["sink_rate"].to_numpy()[:-1], color=c, label=label)
    axes[0].set(xlabel="hidden index i", ylabel="entropy [nats]", title="Entropy per clipping value")
    axes[1].set(xlabel="attention block j", ylabel="sink rate", title="Sink rate per clipping value", ylim=(-0.02, 1.02))
    axes[1].legend(fontsize=6)
    s = summary.sort_values("bos_norm_at_spike")
    ax = axes[2]
    ax.plot(s["bos_norm_at_spike"], s["mean_entropy_window"], marker="o", color="tab:blue", label="mean entropy")
    ax.set(xscale="log", xlabel="BOS norm at the spike layer", ylabel="mean entropy in compress window [nats]",
           title="Effect of the massive activation's size")
    ax2 = ax.twinx()
    ax2.plot(s["bos_norm_at_spike"], s["mean_sink_rate_window"], marker="s", color="tab:red", label="mean sink rate")
    ax2.set(ylabel="mean sink rate in window", ylim=(-0.02, 1.02))
    ax.legend(loc="upper left", fontsize=7)
    ax2.legend(loc="upper right", fontsize=7)
    for a in axes[:2]:
        a.grid(alpha=0.3)
    return _save(fig, plt, title, path)


def plot_training_sweep(tables: dict[str, pd.DataFrame], steps: dict[str, float], title: str, path: Path) -> Path:
    """Normalized entropy, sink rate and BOS norm per layer, one line per checkpoint (Figure 2)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    cmap = plt.get_cmap("plasma")
    order = sorted(tables, key=lambda r: steps[r])
    for k, rev in enumerate(order):
        t = tables[rev]
        c = cmap(k / max(len(order) - 1, 1))
        x = t["index"].to_numpy()
        axes[0].plot(x, t["entropy_norm"], color=c, label=rev)
        axes[1].plot(x[:-1], t["sink_rate"].to_numpy()[:-1], color=c, label=rev)
        axes[2].plot(x, t["bos_norm"], color=c, label=rev)
    axes[0].set(xlabel="hidden index i", ylabel="H / log min(T, d)", title="Normalized entropy")
    axes[1].set(xlabel="attention block j", ylabel="sink rate", title="Sink rate", ylim=(-0.02, 1.02))
    axes[2].set(xlabel="hidden index i", ylabel="BOS norm", title="BOS norm", yscale="log")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[2].legend(fontsize=7, title="checkpoint")
    return _save(fig, plt, title, path)


def plot_relative_depth(series: dict[str, dict[str, list[tuple[int, float]]]], n_layers: dict[str, int],
                        title: str, path: Path) -> Path:
    """Cross-model overlay: entropy_norm, sink_rate, norm_ratio against layer / L."""
    plt = _plt()
    panels = [("entropy_norm", "normalized entropy", "linear"), ("sink_rate", "sink rate", "linear"),
              ("norm_ratio", "BOS / other norm", "log")]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for label, per_key in series.items():
        L = n_layers[label]
        for ax, (key, _, _) in zip(axes, panels):
            pts = sorted(per_key.get(key, []))
            if pts:
                ax.plot([s / L for s, _ in pts], [v for _, v in pts], marker="o", ms=2, label=label)
    for ax, (key, ylabel, scale) in zip(axes, panels):
        ax.set(xlabel="relative depth (layer / L)", ylabel=ylabel, title=key, yscale=scale)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    return _save(fig, plt, title, path)
