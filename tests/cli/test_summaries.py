"""What the commands print: one phase formatter for analyze and serve, position 0 named for what it is,
readable perplexities, every MTEB task's score."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from mcr_exit.cli import main
from mcr_exit.cli.lens import lens_row_text, perplexity_text
from mcr_exit.cli.phase_text import phase_line, phase_lines, phase_summary

PHASES = {"found": True, "compress_start": 12, "refine_start": 29, "note": ""}


def test_phase_ranges_are_inclusive_and_shared():
    assert phase_lines(PHASES, 30) == ["mix      hidden 0..11", "compress hidden 12..28  (40%..97% of depth)",
                                       "refine   hidden 29..30"]
    assert phase_line(PHASES, 30) == ("mix hidden 0..11; compress hidden 12..28 (40%..97% of depth); "
                                      "refine hidden 29..30")
    assert phase_lines({"found": False, "note": "no massive activation"}, 30) == [
        "phases not found: no massive activation"]


def _result(bos_token):
    phases = SimpleNamespace(found=True, massive_activation_layer=12, entropy_valley_layer=12, sink_surge_layer=12,
                             peak_norm_ratio=180.5, min_entropy=0.021, carrier="norm", carrier_norm_share=0.999,
                             corr_bos_entropy=-0.83, corr_bos_sink_lag1=0.75)
    reason = "prepended" if bos_token else "--bos none: no special tokens; position 0 is the first text token"
    profile = {"n_layers": 30, "model": {"name": "m"}, "data": {"n_prompts": 3, "name": "d"},
               "bos": {"token": bos_token, "reason": reason}, "phases": PHASES, "embedding_layer": 20,
               "embedding_layer_source": {"reason": "midpoint"}}
    return SimpleNamespace(profile=profile, phases=phases, output_dir="out", run_id=None, seconds=1.0)


def test_bos_none_summary_does_not_call_position_0_bos():
    text = phase_summary(_result(None))
    assert "BOS" not in text
    assert "peak norm ratio position 0 (first text token) / other tokens 180.5" in text
    assert "compress hidden 12..28" in text
    with_bos = phase_summary(_result("<|im_start|>"))
    assert "peak norm ratio position 0 (<|im_start|>) / other tokens 180.5" in with_bos


def test_not_found_note_does_not_call_position_0_bos():
    import numpy as np

    from mcr_exit.analysis.phases import detect_phases

    L = 4
    p = detect_phases(bos_norm=np.ones(L + 1), norm_ratio=np.full(L + 1, 1.1), entropy=np.ones(L + 1),
                      entropy_norm=np.full(L + 1, 0.5), sink_rate=np.zeros(L), c=np.ones(L + 1), alpha=np.zeros(L + 1))
    line = phase_lines(p.as_dict(), L)[0]
    assert line.startswith("phases not found: no massive activation: peak position-0/other norm ratio")
    assert "BOS" not in line


def test_serve_prints_the_phases_as_analyze_does(tmp_path, tiny_llama_dir, monkeypatch):
    pytest.importorskip("fastapi")
    import mcr_exit.cli.serve as serve_module

    out = tmp_path / "a"
    r = CliRunner().invoke(main, ["analyze", "--model", str(tiny_llama_dir), "--max-prompts", "4", "--no-mlflow",
                                  "--no-plots", "--output-dir", str(out)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    profile = json.loads((out / "phase_profile.json").read_text())
    profile["phases"].update(found=True, compress_start=1, refine_start=2)  # a random model has none
    (out / "phase_profile.json").write_text(json.dumps(profile))
    monkeypatch.setattr(serve_module, "run_server", lambda *a, **k: None)  # no real server, no real port
    r = CliRunner().invoke(main, ["serve", "--model", str(tiny_llama_dir), "--port", "0",
                                  "--profile", str(out / "phase_profile.json")], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "mix hidden 0..0; compress hidden 1..1 (33%..67% of depth); refine hidden 2..3" in r.output
    assert phase_line(profile["phases"], 3) in r.output


def test_lens_perplexity_is_readable_at_any_size():
    huge = 905728844781413946228429757835184960815759360.0
    row = lens_row_text({"layer": 0, "cross_entropy": 103.5, "perplexity": huge, "entropy": 1.2}, 30)
    assert "9.057e+44" in row and "905728844781413946228429757835184960815759360" not in row
    assert len(row) < 80
    assert perplexity_text(12.345).strip() == "12.3"
