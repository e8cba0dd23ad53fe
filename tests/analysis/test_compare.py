"""`compare` against a real MLflow sqlite store: every configuration of a model is a row (issue 16, bug 1),
and the runs follow one naming scheme (run names, tags, metric prefixes, experiment kind)."""

from __future__ import annotations

import json
import os
import stat

import pytest
from click.testing import CliRunner

from mcr_exit.cli import main


def _run(args):
    return CliRunner().invoke(main, args, catch_exceptions=False)


@pytest.fixture(scope="module")
def store(tiny_llama_dir, tmp_path_factory):
    """Three analyze runs of one model: default BOS, --bos none, then default BOS again."""
    tmp = tmp_path_factory.mktemp("compare")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    old = os.umask(0o022)
    try:
        for k, bos in enumerate(["auto", "none", "auto"]):
            res = _run(["analyze", "--model", str(tiny_llama_dir), "--bos", bos, "--max-prompts", "3",
                        "--max-length", "32", "--no-plots", "--tracking-uri", uri, "--experiment", "e",
                        "--output-dir", str(tmp / f"run{k}")])
            assert res.exit_code == 0, res.output
    finally:
        os.umask(old)
    return tmp, uri


def _client(uri):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=uri)


def test_compare_keeps_every_configuration_of_a_model(store, tmp_path):
    tmp, uri = store
    res = _run(["compare", "--experiment", "e", "--tracking-uri", uri, "--output-dir", str(tmp_path / "c"),
                "--no-plots"])
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "c" / "comparison.json").read_text())
    assert sorted(r["bos_policy"] for r in doc["runs"]) == ["auto", "none"]  # the latest of each configuration
    labels = [r["label"] for r in doc["runs"]]
    assert len(set(labels)) == 2 and any("bos_policy=none" in lab for lab in labels), labels
    client = _client(uri)
    exp = client.get_experiment_by_name("e")
    (cmp_run,) = client.search_runs([exp.experiment_id], "tags.`mcr_exit.command` = 'compare'")
    assert cmp_run.info.run_name.startswith("compare 2 runs")
    assert cmp_run.data.params["n_runs"] == "2"
    assert "summary/corr_bos_entropy_fisher_mean" in cmp_run.data.metrics
    newest_auto = client.search_runs([exp.experiment_id], "params.bos_policy = 'auto'",
                                     order_by=["attributes.start_time DESC"])[0]
    assert newest_auto.info.run_id in {r["run_id"] for r in doc["runs"]}


def test_analyze_runs_follow_the_naming_scheme(store):
    _, uri = store
    client = _client(uri)
    exp = client.get_experiment_by_name("e")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = client.search_runs([exp.experiment_id], "tags.`mcr_exit.command` = 'analyze'")
    names = {r.info.run_name for r in runs}
    assert any("bos=none" in n for n in names) and any("bos=auto" in n for n in names), names
    run = runs[0]
    for part in (run.data.params["model"], "data=mcr-exit-builtin", run.data.params["dtype"]):
        assert part in run.info.run_name
    tags = run.data.tags
    assert tags["mcr_exit.model"] == run.data.params["model"] and tags["mcr_exit.bos"] in ("auto", "none")
    assert {"mcr_exit.data", "mcr_exit.dtype", "mcr_exit.version"} <= set(tags)
    keys = set(run.data.metrics)
    assert {"hidden/entropy_norm", "attention/sink_rate", "summary/peak_norm_ratio",
            "hidden/bos_sq_norm_M", "hidden/alignment_alpha"} <= keys
    assert all(k.split("/")[0] in ("hidden", "attention", "summary", "timing", "depth") for k in keys), keys
    assert {"timing/load_model_s", "timing/statistics_s", "timing/total_s"} <= keys  # seconds per stage
    # every per-layer series also against relative depth: same values, step = round(100 * layer / L)
    assert {k for k in keys if k.startswith("depth/")} == {f"depth/{k}" for k in keys
                                                           if k.split("/")[0] in ("hidden", "attention")}
    L = int(run.data.params["n_layers"])
    by_layer = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "hidden/entropy_norm")}
    by_depth = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "depth/hidden/entropy_norm")}
    assert by_depth == {round(100 * i / L): v for i, v in by_layer.items()} and max(by_depth) == 100
    assert "hidden/alignment_alpha" in tags["mlflow.note.content"]
    legend = client.download_artifacts(run.info.run_id, "metrics.json")
    assert "align with position 0" in json.loads(open(legend).read())["hidden/alignment_alpha"]["description"]
    # the run opened before the work: it spans the analysis and records its prompts
    span_ms = run.info.end_time - run.info.start_time
    assert span_ms + 1 >= 1000 * (run.data.metrics["timing/statistics_s"] + run.data.metrics["timing/tables_s"])
    assert run.inputs.dataset_inputs[0].dataset.name == "mcr-exit-builtin-v1"


def test_output_folders_get_the_ordinary_mode(store):
    tmp, _ = store
    assert stat.S_IMODE((tmp / "run0").stat().st_mode) == 0o755
