"""The downstream commands end to end on a tiny Llama folder; bad input is one line and exit code 1."""

import json

import pytest
from click.testing import CliRunner

from mcr_exit.cli import main


def _run(args):
    return CliRunner().invoke(main, args, catch_exceptions=False)


@pytest.fixture
def corpus(tmp_path):
    p = tmp_path / "corpus.txt"
    p.write_text("The quick brown fox jumps over the lazy dog.\nA bee lives in a hive with thousands of others.\n" * 8)
    return p


def test_lens_logs_per_layer_series_to_mlflow(tiny_llama_dir, corpus, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    r = _run(["lens", "--model", str(tiny_llama_dir), "--data", str(corpus), "--window", "32", "--max-windows", "4",
              "--output-dir", str(tmp_path / "out"), "--tracking-uri", uri, "--experiment", "t"])
    assert r.exit_code == 0, r.output
    doc = json.loads((tmp_path / "out" / "lens.json").read_text())
    assert [row["layer"] for row in doc["rows"]] == [0, 1, 2, 3]
    assert (tmp_path / "out" / "lens.png").exists()
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    run = client.search_runs([client.get_experiment_by_name("t").experiment_id])[0]
    hist = client.get_metric_history(run.info.run_id, "lens/perplexity")
    assert sorted(m.step for m in hist) == [0, 1, 2, 3] and run.info.status == "FINISHED"


def test_probe_mteb_lmeval_and_choose(tiny_llama_dir, sentiment_tsv, mteb_files, mc_file, tmp_path):
    common = ["--model", str(tiny_llama_dir), "--no-mlflow"]
    r = _run(["probe", *common, "--train", str(sentiment_tsv), "--output-dir", str(tmp_path / "p")])
    assert r.exit_code == 0, r.output
    assert len(json.loads((tmp_path / "p" / "probe.json").read_text())["rows"]) == 4
    r = _run(["mteb", *common, "--custom-task", f"classification:{mteb_files['classification']}",
              "--custom-task", f"sts:{mteb_files['sts']}", "--layers", "0:3:3", "--output-dir", str(tmp_path / "m")])
    assert r.exit_code == 0, r.output
    rows = [line for line in r.stdout.splitlines() if line.strip().startswith("hidden")]
    assert len(rows) == 2  # hidden 0 and 3, each with the mean and every task's score
    assert all("McrExitClassification_cls" in row and "McrExitSts_sts" in row for row in rows)
    r = _run(["lmeval", *common, "--task-file", str(mc_file), "--layers", "1,3", "--limit", "3",
              "--output-dir", str(tmp_path / "l")])
    assert r.exit_code == 0, r.output
    profile = tmp_path / "phase_profile.json"
    profile.write_text(json.dumps({
        "schema": "mcr-exit/phase-profile", "schema_version": 1, "model": {"name": "tiny"}, "n_layers": 3,
        "phases": {"found": False}, "embedding_layer": 1, "layers": [],
        "embedding_layer_source": {"method": "compress_phase_midpoint", "reason": "default"}}))
    r = _run(["choose-layer", "--profile", str(profile), "--probe", str(tmp_path / "p" / "probe.json"),
              "--mteb", str(tmp_path / "m" / "mteb.json"), "--lmeval", str(tmp_path / "l" / "lmeval.json")])
    assert r.exit_code == 0, r.output
    doc = json.loads(profile.read_text())
    assert doc["embedding_layer_source"]["method"] == "mteb_main_score" and doc["embedding_layer"] in (0, 3)
    assert (tmp_path / "figure8_downstream.png").exists()


@pytest.mark.parametrize("args, message", [
    (["probe", "--train", "{tsv}", "--label-field", "polarity"], "labels column 'polarity' not found"),
    (["probe", "--train", "{one}"], "single class"),
    (["mteb", "--task", "NoSuchTaskXyz"], "mteb does not know the task 'NoSuchTaskXyz'"),
    (["lens", "--data", "{corpus}", "--layers", "0,7"], "layer 7 is out of range"),
    (["lens", "--data", "{short}", "--window", "256"], "corpus too short for one window"),
    (["lmeval", "--layers", "12"], "layer 12 is out of range"),
])
def test_bad_input_is_one_line(args, message, tiny_llama_dir, sentiment_tsv, corpus, tmp_path):
    one = tmp_path / "one.tsv"
    one.write_text("sentence\tlabel\na\t1\nb\t1\n")
    short = tmp_path / "short.txt"
    short.write_text("too short\n")
    paths = {"{tsv}": sentiment_tsv, "{one}": one, "{corpus}": corpus, "{short}": short}
    args = [str(paths.get(a, a)) for a in args] + ["--model", str(tiny_llama_dir), "--no-mlflow",
                                                    "--output-dir", str(tmp_path / "o")]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1, r.output
    err = r.output.strip().splitlines()
    assert message in err[-1] and err[-1].startswith("Error:")


def test_mteb_column_names_batch_size_and_pooling_alias(tiny_llama_dir, sentiment_rows, tmp_path):
    from tests.evaluation.conftest import write_jsonl

    path = write_jsonl(tmp_path / "renamed.jsonl", [{"review": r["sentence"], "polarity": r["label"]}
                                                     for r in sentiment_rows])
    out = tmp_path / "m"
    r = _run(["mteb", "--model", str(tiny_llama_dir), "--no-mlflow", "--custom-task", f"classification:{path}",
              "--text-field", "review", "--label-field", "polarity", "--batch-size", "3", "--pooling", "mean_no_bos",
              "--layers", "1", "--output-dir", str(out)])
    assert r.exit_code == 0, r.output
    config = json.loads((out / "mteb.json").read_text())["result"]["config"]
    assert config["batch_size"] == 3 and config["pooling"] == "mean_no_first" and config["max_length"] == 512
    assert "McrExitClassification_renamed" in r.output
    assert "mteb: 100%" in r.stderr  # a progress bar over layers x tasks
    bad = CliRunner().invoke(main, ["mteb", "--model", str(tiny_llama_dir), "--no-mlflow",
                                    "--custom-task", f"classification:{path}"])
    assert bad.exit_code == 1
    assert bad.output.strip().splitlines()[-1].startswith("Error:") and "column 'text' not found" in bad.output
    bad = CliRunner().invoke(main, ["probe", "--train", str(path), "--pooling", "max"])
    assert bad.exit_code == 2 and len(bad.output.strip().splitlines()) == 1 and "mean_no_first" in bad.output
