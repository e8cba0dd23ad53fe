"""The cross-model table against the paper's claims, and the Figure 2-like overlays against relative depth.

    python analysis/cross-model/report.py            # after analysis/cross-model/run.sh for each model

Reads analysis/cross-model/<model>/{analyze,ablate,lens,lmeval,probe-*,mteb-*}/ and writes, next to this file,
claims.json (every number of analysis/README.md's tables), figure2_overlay.png (massive activation,
entropy, sinks, mixing against relative depth) and downstream_overlay.png (LogitLens, lm-eval, probe, MTEB).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from mcr_exit.metrics.correlation import fisher_z_interval, fisher_z_pooled  # noqa: E402

MODELS = {"smollm2-135m": "SmolLM2-135M-Instruct", "qwen2.5-coder-0.5b": "Qwen2.5-Coder-0.5B-Instruct"}
COLORS = {"smollm2-135m": "tab:blue", "qwen2.5-coder-0.5b": "tab:red"}
POOLINGS = ("mean_no_first", "mean_no_massive")


def _csv(path: Path) -> pd.DataFrame | None:
    return pd.read_csv(path) if path.exists() else None


def _json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def model_numbers(short: str) -> dict:
    """Every number of one model that the README's table reads."""
    base = HERE / short
    prof = _json(base / "analyze" / "phase_profile.json")
    out: dict = {"model": MODELS[short]}
    if prof is None:
        return out
    L, ph = prof["n_layers"], prof["phases"]
    layers = pd.DataFrame(prof["layers"])
    out.update(n_layers=L, n_prompts=prof["data"]["n_prompts"], bos=prof["bos"], phases_found=ph["found"],
               compress_start=ph["compress_start"], refine_start=ph["refine_start"],
               compress_start_frac=ph["fractions"]["compress_start"],
               refine_start_frac=ph["fractions"]["refine_start"],
               peak_norm_ratio=ph["peak_norm_ratio"], min_entropy=ph["min_entropy"],
               peak_bos_norm=float(layers["bos_norm"].max()), massive=prof.get("massive_activations", {}))
    # correlations: L differences of L + 1 hidden states; the lagged pair has L - 1 (no block reads hidden L)
    for key, n in (("corr_bos_entropy", L), ("corr_bos_sink_lag1", L - 1)):
        r = ph[key]
        out[key] = {"r": r, "n": n, "ci95": list(fisher_z_interval(r, n))}
    if ph["found"]:
        c, rf = ph["compress_start"], ph["refine_start"]
        mix = layers["mixing_score"]
        out["mixing_before"] = float(mix.iloc[:c].mean()) if c > 0 else float(mix.iloc[0])
        out["mixing_compress"] = float(mix.iloc[c:rf].mean())
        out["mixing_refine"] = float(mix.iloc[rf:L].mean()) if rf < L else None
        out["sink_rate_compress"] = float(layers["sink_rate"].iloc[c:rf].mean())
    out["embedding_layer_midpoint"] = prof["embedding_layer"]
    lens = _csv(base / "lens" / "lens.csv")
    if lens is not None:
        ppl = lens.set_index("layer")["perplexity"]
        half = int(ppl.index[np.argmin(np.abs(ppl.index / L - 0.5))])
        out["lens"] = {"ppl_hidden1": float(ppl.get(1, np.nan)), "ppl_half": float(ppl[half]), "half_layer": half,
                       "ppl_last": float(ppl[L]), "max_ppl_after_0": float(ppl.iloc[1:].max()),
                       "argmax_after_0": int(ppl.iloc[1:].idxmax())}
    lm = _csv(base / "lmeval" / "lmeval.csv")
    if lm is not None:
        acc = lm[[c for c in lm.columns if c.endswith("/acc")]].mean(axis=1)
        out["lmeval"] = {"layers": lm["layer"].tolist(), "mean_acc": acc.round(4).tolist(),
                         "best_layer": int(lm["layer"][acc.idxmax()]), "acc_last": float(acc.iloc[-1])}
    for pooling in POOLINGS:
        probe = _csv(base / f"probe-{pooling}" / "probe.csv")
        if probe is not None:
            best = int(probe["test_accuracy"].idxmax())
            out[f"probe_{pooling}"] = {
                "best_layer": int(probe["layer"][best]), "best_frac": float(probe["layer"][best] / L),
                "best_acc": float(probe["test_accuracy"][best]), "mean_acc": float(probe["test_accuracy"].mean()),
                "acc_last": float(probe["test_accuracy"].iloc[-1]),
                "acc_at_midpoint": float(probe.set_index("layer")["test_accuracy"].get(prof["embedding_layer"], np.nan))}
        mteb = _csv(base / f"mteb-{pooling}" / "mteb.csv")
        if mteb is not None:
            best = int(mteb["mean_main_score"].idxmax())
            out[f"mteb_{pooling}"] = {
                "best_layer": int(mteb["layer"][best]), "best_frac": float(mteb["layer"][best] / L),
                "best_score": float(mteb["mean_main_score"][best]), "mean_score": float(mteb["mean_main_score"].mean()),
                "score_at_midpoint": float(mteb.set_index("layer")["mean_main_score"].get(prof["embedding_layer"], np.nan)),
                "per_task_best": {c: float(mteb[c].max()) for c in mteb.columns if c not in ("layer", "mean_main_score")}}
    abl = _csv(base / "ablate" / "summary.csv")
    if abl is not None:
        out["ablation"] = abl.to_dict(orient="records")
    chosen = _json(base / "phase_profile.json")
    if chosen is not None:
        out["embedding_layer_chosen"] = chosen["embedding_layer"]
        out["embedding_layer_method"] = chosen["embedding_layer_source"]["method"]
    return out


