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


def test_figure8(tmp_path):
    lens = {"kind": "lens", "n_layers": 4, "model": {"name": "m"}, "data": {"name": "wiki"},
            "rows": [{"layer": k, "perplexity": 10.0 ** (4 - k)} for k in range(5)]}
    out = figure8(lens=lens, mteb=_mteb_doc([0.1, 0.2, 0.3, 0.9, 0.4]), profile=_profile(), out=tmp_path / "f.png")
    assert out.stat().st_size > 1000
