"""Every option of every command says what it does, and `--help` answers without loading torch."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import click
import pytest

from mcr_exit.cli import main

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "transformers", "pandas", "mlflow", "mteb", "lm_eval", "fastapi", "sklearn", "matplotlib")
# A fresh interpreter needs ~0.1 s for click and the command modules; loading torch alone takes
# seconds on these machines, so 1 s separates the two.
HELP_SECONDS = 1.0


def _commands():
    return sorted(main.commands.items())


@pytest.mark.parametrize("name, command", _commands(), ids=[n for n, _ in _commands()])
def test_every_option_has_help(name, command):
    missing = [p.opts[0] for p in command.params
               if isinstance(p, click.Option) and not (p.help or "").strip()]
    assert not missing, f"mcr-exit {name}: options without help: {', '.join(missing)}"
    assert (command.help or "").strip(), f"mcr-exit {name} has no description"


def test_cli_import_loads_nothing_heavy():
    code = ("import sys; import mcr_exit.cli; "
            f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}).stdout.strip()
    assert out == "", f"importing mcr_exit.cli loads {out}"


@pytest.mark.parametrize("name", [None] + sorted(main.commands))
def test_help_answers_within_a_second(name):
    args = [sys.executable, "-m", "mcr_exit"] + ([name] if name else []) + ["--help"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True, env=env, cwd=REPO)
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr
    assert "Usage:" in proc.stdout
    assert seconds < HELP_SECONDS, f"mcr-exit {name or ''} --help took {seconds:.2f} s"


def test_one_pooling_vocabulary():
    from mcr_exit.metrics.pooling import POOLINGS
    from mcr_exit.vocabulary import DEFAULT_POOLING

    for name in ("probe", "mteb"):
        opt = next(p for p in main.commands[name].params if p.name == "pooling")
        assert opt.default == DEFAULT_POOLING and opt.metavar == "|".join(POOLINGS)
        assert all(p in opt.help for p in POOLINGS)


def test_layer_options_name_one_thing():
    """--layers is always hidden indices (START:STOP[:STEP]); ablate's blocks are --blocks."""
    for name, command in main.commands.items():
        names = {o for p in command.params for o in getattr(p, "opts", [])}
        if "--layers" in names:
            opt = next(p for p in command.params if "--layers" in p.opts)
            assert "Hidden indices" in opt.help, name
    blocks = next(p for p in main.commands["ablate"].params if "--blocks" in p.opts)
    assert "counted from 0" in blocks.help and "0,5-7" in blocks.help
    assert "--model" not in {o for p in main.commands["compare"].params for o in p.opts}