def pooled(numbers: list[dict]) -> dict:
    res = {}
    for key in ("corr_bos_entropy", "corr_bos_sink_lag1"):
        have = [m[key] for m in numbers if key in m]
        r, lo, hi = fisher_z_pooled([h["r"] for h in have], [h["n"] for h in have])
        res[key] = {"r": r, "ci95": [lo, hi], "models": len(have)}
    return res


def plot_overlay(shorts: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("norm_ratio", "position-0 norm / mean other norm", True), ("entropy_norm", "normalized matrix entropy", False),
              ("sink_rate", "sink rate (tau = 0.3)", False), ("mixing_score", "mixing score", False)]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for short in shorts:
        prof = _json(HERE / short / "analyze" / "phase_profile.json")
        if prof is None:
            continue
        layers, L = pd.DataFrame(prof["layers"]), prof["n_layers"]
        x = layers["index"] / L
        for ax, (key, title, log) in zip(axes, panels):
            ax.plot(x, layers[key], color=COLORS[short], marker=".", label=f"{MODELS[short]} (L = {L})")
            if log:
                ax.set_yscale("log")
            ax.set_title(title, fontsize=10)
            if prof["phases"]["found"]:
                for b in (prof["phases"]["compress_start"], prof["phases"]["refine_start"]):
                    ax.axvline(b / L, color=COLORS[short], ls=":", lw=1)
    for ax in axes:
        ax.set_xlabel("relative depth (hidden index / L)")
        ax.axvspan(0.2, 0.85, color="0.9", zorder=0)
    axes[0].legend(fontsize=8)
    fig.suptitle("GSM8K train, 500 prompts: both models against relative depth (grey: the paper's Phase 2, "
                 "20-85 %; dotted: each model's detected compress phase)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_downstream(shorts: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for short in shorts:
        base, prof = HERE / short, _json(HERE / short / "analyze" / "phase_profile.json")
        if prof is None:
            continue
        L, color, label = prof["n_layers"], COLORS[short], MODELS[short]
        lens = _csv(base / "lens" / "lens.csv")
        if lens is not None:
            lens = lens[lens["layer"] >= 1]  # hidden 0 (embeddings through the head) is off scale: ~1e42
            axes[0].plot(lens["layer"] / L, lens["perplexity"], color=color, marker=".", label=label)
        lm = _csv(base / "lmeval" / "lmeval.csv")
        if lm is not None:
            acc = lm[[c for c in lm.columns if c.endswith("/acc")]].mean(axis=1)
            axes[1].plot(lm["layer"] / L, acc, color=color, marker=".", label=label)
        for pooling, ls in zip(POOLINGS, ("-", "--")):
            probe = _csv(base / f"probe-{pooling}" / "probe.csv")
            if probe is not None:
                axes[2].plot(probe["layer"] / L, probe["test_accuracy"], color=color, ls=ls, label=f"{label}, {pooling}")
            mteb = _csv(base / f"mteb-{pooling}" / "mteb.csv")
            if mteb is not None:
                axes[3].plot(mteb["layer"] / L, mteb["mean_main_score"], color=color, ls=ls, label=f"{label}, {pooling}")
    titles = ["LogitLens perplexity, WikiText-2 (hidden >= 1)", "lm-eval via LogitLens, mean acc (3 tasks)",
              "linear probe, SST-2 test accuracy", "MTEB custom tasks, mean main score"]
    for ax, title in zip(axes, titles):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("relative depth")
        ax.axvspan(0.25, 0.75, color="0.9", zorder=0)
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=7)
    axes[3].legend(fontsize=6)
    fig.suptitle("Downstream tasks against relative depth (grey: 25-75 %, where the paper finds embedding tasks peak)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> None:
    shorts = [s for s in MODELS if (HERE / s).exists()]
    numbers = [model_numbers(s) for s in shorts]
    doc = {"models": dict(zip(shorts, numbers)), "pooled": pooled(numbers)}
    (HERE / "claims.json").write_text(json.dumps(doc, indent=2, default=float) + "\n")
    plot_overlay(shorts, HERE / "figure2_overlay.png")
    plot_downstream(shorts, HERE / "downstream_overlay.png")
    print(json.dumps(doc["pooled"], indent=2))


if __name__ == "__main__":
    main()
