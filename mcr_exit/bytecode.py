"""Python bytecode for environments that forbid writing it beside the sources.

An installed package imports from its compiled ``.pyc`` files. A container image that sets
``PYTHONDONTWRITEBYTECODE`` over packages shipped without ``__pycache__`` compiles torch, sympy and
transformers from source in every new process: on an H200 host of that kind a cached ``load_model`` took
8.3 s, 4.9 s with bytecode (docs/performance.md). There, ``keep_bytecode`` keeps the bytecode under
mcr-exit's cache folder instead (``sys.pycache_prefix``, ``<cache>/pycache``): the sources' folders stay
untouched, as the setting asks, and only the first process pays the compilation.

It acts only when all of these hold, and otherwise changes nothing:
* bytecode is not written (``PYTHONDONTWRITEBYTECODE`` or ``-B``) and no ``PYTHONPYCACHEPREFIX`` is set
  (a prefix of the user's own is kept as it is);
* torch's package folder has no ``__pycache__`` (where it has one, its bytecode is read from there, and a
  prefix would only make every module compile again into it);
* ``MCR_EXIT_BYTECODE`` is not ``off`` and the cache is not off (``MCR_EXIT_CACHE=off``).

``MCR_EXIT_BYTECODE=on`` skips the second test (for an environment whose torch has bytecode and whose
other packages do not).

It also sets ``PYTHONPYCACHEPREFIX`` for child processes (the warm process, compile workers), which then
read the same bytecode. Imports nothing heavy: the command line calls it before torch loads, and so does
``mcr_exit.models`` on first use.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from mcr_exit.cache_dir import OFF_WORDS, cache_root

BYTECODE_ENV = "MCR_EXIT_BYTECODE"  # off (OFF_WORDS); "" = decide by the probe; "on" = always


def _prefix() -> Path | None:
    root = cache_root()
    return None if root is None else root.absolute() / "pycache"


def _ships_bytecode(package: str) -> bool:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.origin:
        return True  # nothing to speed up
    return (Path(spec.origin).parent / "__pycache__").is_dir()


_decided: dict[str, Path | None] = {}


def keep_bytecode(probe: str = "torch") -> Path | None:
    """Write and read bytecode under ``<cache>/pycache`` where the environment would otherwise compile
    every import from source (see the module's description); returns that folder, or None where nothing
    changed. ``probe`` is the package whose ``__pycache__`` tells whether the environment ships bytecode.
    Decided once per process (and probe); later calls return the same."""
    if probe not in _decided:
        _decided[probe] = _keep_bytecode(probe)
    return _decided[probe]


def _keep_bytecode(probe: str) -> Path | None:
    setting = os.environ.get(BYTECODE_ENV, "").strip().lower()
    if setting in OFF_WORDS:
        return None
    ours = _prefix()
    if ours is None:
        return None
    if sys.pycache_prefix is not None:
        # A child of a process that set ours: write the modules only it imports, too.
        if Path(sys.pycache_prefix) == ours and sys.dont_write_bytecode:
            sys.dont_write_bytecode = False
            return ours
        return None
    if not sys.dont_write_bytecode or (setting != "on" and _ships_bytecode(probe)):
        return None
    try:
        ours.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    if not os.access(ours, os.W_OK):
        return None
    sys.pycache_prefix = str(ours)
    sys.dont_write_bytecode = False
    os.environ["PYTHONPYCACHEPREFIX"] = str(ours)
    return ours
