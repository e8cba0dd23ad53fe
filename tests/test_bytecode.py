"""mcr_exit.bytecode: bytecode kept under the cache folder where the environment writes none beside the
sources, read back by the next process; nothing changed anywhere else."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _package(tmp_path: Path, *, with_pycache: bool = False) -> Path:
    """A package ``shipped`` (the probe) with one module, laid out as an install without bytecode."""
    src = tmp_path / "src"
    pkg = src / "shipped"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "mod.py").write_text("VALUE = 41 + 1\n")
    if with_pycache:
        (pkg / "__pycache__").mkdir()
    return src


def _env(tmp_path: Path, src: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPYCACHEPREFIX", "PYTHONDONTWRITEBYTECODE", "MCR_EXIT_BYTECODE")}
    env.update(PYTHONPATH=os.pathsep.join([str(src), str(ROOT)]), MCR_EXIT_CACHE=str(tmp_path / "cache"),
               PYTHONDONTWRITEBYTECODE="1", MCR_EXIT_WARM="0")
    env.update(extra)
    return {k: v for k, v in env.items() if v is not None}


_SCRIPT = (
    "import os, sys\n"
    "from mcr_exit.bytecode import keep_bytecode\n"
    "print(keep_bytecode(probe='shipped'))\n"
    "print(os.environ.get('PYTHONPYCACHEPREFIX'))\n"
    "import shipped.mod\n"
    "assert shipped.mod.VALUE == 42\n"
)


def _run(env: dict, *flags: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *flags, "-c", _SCRIPT], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc


def _pyc(cache: Path, src: Path) -> Path:
    tag = sys.implementation.cache_tag
    return cache / "pycache" / src.resolve().relative_to("/") / "shipped" / f"mod.{tag}.pyc"


def test_bytecode_is_kept_under_the_cache_and_read_by_the_next_process(tmp_path):
    src = _package(tmp_path)
    env = _env(tmp_path, src)
    first = _run(env).stdout.splitlines()
    prefix = tmp_path / "cache" / "pycache"
    assert first == [str(prefix), str(prefix)]  # the folder, and the children's environment
    assert _pyc(tmp_path / "cache", src).is_file()
    assert not (src / "shipped" / "__pycache__").exists()  # the sources' folders stay as they were
    # The next process reads it: `python -v` names the file a module's code came from.
    second = _run(env, "-v")
    assert f"code object from '{_pyc(tmp_path / 'cache', src)}'" in second.stderr


def test_a_child_of_such_a_process_writes_what_it_imports_too(tmp_path):
    src = _package(tmp_path)
    prefix = tmp_path / "cache" / "pycache"
    _run(_env(tmp_path, src, PYTHONPYCACHEPREFIX=str(prefix)))  # as a child inherits it
    assert _pyc(tmp_path / "cache", src).is_file()


@pytest.mark.parametrize("case", ["bytecode allowed", "torch ships bytecode", "turned off", "user's prefix",
                                  "cache off"])
def test_nothing_changes_where_it_is_not_needed_or_not_wanted(tmp_path, case):
    src = _package(tmp_path, with_pycache=case == "torch ships bytecode")
    extra = {
        "bytecode allowed": {"PYTHONDONTWRITEBYTECODE": None},
        "torch ships bytecode": {},
        "turned off": {"MCR_EXIT_BYTECODE": "off"},
        "user's prefix": {"PYTHONPYCACHEPREFIX": str(tmp_path / "theirs")},
        "cache off": {"MCR_EXIT_CACHE": "off"},
    }[case]
    env = _env(tmp_path, src, **extra)
    out = _run(env).stdout.splitlines()
    assert out[0] == "None"
    assert out[1] == (str(tmp_path / "theirs") if case == "user's prefix" else "None")
    assert not (tmp_path / "cache" / "pycache").exists()
    if case != "bytecode allowed":
        assert not list(tmp_path.rglob("*.pyc"))


def test_on_keeps_bytecode_whatever_the_probe_says(tmp_path):
    src = _package(tmp_path, with_pycache=True)
    _run(_env(tmp_path, src, MCR_EXIT_BYTECODE="on"))
    assert _pyc(tmp_path / "cache", src).is_file()


def test_the_command_line_keeps_bytecode_before_its_imports(tmp_path):
    """`mcr-exit` sets it up as it starts: the modules a command imports afterwards are compiled once, into
    the cache (``on``: this environment's torch has its bytecode)."""
    src = _package(tmp_path)
    env = _env(tmp_path, src, MCR_EXIT_BYTECODE="on")
    proc = subprocess.run([sys.executable, "-m", "mcr_exit", "warm", "status"], env=env, capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode in (0, 1), proc.stderr
    written = list((tmp_path / "cache" / "pycache").rglob("*.pyc"))
    assert any(p.name.startswith("warm.") for p in written), written


def test_the_model_loader_keeps_bytecode_before_torch_loads(tmp_path):
    """A library user's ``from mcr_exit.models import load_model`` sets it up before torch is imported."""
    code = ("import sys\n"
            "import mcr_exit.bytecode as b\n"
            "b.keep_bytecode = lambda: print('torch loaded' if 'torch' in sys.modules else 'before torch')\n"
            "from mcr_exit.models import load_model\n")
    proc = subprocess.run([sys.executable, "-c", code], env=_env(tmp_path, tmp_path), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == "before torch"
