"""The one writer of each downstream command. Each takes a finished result and writes it whole or not at all:
an output folder through ``staged_output_dir``, a single file (a rewritten profile, a figure next to it)
through a hidden sibling that replaces it at the end."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mcr_exit.outputs import folder_mode, staged_output_dir


@contextmanager
def staged_files(*paths: Path) -> Iterator[list[Path]]:
    """Yield a hidden sibling per path to write into; on success each replaces its path, on error all vanish."""
    staged = []
    try:
        for path in map(Path, paths):
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
            os.close(fd)
            staged.append(Path(tmp))
        yield staged
        for tmp, path in zip(staged, paths):
            tmp.chmod(0o666 & folder_mode())  # what open() would give a new file under the umask
            os.replace(tmp, path)
    finally:
        for tmp in staged:
            tmp.unlink(missing_ok=True)


def write_curve_files(doc: dict, folder: Path) -> Path:
    """<kind>.json and <kind>.csv of a curve document into ``folder``; returns the JSON's path."""
    import pandas as pd

    path = Path(folder) / f"{doc['kind']}.json"
    path.write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n")
    pd.DataFrame(doc["rows"]).to_csv(Path(folder) / f"{doc['kind']}.csv", index=False)
    return path


def write_profile_doc(doc: dict, path: Path) -> None:
    """Replace a phase_profile.json with ``doc`` (whole or not at all)."""
    with staged_files(Path(path)) as (tmp,):
        tmp.write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n")


def write_curve_run(run) -> Path:
    """lens, probe, mteb, lmeval: <kind>.json, <kind>.csv and <kind>.png into ``run.output_dir``; then the
    rewritten profile when the run carries one (mteb --profile). Returns the JSON's final path."""
    from mcr_exit.evaluation.plots import figure8

    with staged_output_dir(run.output_dir) as staging:
        write_curve_files(run.doc, staging)
        figure8(**{run.kind: run.doc}, out=staging / f"{run.kind}.png")
    if run.profile is not None:
        write_profile_doc(run.profile, Path(run.profile_path))
    return Path(run.output_dir) / f"{run.kind}.json"


def write_choice(choice) -> None:
    """choose-layer: Figure 8 (when there are curves) and the profile (unless a dry run or no evidence),
    both replaced only once both are written."""
    from mcr_exit.evaluation.plots import figure8

    targets = ([choice.figure] if choice.figure else []) + ([choice.profile_path] if choice.rewrite else [])
    if not targets:
        return
    with staged_files(*targets) as staged:
        if choice.figure:
            figure8(**choice.curves, profile=choice.profile, out=staged[0])
        if choice.rewrite:
            staged[-1].write_text(json.dumps(choice.profile, indent=2, allow_nan=False) + "\n")
