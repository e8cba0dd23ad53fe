"""Checkpoint sweeps over local checkpoint folders (DIR/<revision>/: no Hub here), then `compare`."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from mcr_exit.analysis.compare import pooled_correlations
from mcr_exit.analysis.sweeps import checkpoint_steps, parse_revisions, resolve_checkpoint, training_step
from mcr_exit.cli import main
from mcr_exit.errors import ConfigError
from tests.tiny import build_tiny_model


def test_revision_parsing():
    assert parse_revisions(["step1000,step8000", "step1000", " main "]) == ["step1000", "step8000", "main"]
    assert training_step("step143000") == 143000
    assert training_step("pythia-ckpt_12") == 12
    assert training_step("main") is None
    assert checkpoint_steps(["step10", "main", "step5"]) == {"step10": 10.0, "main": 12.0, "step5": 5.0}
    assert resolve_checkpoint("EleutherAI/pythia-410m", "step1000") == ("EleutherAI/pythia-410m", "step1000")
    with pytest.raises(ConfigError):
        parse_revisions([","])


def test_pooled_correlations_fisher_z():
    import pandas as pd

    t = pd.DataFrame({"corr_bos_entropy": [-0.9, -0.8, float("nan")], "corr_bos_sink_lag1": [0.5, 0.7, 0.6]})
    p = pooled_correlations(t)
    assert p["corr_bos_entropy_n"] == 2 and p["corr_bos_sink_lag1_n"] == 3
    assert -0.9 < p["corr_bos_entropy_fisher_mean"] < -0.8


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("ckpts")
    for k, rev in enumerate(["step100", "step200"]):
        model = build_tiny_model("gpt_neox", len(tokenizer), seed=k)
        model.save_pretrained(root / rev)
        tokenizer.save_pretrained(root / rev)
    return root


@pytest.fixture(scope="module")
def sweep(checkpoints, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    res = CliRunner().invoke(main, [
        "sweep", "--model", str(checkpoints), "--revision", "step200,step100", "--max-prompts", "3",
        "--max-length", "32", "--output-dir", str(tmp / "out"), "--tracking-uri", uri, "--experiment", "sw"],
        catch_exceptions=False)
    return res, tmp, uri


def test_sweep_one_run_per_checkpoint(sweep):
    res, tmp, uri = sweep
    assert res.exit_code == 0, res.output
    assert (tmp / "out" / "training_sweep.png").exists() and (tmp / "out" / "sweep.csv").exists()
    assert (tmp / "out" / "step100" / "phase_profile.json").exists()
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("sw").experiment_id])
    parent = [r for r in runs if r.data.tags.get("mcr_exit.command") == "sweep"]
    children = [r for r in runs if r.data.tags.get("mcr_exit.command") == "analyze"]
    assert len(parent) == 1 and len(children) == 2
    assert {r.data.params["revision"] for r in children} == {"step100", "step200"}
    assert all(r.data.tags["mlflow.parentRunId"] == parent[0].info.run_id for r in children)
    assert [m.step for m in client.get_metric_history(parent[0].info.run_id, "checkpoint/min_entropy")] == [100, 200]


def test_compare_experiment_logs_its_own_run(sweep, tmp_path):
    _, _, uri = sweep
    res = CliRunner().invoke(main, ["compare", "--experiment", "sw", "--tracking-uri", uri,
                                    "--output-dir", str(tmp_path / "cmp")], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "@step100" in res.output and "@step200" in res.output and "Fisher-z mean over" in res.output
    doc = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert len(doc["runs"]) == 2 and "corr_bos_entropy_fisher_mean" in doc["pooled"]
    assert (tmp_path / "cmp" / "relative_depth.png").exists()
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("sw").experiment_id],
                              "tags.`mcr_exit.command` = 'compare'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    by_run = CliRunner().invoke(main, ["compare", "--run", doc["runs"][0]["run_id"], "--tracking-uri", uri,
                                       "--no-mlflow", "--no-plots", "--output-dir", str(tmp_path / "c2")])
    assert by_run.exit_code == 0, by_run.output


@pytest.mark.parametrize("args, message", [
    (["--run", "0123456789abcdef0123456789abcdef"], "Error: MLflow run '0123456789abcdef0123456789abcdef' does not exist"),
    (["--experiment", "nope"], "Error: MLflow experiment 'nope' does not exist"),
    (["--run-model", "no-such-model", "--experiment", "sw"], "Error: no finished analyze run of model 'no-such-model'"),
])
def test_compare_bad_input(sweep, tmp_path, args, message):
    _, _, uri = sweep
    res = CliRunner().invoke(main, ["compare", "--tracking-uri", uri, "--output-dir", str(tmp_path / "x"), *args])
    assert res.exit_code == 1
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), res.output


def test_sweep_missing_checkpoint(checkpoints, tmp_path):
    res = CliRunner().invoke(main, ["sweep", "--model", str(checkpoints), "--revision", "step300", "--no-mlflow",
                                    "--output-dir", str(tmp_path / "o")])
    assert res.exit_code == 1 and "step300 does not exist" in res.output
