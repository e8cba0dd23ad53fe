"""`mcr-exit serve` checks what needs no model first, each in one line: a bad profile, a port out of
range, a port already taken. The model path below does not exist, so reaching the model load would
give another error."""

from __future__ import annotations

import socket

import pytest
from click.testing import CliRunner

from mcr_exit.cli import main
from tests.analysis.test_phase_profile import BAD_PROFILE_MESSAGES, _bad_profile_files
from tests.serving.conftest import make_profile

NO_MODEL = "/no/such/model"


def _serve(*args):
    return CliRunner().invoke(main, ["serve", "--model", NO_MODEL, *args])


def _one_line(res, text):
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
    assert res.exit_code == 1 and len(lines) == 1 and text in lines[0], res.output


@pytest.mark.parametrize("name", sorted(BAD_PROFILE_MESSAGES))
def test_hostile_profiles_give_one_line_before_the_model_loads(tmp_path, name):
    path = _bad_profile_files(tmp_path)[name]
    _one_line(_serve("--profile", str(path), "--port", "0"), BAD_PROFILE_MESSAGES[name])


@pytest.mark.parametrize("port", ["99999", "-1", "65536"])
def test_a_port_out_of_range_gives_one_line(tmp_path, port):
    profile = make_profile(tmp_path / "p.json", name="m", model_type="llama", n_layers=3, hidden_size=64, k=1)
    _one_line(_serve("--profile", str(profile), "--port", port), "--port must be in 0..65535")


def test_a_port_in_use_is_found_before_the_model_loads(tmp_path):
    profile = make_profile(tmp_path / "p.json", name="m", model_type="llama", n_layers=3, hidden_size=64, k=1)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        _one_line(_serve("--profile", str(profile), "--port", str(port)), f"cannot listen on 127.0.0.1:{port}")


def test_an_unknown_host_gives_one_line(tmp_path):
    profile = make_profile(tmp_path / "p.json", name="m", model_type="llama", n_layers=3, hidden_size=64, k=1)
    _one_line(_serve("--profile", str(profile), "--host", "no-such-host.invalid", "--port", "0"), "--host")


def test_a_note_when_the_server_would_run_on_the_slow_stack(monkeypatch):
    """uvloop and httptools missing: the operator is told which loop and parser run, and what to install."""
    import importlib.util

    from mcr_exit.cli import serve_checks

    real = importlib.util.find_spec
    assert serve_checks.server_stack() == ("uvloop", "httptools")  # the serve extra installs both
    assert serve_checks.stack_note() is None
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "httptools" else real(name, *a))
    note = serve_checks.stack_note()
    assert serve_checks.server_stack() == ("uvloop", "h11")
    assert note.startswith("note: httptools not installed") and "h11 parser" in note and "pip install httptools" in note
