"""Output directories that appear only when everything in them was written."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def staged_output_dir(out_dir: Path) -> Iterator[Path]:
    """Yield a hidden sibling folder to write into; on success it replaces ``out_dir``, on error it vanishes.

    Nothing half-finished is ever left where a user (or the server) would read a finished result.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        yield staging
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
