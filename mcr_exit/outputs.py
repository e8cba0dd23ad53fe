"""Output directories that appear only when everything in them was written, and that never cost a user a file.

Every command writes its folder through ``staged_output_dir``:
* the folder appears whole or not at all, with the mode ``mkdir`` would give it under the process umask;
* it carries a marker (``.mcr-exit-output.json``) listing what mcr-exit wrote into it. An existing folder
  is replaced only when it is empty or is such an output holding nothing but what its marker lists;
  anything else is refused, and nothing is deleted;
* the working directory, any folder above it, the home folder and ``/`` are refused outright.

``check_output_dir`` runs these checks at once; commands call it before any computing starts, so a bad
``--output-dir`` fails in a second, not after the work. A staging folder records its owner (host, pid,
start time); a later write sweeps the staging folders whose owner is provably dead (owner.py).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from mcr_exit.errors import ConfigError, OutputError, refused_write
from mcr_exit.owner import current_owner, owner_is_dead
from mcr_exit.signals import sigterm_raises

MARKER = ".mcr-exit-output.json"
STAGE_FILE = ".mcr-exit-stage.json"
_STAGE, _OLD = ".mcr-stage.", ".mcr-old."


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def folder_mode() -> int:
    """The mode a new folder gets from ``mkdir`` under the current umask."""
    return 0o777 & ~_umask()


def _entries(folder: Path) -> set[str]:
    """Every file, folder and link under ``folder``, as relative POSIX paths (links are not followed)."""
    found = set()
    for root, dirs, files in os.walk(folder):
        rel = Path(root).relative_to(folder)
        found.update((rel / n).as_posix() for n in dirs + files)
    return found


def foreign_entry(folder: Path) -> str | None:
    """The first thing in ``folder`` that mcr-exit did not write there (None when it wrote all of it)."""
    entries = _entries(folder)
    if not entries:
        return None
    try:
        listed = set(json.loads((folder / MARKER).read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return sorted(entries)[0]
    extra = sorted(entries - listed - {MARKER})
    return extra[0] if extra else None


def check_output_dir(out_dir: str | Path, *, replace: bool = True) -> Path:
    """The output folder (``~`` expanded) if mcr-exit may write it; a one-line ConfigError otherwise.
    ``replace=False``: the caller adds files beside what is there (and deletes nothing), so the folder
    may hold anything."""
    out = Path(out_dir).expanduser()
    full = Path(os.path.abspath(out))
    real, cwd = full.resolve(), Path.cwd().resolve()
    if real == Path(real.anchor) or real == Path.home().resolve():
        raise ConfigError(f"--output-dir {out_dir}: refusing to write into {real}; give a folder of its own")
    if cwd == real or real in cwd.parents:
        raise ConfigError(f"--output-dir {out_dir} is the working directory or above it; give a folder of its own")
    if out.is_symlink():
        raise ConfigError(f"--output-dir {out_dir} is a symbolic link; give the folder it points to")
    if out.exists():
        if not out.is_dir():
            raise ConfigError(f"--output-dir {out_dir} exists and is not a folder")
        extra = foreign_entry(out) if replace else None
        if extra is not None:
            raise ConfigError(f"--output-dir {out_dir} holds files mcr-exit did not write (e.g. {extra}); "
                              "give a new or empty folder")
        return out
    ancestor = full.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConfigError(f"--output-dir {out_dir}: cannot create it, {ancestor} is not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError(f"--output-dir {out_dir}: cannot create it, {ancestor} is not writable")
    return out


def _claim(folder: Path) -> None:
    (folder / STAGE_FILE).write_text(json.dumps(current_owner()) + "\n")


def sweep_stale_stages(parent: Path) -> list[Path]:
    """Remove the staging folders in ``parent`` whose owner process is provably dead; returns them."""
    removed = []
    with suppress(OSError):
        for entry in Path(parent).iterdir():
            if not (entry.name.startswith(".") and (_STAGE in entry.name or _OLD in entry.name)):
                continue
            if entry.is_symlink() or not entry.is_dir():
                continue
            try:
                owner = json.loads((entry / STAGE_FILE).read_text())
            except (OSError, ValueError):
                continue  # no record of its owner: nothing proves it dead
            if isinstance(owner, dict) and owner_is_dead(owner):
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
    return removed


def _replace(staging: Path, out_dir: Path) -> None:
    if not out_dir.exists() and not out_dir.is_symlink():
        staging.rename(out_dir)
        return
    check_output_dir(out_dir)  # again: the folder may have changed during the work
    if not any(out_dir.iterdir()):
        out_dir.rmdir()
        staging.rename(out_dir)
        return
    old = staging.with_name(staging.name.replace(_STAGE, _OLD))
    out_dir.rename(old)
    _claim(old)  # a kill before the removal below leaves it to a later sweep
    staging.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def _refused_as_output_error(out_dir: Path) -> Iterator[None]:
    """A write the machine refuses (a full disk, a read-only folder) as one line for the user."""
    try:
        yield
    except OSError as exc:
        if refused_write(exc):
            raise OutputError(f"cannot write the outputs to {out_dir}: {exc.strerror}") from exc
        raise


@contextmanager
def staged_output_dir(out_dir: str | Path) -> Iterator[Path]:
    """Yield a hidden sibling folder to write into; on success it replaces ``out_dir``, on error it vanishes.

    Nothing half-finished is ever left where a user (or the server) would read a finished result. The
    staging folder is private (``mkdtemp``: 0700) and gets the ordinary folder mode before it takes
    ``out_dir``'s place, with the marker listing what was written.
    """
    out_dir = check_output_dir(out_dir)
    with _refused_as_output_error(out_dir):
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale_stages(out_dir.parent)
    with sigterm_raises():  # SIGTERM: the finally below still runs
        with _refused_as_output_error(out_dir):
            staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}{_STAGE}", dir=out_dir.parent))
        try:
            with _refused_as_output_error(out_dir):  # the work's own writes, then the marker and the rename
                _claim(staging)
                yield staging
                (staging / STAGE_FILE).unlink()
                written = sorted(_entries(staging))
                (staging / MARKER).write_text(json.dumps({"written_by": "mcr-exit", "files": written},
                                                         indent=1) + "\n")
                staging.chmod(folder_mode())
                _replace(staging, out_dir)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
