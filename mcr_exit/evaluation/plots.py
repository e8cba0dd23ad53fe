"""The paper's Figure 8: perplexity, multiple-choice accuracy and probe accuracy against relative depth."""

from __future__ import annotations

from pathlib import Path


def _depth(doc: dict) -> list[float]:
    return [r["layer"] / doc["n_layers"] for r in doc["rows"]]


def _data_label(doc: dict) -> str:
    """'wikitext2/test' from a file source, else the recorded name."""
    data = doc.get("data", {})
    src = data.get("source") or data.get("train")
    if src and "/" in str(src):
        p = Path(str(src))
        return f"{p.parent.name}/{p.stem}"
    return str(data.get("name", ""))


def _shade_phases(ax, profile: dict | None) -> None:
    if not profile or not profile.get("phases", {}).get("found"):
        return
    L, p = profile["n_layers"], profile["phases"]
    ax.axvspan(p["compress_start"] / L, p["refine_start"] / L, color="tab:orange", alpha=0.12, lw=0,
               label="_compress phase")
    if profile.get("embedding_layer") is not None:
        ax.axvline(profile["embedding_layer"] / L, color="tab:green", ls=":", lw=1, label="_embedding layer")


def figure8(*, lens: dict | None = None, lmeval: dict | None = None, probe: dict | None = None,
            mteb: dict | None = None, profile: dict | None = None, out: str | Path) -> Path:
    """Draw Figure 8 (draw_figure8) into the file ``out``."""
    import matplotlib.pyplot as plt

    fig = draw_figure8(lens=lens, lmeval=lmeval, probe=probe, mteb=mteb, profile=profile)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=130)
    plt.close(fig)
    return out


def draw_figure8(*, lens: dict | None = None, lmeval: dict | None = None, probe: dict | None = None,
                 mteb: dict | None = None, profile: dict | None = None):
    """The matplotlib Figure: one panel per available curve against relative depth (hidden index / L);
    the compress phase is shaded (label '_compress phase'), the embedding layer dotted ('_embedding layer')."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [p for p in ("lens", "lmeval", "probe", "mteb") if {"lens": lens, "lmeval": lmeval, "probe": probe,
                                                                   "mteb": mteb}[p] is not None]
    if not panels:
        raise ValueError("figure8 needs at least one curve")
    fig, axes = plt.subplots(1, len(panels), figsize=(max(5.5, 4.2 * len(panels)), 3.6), squeeze=False)
    for ax, name in zip(axes[0], panels):
        if name == "lens":
            ppl = [r["perplexity"] for r in lens["rows"]]
            ax.plot(_depth(lens), ppl, "o-", ms=3, label="perplexity")
            ax.set_yscale("log")
            rest = max(ppl[1:]) if len(ppl) > 1 else ppl[0]
            if ppl[0] > 1e3 * rest:  # hidden 0 (embeddings through the head) is off any useful scale
                ax.set_ylim(top=rest * 30)
                ax.annotate(f"hidden 0: {ppl[0]:.0e}", (0.02, 0.95), xycoords="axes fraction", fontsize=7)
            ax.set_ylabel("LogitLens perplexity")
            ax.set_title(f"LogitLens, {_data_label(lens)}")
        elif name == "lmeval":
            keys = [k for k in lmeval["rows"][0] if k.endswith("/acc")]
            for k in keys:
                ax.plot(_depth(lmeval), [r[k] for r in lmeval["rows"]], "o-", ms=3, label=k.removesuffix("/acc"))
            ax.set_ylabel("multiple-choice accuracy (lens)")
            ax.legend(fontsize=7)
            ax.set_title("lm-eval via LogitLens")
        elif name == "probe":
            ax.plot(_depth(probe), [r["test_accuracy"] for r in probe["rows"]], "o-", ms=3, label="test")
            ax.plot(_depth(probe), [r["train_accuracy"] for r in probe["rows"]], "--", lw=1, label="train")
            ax.axhline(probe["result"]["majority_baseline"], color="gray", lw=0.8, label="majority")
            ax.set_ylabel("linear probe accuracy")
            ax.legend(fontsize=7)
            ax.set_title(f"linear probe, {_data_label(probe)}")
        else:
            for t in mteb["result"]["tasks"]:
                ax.plot(_depth(mteb), [r[t] for r in mteb["rows"]], "-", lw=1, label=t)
            ax.plot(_depth(mteb), [r["mean_main_score"] for r in mteb["rows"]], "ko-", ms=3, label="mean")
            ax.set_ylabel("MTEB main score")
            ax.legend(fontsize=6)
            ax.set_title("MTEB (custom tasks)")
        ax.set_xlabel("relative depth (hidden index / L)")
        _shade_phases(ax, profile)
        ax.grid(alpha=0.3)
    model = next(d for d in (lens, lmeval, probe, mteb) if d is not None)["model"]["name"]
    fig.suptitle(f"{model}: downstream performance across depth", fontsize=9)
    fig.tight_layout()
    return fig
