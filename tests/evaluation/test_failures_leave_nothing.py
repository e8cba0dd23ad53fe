"""A downstream command that fails once its MLflow run is open leaves no output folder (nor a staging
folder beside it) and a FAILED run; choose-layer that fails while writing leaves the profile as it was."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from mcr_exit.cli import main


class Boom(RuntimeError):
    pass


def _runs(uri: str, experiment: str):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id]) if exp else []


def _command_args(kind, tiny_llama_dir, sentiment_tsv, mteb_files, mc_file, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The quick brown fox jumps over the lazy dog.\n" * 40)
    extra = {
        "lens": ["--data", str(corpus), "--window", "16", "--max-windows", "2"],
        "probe": ["--train", str(sentiment_tsv)],
        "mteb": ["--custom-task", f"classification:{mteb_files['classification']}"],
        "lmeval": ["--task-file", str(mc_file), "--limit", "2"],
    }[kind]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return [kind, "--model", str(tiny_llama_dir), *extra, "--layers", "1", "--output-dir", str(tmp_path / "out"),
            "--tracking-uri", uri, "--experiment", "fail"], uri


def _assert_nothing_left(tmp_path, uri):
    assert not (tmp_path / "out").exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no staging folder either
    runs = _runs(uri, "fail")
    assert len(runs) == 1 and runs[0].info.status == "FAILED"


@pytest.mark.parametrize("kind, function", [
    ("lens", "run_lens"), ("probe", "run_probe"), ("mteb", "run_mteb"), ("lmeval", "run_lmeval"),
])
def test_a_failure_in_the_work_leaves_no_folder_and_a_failed_run(
        kind, function, tiny_llama_dir, sentiment_tsv, mteb_files, mc_file, tmp_path, monkeypatch):
    if kind == "mteb":
        pytest.importorskip("mteb")
    from mcr_exit.evaluation import commands
    from mcr_exit.tracking import command_run_logger

    opened = []

    def fails_midway(cfg, loaded, *args, **kwargs):
        opened.append(command_run_logger())  # the command's run is open before the work starts
        raise Boom("the work failed halfway")

    monkeypatch.setattr(commands, function, fails_midway)
    args, uri = _command_args(kind, tiny_llama_dir, sentiment_tsv, mteb_files, mc_file, tmp_path)
    r = CliRunner().invoke(main, args)
    assert isinstance(r.exception, Boom), r.output
    assert opened and opened[0] is not None
    _assert_nothing_left(tmp_path, uri)


def test_a_failure_while_writing_leaves_no_folder_and_a_failed_run(tiny_llama_dir, sentiment_tsv, mteb_files,
                                                                    mc_file, tmp_path, monkeypatch):
    """The curve is computed and lens.json is already written into the staging folder when the figure fails."""
    from mcr_exit.evaluation import plots

    written = []

    def figure_fails(*, out, **curves):
        written.extend(p.name for p in out.parent.iterdir())
        raise Boom("cannot draw")

    monkeypatch.setattr(plots, "figure8", figure_fails)
    args, uri = _command_args("lens", tiny_llama_dir, sentiment_tsv, mteb_files, mc_file, tmp_path)
    r = CliRunner().invoke(main, args)
    assert isinstance(r.exception, Boom), r.output
    assert {"lens.json", "lens.csv"} <= set(written)
    _assert_nothing_left(tmp_path, uri)


def _profile(path):
    path.write_text(json.dumps({
        "schema": "mcr-exit/phase-profile", "schema_version": 1, "model": {"name": "tiny"}, "n_layers": 4,
        "phases": {"found": False}, "embedding_layer": 2, "layers": [],
        "embedding_layer_source": {"method": "compress_phase_midpoint", "reason": "default"}}, indent=1))
    return path.read_text()


def _probe_curve(path):
    path.write_text(json.dumps({
        "schema": "mcr-exit/downstream-curve", "kind": "probe", "model": {"name": "tiny"}, "n_layers": 4,
        "data": {"name": "sst"}, "rows": [{"layer": k, "train_accuracy": 1.0, "test_accuracy": a}
                                          for k, a in zip(range(5), [0.5, 0.9, 0.6, 0.7, 0.6])],
        "result": {"layers": list(range(5)), "test_accuracy": [0.5, 0.9, 0.6, 0.7, 0.6], "majority_baseline": 0.5}}))
    return path


def test_choose_layer_failing_to_draw_leaves_the_profile_unchanged(tmp_path, monkeypatch):
    from mcr_exit.evaluation import plots

    profile = tmp_path / "phase_profile.json"
    before = _profile(profile)
    curve = _probe_curve(tmp_path / "probe.json")

    def figure_fails(*, out, **curves):
        out.write_bytes(b"half a png")
        raise Boom("cannot draw")

    monkeypatch.setattr(plots, "figure8", figure_fails)
    r = CliRunner().invoke(main, ["choose-layer", "--profile", str(profile), "--probe", str(curve)])
    assert isinstance(r.exception, Boom)
    assert profile.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["phase_profile.json", "probe.json"]
    monkeypatch.undo()
    r = CliRunner().invoke(main, ["choose-layer", "--profile", str(profile), "--probe", str(curve)])
    assert r.exit_code == 0, r.output
    assert json.loads(profile.read_text())["embedding_layer"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["figure8_downstream.png", "phase_profile.json", "probe.json"]
