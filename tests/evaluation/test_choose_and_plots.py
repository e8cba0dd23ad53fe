import pytest

from mcr_exit.errors import DataError
from mcr_exit.evaluation.choose import apply_evidence, best_layer, embedding_evidence
from mcr_exit.evaluation.plots import figure8


def _profile(L=4):
    return {"n_layers": L, "embedding_layer": 2, "phases": {"found": True, "compress_start": 1, "refine_start": 3},
            "embedding_layer_source": {"method": "compress_phase_midpoint", "reason": "default"}}


def _mteb_doc(scores):
    layers = list(range(len(scores)))
    return {"kind": "mteb", "n_layers": len(scores) - 1, "model": {"name": "m"}, "data": {"name": "t"},
            "rows": [{"layer": k, "mean_main_score": s, "T": s} for k, s in zip(layers, scores)],
            "result": {"tasks": ["T"], "layers": layers, "mean_score": scores, "main_score": {"T": scores}}}


def test_best_layer_earliest_on_ties():
    assert best_layer([0, 1, 2, 3], [0.1, 0.5, 0.5, None]) == 1


def test_evidence_moves_the_embedding_layer():
    doc = apply_evidence(_profile(), embedding_evidence(mteb=_mteb_doc([0.1, 0.2, 0.3, 0.9, 0.4])))
    assert doc["embedding_layer"] == 3
    src = doc["embedding_layer_source"]
    assert src["method"] == "mteb_main_score" and src["tasks"] == ["T"] and src["scores"]["3"] == 0.9
    assert src["previous"]["embedding_layer"] == 2
    again = apply_evidence(doc, embedding_evidence(mteb=_mteb_doc([0.9, 0.2, 0.3, 0.1, 0.4])))
    assert again["embedding_layer"] == 0 and again["embedding_layer_source"]["previous"]["embedding_layer"] == 2
    assert apply_evidence(_profile(), embedding_evidence()) == _profile()  # no evidence: default stays
    with pytest.raises(DataError, match="another model"):
        apply_evidence(_profile(L=2), embedding_evidence(mteb=_mteb_doc([0.1, 0.2, 0.3, 0.9, 0.4])))


def _span(ax, label):
    """(x0, x1) of the patch with this label (axvspan: a Rectangle or a Polygon, by matplotlib version)."""
    import numpy as np

    patch = next(p for p in ax.patches if p.get_label() == label)
    if hasattr(patch, "get_width"):
        return float(patch.get_x()), float(patch.get_x() + patch.get_width())
    xs = np.asarray(patch.get_xy())[:, 0]
    return float(xs.min()), float(xs.max())


def _line(ax, label):
    return next(line for line in ax.lines if line.get_label() == label)


def test_figure8_shows_the_curves_against_depth_with_the_phase_shaded(tmp_path):
    import matplotlib.pyplot as plt

    from mcr_exit.evaluation.plots import draw_figure8

    lens = {"kind": "lens", "n_layers": 4, "model": {"name": "m"}, "data": {"name": "wiki"},
            "rows": [{"layer": k, "perplexity": 10.0 ** (4 - k)} for k in range(5)]}
    mteb = _mteb_doc([0.1, 0.2, 0.3, 0.9, 0.4])
    fig = draw_figure8(lens=lens, mteb=mteb, profile=_profile())
    try:
        axes = fig.axes
        assert [ax.get_title() for ax in axes] == ["LogitLens, wiki", "MTEB (custom tasks)"]
        assert all(ax.get_xlabel() == "relative depth (hidden index / L)" for ax in axes)
        assert axes[0].get_yscale() == "log" and axes[0].get_ylabel() == "LogitLens perplexity"
        ppl = _line(axes[0], "perplexity")
        assert list(ppl.get_xdata()) == [0.0, 0.25, 0.5, 0.75, 1.0]
        assert list(ppl.get_ydata()) == [1e4, 1e3, 1e2, 1e1, 1.0]
        assert list(_line(axes[1], "mean").get_ydata()) == [0.1, 0.2, 0.3, 0.9, 0.4]
        assert list(_line(axes[1], "T").get_xdata()) == [0.0, 0.25, 0.5, 0.75, 1.0]
        for ax in axes:  # compress phase hidden 1..2 of 4 shaded, embedding layer (hidden 2) dotted
            assert _span(ax, "_compress phase") == pytest.approx((0.25, 0.75))
            assert list(_line(ax, "_embedding layer").get_xdata()) == [0.5, 0.5]
        assert fig._suptitle.get_text() == "m: downstream performance across depth"
    finally:
        plt.close(fig)
    unshaded = draw_figure8(lens=lens, profile={**_profile(), "phases": {"found": False}})
    assert not unshaded.axes[0].patches
    plt.close(unshaded)
    out = figure8(lens=lens, out=tmp_path / "f.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
