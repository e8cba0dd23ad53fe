"""`mcr-exit ablate` end to end on a tiny Llama folder, with a real MLflow sqlite store."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from mcr_exit.cli import main


def _invoke(args):
    return CliRunner().invoke(main, args, catch_exceptions=False)


@pytest.fixture(scope="module")
def ablate_run(tiny_llama_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ablate")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    out = tmp / "out"
    res = _invoke(["ablate", "--model", str(tiny_llama_dir), "--blocks", "0-1", "--clip", "0.5,2",
                   "--max-prompts", "4", "--max-length", "48", "--output-dir", str(out),
                   "--tracking-uri", uri, "--experiment", "abl"])
    return res, out, uri


def test_outputs_and_runs(ablate_run):
    res, out, uri = ablate_run
    assert res.exit_code == 0, res.output
    assert "ablated blocks 0,1" in res.output
    for name in ("summary.csv", "side_by_side.csv", "ablation.json", "ablation_overlay.png", "clip_sweep.png"):
        assert (out / name).exists(), name
    doc = json.loads((out / "ablation.json").read_text())
    assert doc["blocks"] == [0, 1] and doc["spike_layer"] == 2
    assert [r["kind"] for r in doc["summary"]] == ["baseline", "ablate", "clip", "clip"]
    assert doc["summary"][0]["delta_loss"] == 0.0
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("abl")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("mcr_exit.command") == "ablate"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(parents) == 1 and len(children) == 4
    assert all(r.info.status == "FINISHED" for r in runs)
    assert "summary/delta_loss" in parents[0].data.metrics
    hist = client.get_metric_history(children[1].info.run_id, "hidden/entropy")
    assert len(hist) == 4  # hidden 0..3 of the 3-block model


@pytest.mark.parametrize("args, message", [
    (["--blocks", "7"], "Error: block 7 is out of range: this model has blocks 0..2"),
    (["--blocks", "1", "--clip", "0"], "Error: clipping value must be > 0, got 0"),
    (["--blocks", "1", "--clip", "-3,5"], "Error: clipping value must be > 0, got -3"),
])
def test_bad_input_is_one_line(tiny_llama_dir, tmp_path, args, message):
    res = CliRunner().invoke(main, ["ablate", "--model", str(tiny_llama_dir), "--max-prompts", "2", "--no-mlflow",
                                    "--output-dir", str(tmp_path / "o"), *args])
    assert res.exit_code != 0
    assert res.output.strip().splitlines() == [message]


def test_auto_without_spike_is_a_clear_error(tiny_llama_dir, tmp_path):
    res = CliRunner().invoke(main, ["ablate", "--model", str(tiny_llama_dir), "--max-prompts", "2", "--no-mlflow",
                                    "--output-dir", str(tmp_path / "o")])
    assert res.exit_code == 1
    assert "--blocks auto: no MLP builds a massive activation" in res.output
    assert len(res.output.strip().splitlines()) == 1


def test_position0_without_special_token_is_said(tiny_llama_dir, tmp_path):
    res = _invoke(["ablate", "--model", str(tiny_llama_dir), "--blocks", "0", "--bos", "none", "--max-prompts", "2",
                   "--max-length", "32", "--no-mlflow", "--no-plots", "--output-dir", str(tmp_path / "o")])
    assert res.exit_code == 0
    assert "position 0 holds no special token in 2 of 2 prompts" in res.output
