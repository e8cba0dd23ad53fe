"""Profiles from a file, a folder, runs:/ and models:/ (a real MLflow sqlite store); foreign profiles refused."""

from __future__ import annotations

import json

import pytest

from mcr_exit.errors import ConfigError, DataError
from mcr_exit.serving.profile_source import check_profile_fits, load_profile_source
from tests.serving.conftest import make_profile

FITS = dict(name="tiny-llama", model_type="llama", n_layers=4, hidden_size=64)


def test_file_and_folder(tiny4_profile):
    a = load_profile_source(str(tiny4_profile))
    b = load_profile_source(str(tiny4_profile.parent))
    assert a.sha256 == b.sha256 and a.embedding_layer == 2
    check_profile_fits(a, **FITS)


@pytest.mark.parametrize("change", [
    {"name": "SmolLM2-135M-Instruct"}, {"n_layers": 30}, {"hidden_size": 576}, {"model_type": "gpt2"},
])
def test_profile_for_another_model_is_refused(tmp_path, change):
    fields = {**FITS, **change}
    path = make_profile(tmp_path / "p.json", name=fields["name"], model_type=fields["model_type"],
                        n_layers=fields["n_layers"], hidden_size=fields["hidden_size"], k=2)
    with pytest.raises(ConfigError, match="made for another model"):
        check_profile_fits(load_profile_source(str(path)), **FITS)


def test_missing_and_invalid_profiles(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_profile_source(str(tmp_path / "nope.json"))
    (tmp_path / "x.json").write_text(json.dumps({"schema": "something-else"}))
    with pytest.raises(DataError, match="not a mcr-exit phase profile"):
        load_profile_source(str(tmp_path / "x.json"))


def test_runs_and_models_uris_from_mlflow(tmp_path, tiny4_profile):
    import mlflow

    from mcr_exit.tracking import tracked_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with tracked_run(tracking_uri=uri, run_name="analyze tiny-llama") as logger:
        logger.log_artifacts(tiny4_profile.parent)
        run_id = logger.run_id
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model("tiny-llama-profile")
    version = client.create_model_version("tiny-llama-profile", source=f"runs:/{run_id}", run_id=run_id)
    client.set_registered_model_alias("tiny-llama-profile", "serving", version.version)
    want = load_profile_source(str(tiny4_profile)).sha256
    for src in (f"runs:/{run_id}/phase_profile.json", "models:/tiny-llama-profile/1",
                "models:/tiny-llama-profile@serving"):
        got = load_profile_source(src, tracking_uri=uri)
        assert got.sha256 == want and got.source == src
    with pytest.raises(DataError, match="cannot download"):
        load_profile_source("models:/no-such-model/1", tracking_uri=uri)
