"""mteb --profile: the profile is read before the model loads and rewritten after the results are written."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from mcr_exit.cli import main


def _profile(path, n_layers):
    path.write_text(json.dumps({
        "schema": "mcr-exit/phase-profile", "schema_version": 1, "model": {"name": "tiny"}, "n_layers": n_layers,
        "phases": {"found": False}, "embedding_layer": 1, "layers": [],
        "embedding_layer_source": {"method": "compress_phase_midpoint", "reason": "default"}}))
    return path


def test_mteb_profile_is_rewritten_with_the_best_layer(tiny_llama_dir, mteb_files, tmp_path):
    pytest.importorskip("mteb")
    profile = _profile(tmp_path / "phase_profile.json", 3)
    r = CliRunner().invoke(main, ["mteb", "--model", str(tiny_llama_dir), "--no-mlflow", "--layers", "0:3:3",
                                  "--custom-task", f"classification:{mteb_files['classification']}",
                                  "--profile", str(profile), "--output-dir", str(tmp_path / "m")])
    assert r.exit_code == 0, r.output
    result = json.loads((tmp_path / "m" / "mteb.json").read_text())["result"]
    doc = json.loads(profile.read_text())
    best = result["layers"][max(range(2), key=lambda i: (result["mean_score"][i], -i))]
    assert doc["embedding_layer"] == best and doc["embedding_layer_source"]["method"] == "mteb_main_score"
    assert doc["embedding_layer_source"]["previous"]["embedding_layer"] == 1
    assert f"embedding_layer = hidden {best}" in r.output
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging leftovers


def test_mteb_missing_profile_fails_before_the_model_loads(mteb_files, tmp_path, monkeypatch):
    pytest.importorskip("mteb")

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the profile was read")

    monkeypatch.setattr("mcr_exit.cli.mteb_eval.load_for_eval", no_model)
    r = CliRunner().invoke(main, ["mteb", "--no-mlflow",
                                  "--custom-task", f"classification:{mteb_files['classification']}", "--profile", str(tmp_path / "nope.json"), "--output-dir", str(tmp_path / "m")])
    assert isinstance(r.exception, SystemExit) and r.exit_code == 1, r.output
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: cannot read phase profile")
    assert not (tmp_path / "m").exists()
