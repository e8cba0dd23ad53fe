"""`mcr-exit analyze` in-process on a tiny model, with a real MLflow SQLite store read back."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from mcr_exit.cli import main


@pytest.fixture
def store(tmp_path):
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    rows = [{"text": f"The quick brown fox number {i} jumps over the lazy dog. " * (1 + i % 3), "label": i % 2}
            for i in range(6)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def _run(args):
    return CliRunner().invoke(main, args, catch_exceptions=False)


def test_analyze_writes_outputs_and_a_complete_mlflow_run(tmp_path, tiny_llama_dir, store, prompts_file):
    import mlflow

    out = tmp_path / "out"
    res = _run(["analyze", "--model", str(tiny_llama_dir), "--data", str(prompts_file), "--field", "text",
                "--output-dir", str(out), "--tracking-uri", store, "--experiment", "tiny", "--batch-size", "4"])
    assert res.exit_code == 0, res.output
    assert "embedding layer" in res.output and "MLflow run" in res.output
    files = {p.name for p in out.iterdir()}
    assert {"phase_profile.json", "layers.csv", "per_prompt.csv.gz", "per_head.csv", "figure1_triptych.png",
            "bounds.png", "attention_maps.png"} <= files
    doc = json.loads((out / "phase_profile.json").read_text())
    assert doc["schema"] == "mcr-exit/phase-profile" and doc["schema_version"] == 1
    L = doc["n_layers"]
    assert L == 3 and len(doc["layers"]) == L + 1
    for row in doc["layers"][:L]:
        for key in ("bos_norm", "other_norm", "norm_ratio", "entropy", "entropy_norm", "anisotropy",
                    "anisotropy_bound", "sink_rate", "sink_score", "mixing_score"):
            assert key in row, key
    assert "sink_rate" not in doc["layers"][L]
    assert doc["bos"]["position0_tokens"] == {"<bos>": 6} and "prepended" in doc["bos"]["reason"]
    assert 0 <= doc["embedding_layer"] <= L

    client = mlflow.MlflowClient(tracking_uri=store)
    run = client.get_run(doc["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    p = run.data.params
    for key in ("model", "revision", "dtype", "attn_implementation", "bos_policy", "bos_token", "max_length",
                "tau", "dataset_name", "dataset_sha256", "n_prompts", "package_version"):
        assert key in p, key
    assert p["n_prompts"] == "6" and p["bos_token"] == "<bos>" and p["tau"] == "0.3"
    history = client.get_metric_history(run.info.run_id, "hidden/entropy")
    assert sorted(m.step for m in history) == list(range(L + 1))
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "attention/sink_rate")) == list(range(L))
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"phase_profile.json", "layers.csv", "figure1_triptych.png"} <= artifacts
    assert run.inputs.dataset_inputs[0].dataset.name == "prompts"
    assert run.inputs.dataset_inputs[0].dataset.digest == p["dataset_sha256"][:36]


def test_a_failed_analysis_is_a_failed_run_and_leaves_no_outputs(tmp_path, tiny_llama_dir, store, monkeypatch):
    import mlflow

    import mcr_exit.analysis.run as run_module

    def boom(*a, **k):
        raise RuntimeError("simulated failure mid-run")

    monkeypatch.setattr(run_module, "collect_statistics_distributed", boom)
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["analyze", "--model", str(tiny_llama_dir), "--output-dir", str(out),
                                    "--tracking-uri", store, "--max-prompts", "2"])
    assert res.exit_code != 0
    assert not out.exists() and not list(tmp_path.glob(".out.*"))
    runs = mlflow.MlflowClient(tracking_uri=store).search_runs(
        [mlflow.MlflowClient(tracking_uri=store).get_experiment_by_name("mcr-exit").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--model", "/no/such/model"], "model path does not exist"),
        (["--tau", "0"], "--tau must be in (0, 1]"),
        (["--tau", "1.5"], "--tau must be in (0, 1]"),
        (["--device", "cuda:7"], "not available"),
        (["--data", "EMPTY"], "is empty"),
        (["--data", "PROMPTS", "--field", "nope"], "field 'nope' not found"),
        (["--data", "BLANKS"], "empty after tokenization"),
        (["--model", "BADGGUF"], "corrupt GGUF"),
        (["--spectra", "fast"], "Invalid value for '--spectra'"),
    ],
)
def test_bad_input_gives_one_line_and_nonzero_exit(tmp_path, tiny_llama_dir, prompts_file, args, message):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "blanks.txt").write_text("   \n\t\n")
    (tmp_path / "blank.jsonl").write_text('{"text": ""}\n{"text": ""}\n')
    (tmp_path / "bad.gguf").write_bytes(b"GGUF" + b"\x00" * 8)
    subst = {"EMPTY": str(tmp_path / "empty.jsonl"), "PROMPTS": str(prompts_file),
             "BLANKS": str(tmp_path / "blank.jsonl"), "BADGGUF": str(tmp_path / "bad.gguf")}
    args = [subst.get(a, a) for a in args]
    if "--model" not in args:
        args = ["--model", str(tiny_llama_dir), *args]
    res = CliRunner().invoke(main, ["analyze", *args, "--no-mlflow", "--output-dir", str(tmp_path / "o")])
    assert res.exit_code != 0
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and message in lines[0], res.output
    assert not (tmp_path / "o").exists()


def test_every_option_has_help():
    res = _run(["analyze", "--help"])
    for opt in ("--model", "--revision", "--dtype", "--device", "--bos", "--data", "--field", "--max-prompts",
                "--max-length", "--tau", "--tracking-uri"):
        assert opt in res.output
