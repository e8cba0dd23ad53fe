"""Output directories that appear only when everything in them was written.

Every command writes its folder through ``staged_output_dir``, so every output folder gets the same
mode: the one ``mkdir`` would give it under the process umask (0755 under the usual 022).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def folder_mode() -> int:
    """The mode a new folder gets from ``mkdir`` under the current umask."""
    return 0o777 & ~_umask()


@contextmanager
def staged_output_dir(out_dir: Path) -> Iterator[Path]:
    """Yield a hidden sibling folder to write into; on success it replaces ``out_dir``, on error it vanishes.

    Nothing half-finished is ever left where a user (or the server) would read a finished result.
    The staging folder is made private by ``mkdtemp`` (0700); it gets the ordinary folder mode before
    it takes ``out_dir``'s place.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        yield staging
        staging.chmod(folder_mode())
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
