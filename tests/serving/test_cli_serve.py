"""`mcr-exit serve` wiring: a real start on a tiny model folder, a foreign profile, a missing vLLM."""

from __future__ import annotations

import importlib.util

import httpx
import pytest
from click.testing import CliRunner

from mcr_exit.cli import main
from tests.serving.conftest import make_profile, running_server


def test_serve_starts_and_answers(tmp_path, tiny_llama_dir, monkeypatch):
    import mcr_exit.cli.serve as serve_module

    profile = make_profile(tmp_path / "phase_profile.json", name=tiny_llama_dir.name, model_type="llama",
                           n_layers=3, hidden_size=64, k=1)
    seen = {}

    def fake_run(app, engine, *, host, port, **_):  # run the real app on a free port instead of blocking on 8000
        seen["bind"], seen["engine"] = (host, port), engine
        with running_server(app) as url:
            seen["models"] = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer k"}).json()
            seen["noauth"] = httpx.get(url + "/v1/models").status_code

    monkeypatch.setattr(serve_module, "run_server", fake_run)
    # the default address is checked as given; whether 8000 is free on this machine is not this test's business
    monkeypatch.setattr("mcr_exit.cli.serve_checks.check_listen_address", lambda host, port: None)
    monkeypatch.setenv("MCR_EXIT_API_KEY", "k")
    r = CliRunner().invoke(main, ["serve", "--model", str(tiny_llama_dir), "--profile", str(profile),
                                  "--kv-cache-tokens", "8192", "--max-input-tokens", "100", "--max-new-tokens", "28"])
    assert r.exit_code == 0, r.output
    cfg = seen["engine"].config
    assert (cfg.kv_cache_tokens, cfg.max_input_tokens, cfg.max_new_tokens) == (8192, 100, 28)
    assert seen["models"]["data"][0]["mcr_exit"]["kv_cache"]["kv_slots"] == 64  # 8192 // 128, capped by max_running
    assert seen["bind"] == ("127.0.0.1", 8000)  # loopback by default
    assert seen["models"]["data"][0]["mcr_exit"]["embedding_layer"] == 1 and seen["noauth"] == 401


def test_serve_refuses_a_profile_of_another_model(tmp_path, tiny_llama_dir):
    profile = make_profile(tmp_path / "phase_profile.json", name="SmolLM2-135M-Instruct", model_type="llama",
                           n_layers=30, hidden_size=576, k=12)
    r = CliRunner().invoke(main, ["serve", "--model", str(tiny_llama_dir), "--profile", str(profile)])
    assert r.exit_code == 1 and "made for another model" in r.output


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed here")
def test_engine_vllm_without_vllm_names_the_extra(tmp_path):
    r = CliRunner().invoke(main, ["serve", "--engine", "vllm", "--profile", str(tmp_path / "p.json")])
    assert r.exit_code == 1 and "pip install 'mcr-exit[vllm]'" in r.output


def _serve(tmp_path, tiny_llama_dir, monkeypatch, *args, env_key=None):
    """Invoke `serve` with run_server replaced by a probe of the real app; (result, what the probe saw)."""
    import mcr_exit.cli.serve as serve_module

    profile = make_profile(tmp_path / "phase_profile.json", name=tiny_llama_dir.name, model_type="llama",
                           n_layers=3, hidden_size=64, k=1)
    seen = {}

    def fake_run(app, engine, *, host, port, **_):
        with running_server(app) as url:
            seen["bare"] = httpx.get(url + "/v1/models").status_code
            seen["keyed"] = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer from-file"}).status_code
            seen["docs"] = httpx.get(url + "/openapi.json").status_code

    monkeypatch.setattr(serve_module, "run_server", fake_run)
    if env_key is None:
        monkeypatch.delenv("MCR_EXIT_API_KEY", raising=False)
    else:
        monkeypatch.setenv("MCR_EXIT_API_KEY", env_key)
    r = CliRunner().invoke(main, ["serve", "--model", str(tiny_llama_dir), "--profile", str(profile),
                                  "--kv-cache-tokens", "1024", "--max-input-tokens", "64", "--max-new-tokens", "16",
                                  "--port", "0", *args])
    return r, seen


def test_api_key_from_a_file_and_no_warning_then(tmp_path, tiny_llama_dir, monkeypatch):
    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    r, seen = _serve(tmp_path, tiny_llama_dir, monkeypatch, "--api-key-file", str(key_file), "--host", "0.0.0.0")
    assert r.exit_code == 0, r.output
    assert seen == {"bare": 401, "keyed": 200, "docs": 401}
    assert "from-file" not in r.output and "warning" not in r.output


def test_warns_without_a_key_off_loopback(tmp_path, tiny_llama_dir, monkeypatch):
    r, seen = _serve(tmp_path, tiny_llama_dir, monkeypatch, "--host", "0.0.0.0", "--no-docs")
    assert r.exit_code == 0, r.output
    assert "warning: serving on 0.0.0.0 without an API key" in r.output
    assert seen == {"bare": 200, "keyed": 200, "docs": 404}
    r, _ = _serve(tmp_path, tiny_llama_dir, monkeypatch, "--host", "::1")
    assert r.exit_code == 0 and "warning" not in r.output


@pytest.mark.parametrize("content, env_key, message", [
    ("", None, "holds no key"),
    ("k\n", "also-env", "give the API key once"),
])
def test_bad_api_key_file_is_refused(tmp_path, tiny_llama_dir, monkeypatch, content, env_key, message):
    key_file = tmp_path / "key"
    key_file.write_text(content)
    r, seen = _serve(tmp_path, tiny_llama_dir, monkeypatch, "--api-key-file", str(key_file), env_key=env_key)
    assert r.exit_code == 1 and message in r.output and not seen
